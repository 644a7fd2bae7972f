"""The "vllm" engine gives what the "hf" engine gives, row for row, on vLLM's CPU backend: greedy
answers and finish reasons, truncation and refusals, repetition control over the answer only,
choice probabilities within 1e-3, schema answers that parse, per-row seeds that follow the key.

vLLM runs in a subprocess (``vllm_probe.py``, once for the module, both models in it); the "hf"
engine runs the same rows here. Models: a tiny GPT-NeoX with the Dolly special tokens (two heads
of 32 dimensions: vLLM's CPU attention takes no smaller head) and the demo model (Llama, chat
format), both in fp32.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dolly_spark.batch.demo import demo_checkpoint
from dolly_spark.inference.engine import InstructionEngine
from dolly_spark.inference.engines import EngineConfig
from dolly_spark.testing.tiny_models import save_tiny_model
from conftest import tokenizer_corpus

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_probe  # noqa: E402

pytestmark = pytest.mark.slow
PROBE = Path(__file__).with_name("vllm_probe.py")
GENERATED = ("greedy", "repetition", "refuse_long", "require_input")
# What the "hf" engine's answers are compared on: sampled answers are checked within vLLM's own
# runs (a row's seed follows its key), so the "hf" engine runs no sampled request.
COMPARED = (*GENERATED, "choices", "schema")


@pytest.fixture(scope="module")
def models(tmp_path_factory, project_home) -> dict[str, str]:
    tiny = save_tiny_model(tmp_path_factory.mktemp("vllm") / "tiny_dolly", tokenizer_corpus())
    return {"dolly": str(tiny), "chat": str(demo_checkpoint())}


@pytest.fixture(scope="module")
def probe_process(models, tmp_path_factory):
    """The probe's report, and the probe itself, alive with its vLLM engines loaded until killed."""
    out = tmp_path_factory.mktemp("vllm_probe") / "answers.json"
    log = out.with_name("probe.log")
    probe = subprocess.Popen([sys.executable, str(PROBE), str(out), *models.values()], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    try:
        # The probe prints "ready" once its report is written (vLLM prints its warnings there too).
        lines = iter(probe.stdout.readline, "")
        assert any(line.strip() == "ready" for line in lines), log.read_text()[-4000:]
        yield json.loads(out.read_text()), probe
    finally:
        probe.kill()
        probe.wait()


@pytest.fixture(scope="module")
def vllm_report(probe_process) -> dict:
    return probe_process[0]


@pytest.fixture(scope="module")
def hf_answers(models) -> dict[str, dict]:
    answers = {}
    for kind, path in models.items():
        engine = InstructionEngine.from_pretrained(path, config=EngineConfig(engine="hf", dtype="float32"))
        answers[kind] = vllm_probe.run_all(engine, COMPARED)
    return answers


@pytest.mark.parametrize("kind", ["dolly", "chat"])
def test_generated_rows_equal_the_hf_engines(kind, models, vllm_report, hf_answers):
    report = vllm_report[models[kind]]
    assert (report["engine"], report["device"]) == ("VllmEngine", "cpu")
    for name in GENERATED:
        assert report["answers"][name] == hf_answers[kind][name], name
    greedy = report["answers"]["greedy"]
    assert [row["finish_reason"] for row in greedy].count("error") == 2  # the null and the blank instruction
    assert greedy[2]["truncated"]  # the long input, cut to max_input_tokens
    assert sum(row["completion_tokens"] for row in greedy) > 0
    # The penalty and the n-gram ban change what the model writes.
    assert report["answers"]["repetition"] != greedy
    refused = report["answers"]["refuse_long"][2]
    assert refused["finish_reason"] == "error" and refused["error"].startswith("prompt has ")
    assert report["answers"]["require_input"][5]["error"] == "input is null; nothing to work on"


@pytest.mark.parametrize("kind", ["dolly", "chat"])
def test_choice_probabilities_within_a_thousandth_of_the_hf_engines(kind, models, vllm_report, hf_answers):
    vllm_rows = vllm_report[models[kind]]["answers"]["choices"]
    hf_rows = hf_answers[kind]["choices"]
    scored = [index for index, row in enumerate(hf_rows) if row["error"] is None]
    assert len(scored) == 5
    for index in scored:
        ours, theirs = vllm_rows[index], hf_rows[index]
        assert ours["label"] == theirs["label"]
        assert ours["choice_probabilities"] == pytest.approx(theirs["choice_probabilities"], abs=1e-3)
        assert sum(ours["choice_probabilities"]) == pytest.approx(1.0)
    assert [row["error"] for row in vllm_rows] == [row["error"] for row in hf_rows]


def test_schema_answers_parse(models, vllm_report, hf_answers):
    rows = vllm_report[models["chat"]]["answers"]["schema"]
    answered = [row for row in rows if row["error"] is None]
    assert len(answered) == 5
    for row in answered:
        answer = json.loads(row["response"])
        assert answer["topic"] in ("billing", "shipping", "hardware") and answer["urgency"] in ("low", "medium", "high", None)
    assert rows == hf_answers["chat"]["schema"]


def test_a_sampled_rows_answer_follows_its_key_not_its_position(models, vllm_report):
    answers = vllm_report[models["dolly"]]["answers"]
    forward, backward = answers["sampled"], answers["sampled_reversed"][::-1]
    assert forward == backward
    assert any(row["response"] for row in forward)
    assert forward != answers["sampled_other_seed"]  # the seed is used: sampling happened


def test_dolly_schema_answers_end_on_the_end_key_as_the_hf_engines(models, vllm_report, hf_answers):
    rows = vllm_report[models["dolly"]]["answers"]["schema"]
    assert rows == hf_answers["dolly"]["schema"]
    assert {row["finish_reason"] for row in rows if row["error"] is None} <= {"stop"}


def test_an_engine_setting_changes_no_answer_on_vllm(models, vllm_report):
    report = vllm_report[models["dolly"]]
    for name, rows in report["small_config"].items():
        rows, expected = [dict(row) for row in rows], [dict(row) for row in report["answers"][name]]
        # Probabilities apart: batches of other shapes sum in another order, in their last bits.
        for row, expected_row in zip(rows, expected):
            for field in ("choice_probabilities", "label_probability"):
                got, want = row.pop(field), expected_row.pop(field)
                assert (got is None) == (want is None) and (got is None or got == pytest.approx(want, abs=1e-6)), name
        assert rows == expected, name


def test_one_row_vllm_raises_on_gets_an_error_and_the_rest_their_answers(models, vllm_report):
    report = vllm_report[models["dolly"]]
    failing, greedy = report["one_row_failing"], report["answers"]["greedy"]
    assert failing[1]["error"] == "vLLM failed on this row: ValueError: vLLM could not process this prompt"
    assert failing[1]["retryable"] is True and failing[1]["finish_reason"] == "error"
    assert failing[:1] + failing[2:] == greedy[:1] + greedy[2:]


def test_the_hf_engine_runs_after_vllm_in_the_same_process(models, vllm_report, hf_answers):
    assert vllm_report[models["dolly"]]["hf_after_vllm"]["greedy"] == hf_answers["dolly"]["greedy"]


def test_vllms_engine_processes_die_with_the_process_that_started_them(probe_process):
    import os
    import time

    report, probe = probe_process
    children = report["engine_processes"]
    assert len(children) >= 3  # an engine process at least per loaded engine
    assert all(os.path.exists(f"/proc/{pid}") for pid in children)
    probe.kill()  # as a Spark task's Python worker is killed
    probe.wait()
    deadline = time.monotonic() + 30
    while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if _alive(pid)]


def _alive(pid: int) -> bool:
    """Running and not a zombie (a killed child its parent has not reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
