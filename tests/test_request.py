"""The request: what an answer depends on, its fingerprint, and a version's registered defaults."""
from __future__ import annotations

import dataclasses
import hashlib
import json

import pytest

from dolly_spark.inference.engines import EngineConfig
from dolly_spark.request import ModelSpec, Request, build_request

MODEL = ModelSpec("registry", "models:/support_dolly/3", "support_dolly", "3", "chat",
                  generation_defaults=(("repetition_penalty", 1.1), ("no_repeat_ngram_size", 4)))
INSTRUCTION = "Summarize the ticket."


def test_registered_defaults_apply_only_where_the_caller_leaves_a_setting_unset():
    registered = build_request(MODEL, INSTRUCTION)
    assert (registered.repetition_penalty, registered.no_repeat_ngram_size) == (1.1, 4)
    assert isinstance(registered.no_repeat_ngram_size, int)
    chosen = build_request(MODEL, INSTRUCTION, repetition_penalty=1.0, no_repeat_ngram_size=None)
    assert (chosen.repetition_penalty, chosen.no_repeat_ngram_size) == (1.0, 4)
    bare = build_request(dataclasses.replace(MODEL, generation_defaults=()), INSTRUCTION)
    assert (bare.repetition_penalty, bare.no_repeat_ngram_size) == (1.0, 0)


def test_fingerprint_changes_with_what_changes_an_answer_only():
    base = build_request(MODEL, INSTRUCTION, require_input=True, max_new_tokens=96)
    assert base.fingerprint() == build_request(MODEL, INSTRUCTION, require_input=True, max_new_tokens=96).fingerprint()
    changed = {
        "model version": dataclasses.replace(base, model=dataclasses.replace(MODEL, version="4")),
        "prompt format": dataclasses.replace(base, model=dataclasses.replace(MODEL, prompt_format="dolly")),
        "instruction": dataclasses.replace(base, instruction="Classify the ticket."),
        "max_new_tokens": dataclasses.replace(base, max_new_tokens=64),
        "sampling": dataclasses.replace(base, temperature=0.7),
        "sampling seed": dataclasses.replace(base, temperature=0.7, seed=1),
        "repetition": dataclasses.replace(base, no_repeat_ngram_size=0),
        "max_input_tokens": dataclasses.replace(base, max_input_tokens=512),
        "on_overlong": dataclasses.replace(base, on_overlong="error"),
        "input not required": dataclasses.replace(base, require_input=False),
        "choices": dataclasses.replace(base, choices=("billing", "other")),
        "schema": dataclasses.replace(base, json_schema='{"type": "object"}'),
    }
    fingerprints = {name: request.fingerprint() for name, request in changed.items()}
    assert base.fingerprint() not in fingerprints.values()
    assert len(set(fingerprints.values())) == len(fingerprints), fingerprints
    # Where the model files are read from (a shared directory) is not what answers depend on.
    staged = dataclasses.replace(MODEL, kind="local", uri="/Volumes/models/support_dolly-3/files")
    assert dataclasses.replace(base, model=staged).fingerprint() == base.fingerprint()
    # Labels alone are scored, never generated: generation settings do not change them.
    labels = dataclasses.replace(base, choices=("billing", "other"))
    assert dataclasses.replace(labels, max_new_tokens=8).fingerprint() == labels.fingerprint()


def test_fingerprint_of_a_plain_summary_is_the_one_results_were_written_with():
    """Targets written before requests existed stay current: the same fields, the same hash."""
    request = build_request(MODEL, INSTRUCTION, require_input=True, max_new_tokens=96)
    earlier = {"model_name": "support_dolly", "model_version": "3", "prompt_format": "chat",
               "instruction": INSTRUCTION, "max_input_tokens": 4096, "max_new_tokens": 96, "decoding": "greedy",
               "repetition_penalty": 1.1, "no_repeat_ngram_size": 4.0}
    assert request.fingerprint() == hashlib.sha256(json.dumps(earlier, sort_keys=True).encode()).hexdigest()


def test_engine_configuration_is_not_part_of_a_request():
    request_fields = {field.name for field in dataclasses.fields(Request)}
    config_fields = {field.name for field in dataclasses.fields(EngineConfig)}
    assert not request_fields & config_fields
    assert {"token_budget", "max_batch_rows", "dtype", "strategy", "reuse_prefix", "engine"} <= config_fields


def test_requests_are_checked_normalised_and_hashable():
    with pytest.raises(ValueError, match="instruction must be a non-empty string"):
        Request(instruction="  ")
    listed = Request(choices=["a", "b"], json_schema={"type": "object"})
    assert listed == Request(choices=("a", "b"), json_schema='{"type": "object"}')
    assert hash(listed) == hash(Request(choices=("a", "b"), json_schema='{"type": "object"}'))
