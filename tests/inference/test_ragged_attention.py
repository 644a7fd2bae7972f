"""Decoding over only the live part of the cache gives the same answers as plain SDPA."""
from __future__ import annotations

import contextlib

import pytest

import dolly_spark.inference.engine as engine_module
import dolly_spark.inference.ragged_attention as ragged
from engine_helpers import bound_engine
from dolly_spark.inference.ragged_attention import CacheLayout
from test_engine import LENGTHS_CONTEXTS, LENGTHS_INSTRUCTIONS

MAX_NEW_TOKENS = 10


@pytest.fixture(params=["gpt_neox", "llama"])
def model_and_tokenizer(request, tiny_model, tiny_llama):
    """Dolly's architecture (one key/value head per query head) and the demo model's (grouped)."""
    return tiny_model if request.param == "gpt_neox" else tiny_llama


def run_engine(model_and_tokenizer, min_length_ratio: float, reuse_prefix: bool = False):
    # Without the shared prefix prefilled apart, ratio 0 leaves the whole prefill to generate:
    # the two cache layouts checked below.
    model, tokenizer = model_and_tokenizer
    engine = bound_engine(model, tokenizer, "dolly", max_new_tokens=MAX_NEW_TOKENS, token_budget=100_000,
                          min_length_ratio=min_length_ratio, reuse_prefix=reuse_prefix)
    results = engine.run(LENGTHS_INSTRUCTIONS, LENGTHS_CONTEXTS)
    return engine, [(r.response, r.finish_reason, r.completion_tokens) for r in results]


@pytest.mark.parametrize("min_length_ratio", [0.0, 0.75])
def test_ragged_decoding_matches_plain_sdpa(model_and_tokenizer, min_length_ratio, monkeypatch):
    model, _ = model_and_tokenizer
    assert model.config._attn_implementation == "sdpa"
    decode_calls: list[tuple[int, int]] = []  # (rows, key columns) handed to SDPA per decoding step
    plain_forward = ragged.sdpa_attention_forward

    def recording_forward(module, query, key, value, attention_mask, **kwargs):
        if query.shape[2] == 1:
            decode_calls.append((query.shape[0], key.shape[2]))
        return plain_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setattr(ragged, "sdpa_attention_forward", recording_forward)
    engine, ragged_results = run_engine(model_and_tokenizer, min_length_ratio)
    assert model.config._attn_implementation == "sdpa"  # restored after generate

    monkeypatch.setattr(engine_module, "ragged_attention", lambda model, layout: contextlib.nullcontext(False))
    _, plain_results = run_engine(model_and_tokenizer, min_length_ratio)
    assert ragged_results == plain_results

    (rows, longest), = engine.stats.micro_batches
    prefilled = min_length_ratio > 0  # groups prefilled apart: the cache holds all but the last prompt token
    cache_columns = longest - prefilled + MAX_NEW_TOKENS
    assert decode_calls and all(columns <= cache_columns for _, columns in decode_calls)
    if prefilled:
        # Each group's first step reads exactly its longest prompt's columns: no left padding
        # of the longer groups, no slot of a token not generated yet.
        assert len(engine.stats.prefill_groups) > 1
        assert set(engine.stats.prefill_groups) <= set(decode_calls)
    else:
        assert {count for count, _ in decode_calls} == {rows}
        assert min(columns for _, columns in decode_calls) == longest + 1


@pytest.mark.parametrize("min_length_ratio", [0.0, 0.75])
def test_ragged_decoding_matches_plain_sdpa_after_a_shared_prefix(model_and_tokenizer, min_length_ratio, monkeypatch):
    instructions = ["Summarize the ticket for the support lead."] * len(LENGTHS_CONTEXTS)
    contexts = [context or "No details." for context in LENGTHS_CONTEXTS]

    def answers(engine_settings):
        engine = bound_engine(*model_and_tokenizer, "dolly", **engine_settings)
        return engine, [(r.response, r.finish_reason, r.completion_tokens) for r in engine.run(instructions, contexts)]

    settings = dict(max_new_tokens=MAX_NEW_TOKENS, token_budget=100_000, min_length_ratio=min_length_ratio)
    switched: list[bool] = []
    switch = engine_module.ragged_attention

    @contextlib.contextmanager
    def recording_switch(model, layout):
        with switch(model, layout) as used:
            switched.append(used)
            yield used

    monkeypatch.setattr(engine_module, "ragged_attention", recording_switch)
    engine, ragged_results = answers(settings)
    assert engine.stats.reused_prefix_tokens > 0 and switched and all(switched)
    monkeypatch.setattr(engine_module, "ragged_attention", lambda model, layout: contextlib.nullcontext(False))
    assert answers(settings)[1] == ragged_results


def test_layout_counts_steps_per_layer():
    layout = CacheLayout(runs=[(0, 2, 0), (2, 3, 5)], written=7)
    assert [layout.live_end(0), layout.live_end(1), layout.live_end(0), layout.live_end(1)] == [8, 8, 9, 9]
    assert layout.live_end(None) is None


def test_sliding_window_models_keep_plain_sdpa(tiny_model):
    from transformers import MistralConfig, MistralForCausalLM

    _, tokenizer = tiny_model
    config = MistralConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, intermediate_size=128, sliding_window=64)
    mistral = MistralForCausalLM(config).eval()
    layout = CacheLayout(runs=[(0, 1, 0)], written=4)
    with ragged.ragged_attention(mistral, layout) as switched:
        assert not switched and mistral.config._attn_implementation == "sdpa"
    llama_like = MistralForCausalLM(MistralConfig(**{**config.to_dict(), "sliding_window": None})).eval()
    with ragged.ragged_attention(llama_like, layout) as switched:
        assert switched and llama_like.config._attn_implementation == ragged.RAGGED_SDPA
    assert llama_like.config._attn_implementation == "sdpa"


def test_a_model_shared_across_threads_stays_switched_until_the_last_user_leaves(tiny_llama):
    """Engines in two threads may decode on one model at once: the first one done must not
    switch the model back to plain SDPA under the other, whose layout would then miss steps."""
    import threading

    model, _ = tiny_llama
    entered, release = threading.Event(), threading.Event()
    seen_in_thread = []

    def other_engine():
        with ragged.ragged_attention(model, CacheLayout(runs=[(0, 2, 0)], written=3)) as switched:
            seen_in_thread.append((switched, ragged._layout.get().written))
            entered.set()
            release.wait(timeout=10)
            seen_in_thread.append(model.config._attn_implementation)

    with ragged.ragged_attention(model, CacheLayout(runs=[(0, 1, 0)], written=7)) as switched:
        assert switched
        thread = threading.Thread(target=other_engine)
        thread.start()
        assert entered.wait(timeout=10)
        assert ragged._layout.get().written == 7  # each thread sees its own layout
    assert model.config._attn_implementation == ragged.RAGGED_SDPA  # the other thread is still decoding
    release.set()
    thread.join(timeout=10)
    assert seen_in_thread == [(True, 3), ragged.RAGGED_SDPA]
    assert model.config._attn_implementation == "sdpa" and not ragged._users
