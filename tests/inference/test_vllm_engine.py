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
def vllm_report(models, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("vllm_probe") / "answers.json"
    run = subprocess.run([sys.executable, str(PROBE), str(out), *models.values()], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


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
        assert answer["topic"] in ("billing", "shipping", "hardware") and isinstance(answer["urgent"], bool)
    assert rows == hf_answers["chat"]["schema"]


@pytest.mark.parametrize("kind", ["dolly", "chat"])
def test_a_sampled_rows_answer_follows_its_key_not_its_position(kind, models, vllm_report):
    answers = vllm_report[models[kind]]["answers"]
    forward, backward = answers["sampled"], answers["sampled_reversed"][::-1]
    assert forward == backward
    assert any(row["response"] for row in forward)
    assert forward != answers["sampled_other_seed"]  # the seed is used: sampling happened
