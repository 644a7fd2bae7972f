"""The "vllm" engine gives what the "hf" engine gives, row for row, on vLLM's CPU backend: greedy
answers and finish reasons, truncation and refusals, repetition control over the answer only,
choice probabilities within 1e-3, schema answers that parse, per-row seeds that follow the key.

vLLM runs in a subprocess (``vllm_probe.py``, once for the module, both models in it); the "hf"
engine runs the same rows here. Models: a tiny GPT-NeoX with the Dolly special tokens (two heads
of 32 dimensions: vLLM's CPU attention takes no smaller head), registered and fetched as an
executor fetches it, and the demo model (Llama, chat format), both in fp32.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from dolly_spark.batch.demo import demo_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vllm_probe  # noqa: E402

pytestmark = pytest.mark.slow
PROBE = Path(__file__).with_name("vllm_probe.py")
GENERATED = ("greedy", "repetition", "refuse_long", "require_input")
# What the "hf" engine's answers are compared on: sampled answers are checked within vLLM's own
# runs (a row's seed follows its key), so the "hf" engine runs no sampled request.
COMPARED = (*GENERATED, "choices", "schema")


@pytest.fixture(scope="module")
def models(mlflow_registry, tiny_model) -> dict[str, str]:
    """The tiny Dolly model as a registered version's files, fetched as an executor fetches them
    (an MLflow model: weights in ``model/``, the tokenizer in ``components/tokenizer/``), and the
    demo model's checkpoint."""
    from dolly_spark.lifecycle.loader import fetch_model_files
    from dolly_spark.lifecycle.registry import log_and_register, resolve_model

    version = log_and_register(*tiny_model, "probe_dolly", "dolly")
    registered = Path(fetch_model_files(resolve_model(f"models:/probe_dolly/{version}")))
    # The layout the engines must join for vLLM (tests/inference/test_engines.py checks the join).
    assert (registered / "MLmodel").exists() and (registered / "components" / "tokenizer").is_dir()
    return {"dolly": str(registered), "chat": str(demo_checkpoint())}


@pytest.fixture(scope="module")
def started_probe(models, tmp_path_factory):
    """(the probe process, its report's path, its log), started; killed at the end of the module."""
    out = tmp_path_factory.mktemp("vllm_probe") / "answers.json"
    log = out.with_name("probe.log")
    probe = subprocess.Popen([sys.executable, str(PROBE), str(out), models["dolly"], models["chat"]],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"), text=True)
    try:
        yield probe, out, log
    finally:
        probe.kill()
        probe.wait()


@pytest.fixture(scope="module")
def hf_answers(models, started_probe) -> dict[str, dict]:
    """The "hf" engine's answers, under its default configuration, computed while the probe starts
    (its first half minute is vLLM's imports in one process after another: one core's work)."""
    return {kind: vllm_probe.run_all(vllm_probe.load("hf", path), COMPARED) for kind, path in models.items()}


@pytest.fixture(scope="module")
def probe_process(started_probe, hf_answers):
    """The probe's report, and the probe itself, alive with its vLLM engines loaded until killed."""
    probe, out, log = started_probe
    # The probe prints "ready" once its report is written (vLLM prints its warnings there too).
    lines = iter(probe.stdout.readline, "")
    assert any(line.strip() == "ready" for line in lines), log.read_text()[-4000:]
    return json.loads(out.read_text()), probe


@pytest.fixture(scope="module")
def vllm_report(probe_process) -> dict:
    return probe_process[0]


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
    answers = vllm_report[models["chat"]]["answers"]
    forward, backward = answers["sampled"], answers["sampled_reversed"][::-1]
    assert forward == backward
    assert any(row["response"] for row in forward)
    assert forward != answers["sampled_other_seed"]  # the seed is used: sampling happened


def test_dolly_schema_answers_end_on_the_end_key_as_the_hf_engines(models, vllm_report, hf_answers):
    rows = vllm_report[models["dolly"]]["answers"]["schema"]
    assert rows == hf_answers["dolly"]["schema"]
    assert {row["finish_reason"] for row in rows if row["error"] is None} <= {"stop"}


def test_an_engine_setting_changes_no_answer_on_vllm(models, vllm_report, hf_answers):
    """The Dolly model's vLLM engine runs one row at a time under a token budget smaller than any
    prompt, and answers and refuses every row as the "hf" engine does under its defaults."""
    report = vllm_report[models["dolly"]]
    assert report["settings"] == vllm_probe.SMALL
    for name in COMPARED:
        rows, expected = [dict(row) for row in report["answers"][name]], [dict(row) for row in hf_answers["dolly"][name]]
        # Probabilities apart: the two engines sum in another order, in their last bits.
        for row, expected_row in zip(rows, expected):
            for field in ("choice_probabilities", "label_probability"):
                got, want = row.pop(field), expected_row.pop(field)
                assert (got is None) == (want is None) and (got is None or got == pytest.approx(want, abs=1e-3)), name
        assert rows == expected, name


def test_one_row_vllm_raises_on_gets_an_error_and_the_rest_their_answers(models, vllm_report):
    report = vllm_report[models["chat"]]
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
    assert len(children) >= 2  # an engine process at least per loaded engine
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
