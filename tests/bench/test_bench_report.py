"""The benchmark report on made-up results (no Spark session, no model): ratios over the fastest
MLflow batch size, roofline figures per variant, the padding replay's micro-batches, the markdown."""
from __future__ import annotations

import pytest

from benchmarks.padding import RowTokens, replay
from benchmarks.report import markdown, model_entry
from benchmarks.roofline import MicroBatch
from benchmarks.variants import (APPLY, APPLY_LONG, ENGINE, ENGINE_LONG, MLFLOW, PIPELINE, VariantResult,
                                 mlflow_variant)
from dolly_spark.inference.engines import EngineConfig

GB = 1e9


def _roof(peak: float, bandwidth: float) -> dict:
    return {"peak_flops": peak, "bandwidth": bandwidth, "bandwidth_matvec": bandwidth, "bandwidth_sum": bandwidth / 2,
            "matmul_size": 2048}


MACHINE = {
    "cpu": "test CPU", "cpu_count": 2, "torch": "x", "torch_threads_driver": 2, "bandwidth_mib": 256,
    "roofs": {"fp32": {"workers": {**_roof(200 * GB, 20 * GB), "each": [_roof(100 * GB, 10 * GB)] * 2},
                       "driver": _roof(180 * GB, 18 * GB)}},
    "peak_flops_driver_threads": 180 * GB,
}


def _engine_run(variant: str, seconds: float, workers: int) -> VariantResult:
    work = [MicroBatch(w, 16 // workers, 3_000 // workers, 32) for w in range(workers)]
    phases = {"prefill_seconds": seconds / 2, "prefill_tokens": 3_000,
              "decode_seconds": seconds / 2, "decode_tokens": 480}
    return VariantResult(variant, 16, seconds, 3_000, 512, "engine", 1.0, 2, 0, padding_waste=1.1,
                         extra={"micro_batch_work": work, "phases": phases})


def _mlflow_run(batch_size: int, seconds: float) -> VariantResult:
    return VariantResult(mlflow_variant(batch_size), 16, seconds, 3_000, 512, "pipeline token ids", 1.0, None, None,
                         extra={"batch_size": batch_size})


def _entry(model: str = "demo") -> dict:
    results = {
        ENGINE: _engine_run(ENGINE, 4.0, 1), APPLY: _engine_run(APPLY, 4.0, 2),
        mlflow_variant(8): _mlflow_run(8, 6.0), MLFLOW: _mlflow_run(1, 12.0), mlflow_variant(16): _mlflow_run(16, 8.0),
        PIPELINE: VariantResult(PIPELINE, 16, 10.0, 3_000, 512, "pipeline token ids", 1.0, 2, 0),
        APPLY_LONG: _engine_run(APPLY_LONG, 5.0, 2), ENGINE_LONG: _engine_run(ENGINE_LONG, 4.0, 1),
    }
    meta = {"model": model, "model_uri": "models:/m/1", "prompt_format": "chat", "rows": 16, "partitions": 2,
            "parameters": {"matmul": 10**8}, "prompt_tokens": {"min": 50, "max": 400, "mean": 187.5},
            "prompt_tokens_long_instruction": {"min": 170, "max": 520, "mean": 307.5}}
    return model_entry(meta, results, MACHINE)


def test_a_over_b_is_taken_against_the_fastest_batch_size():
    entry = _entry()
    assert entry["mlflow_batch_sizes"]["best_batch_size"] == 8
    assert entry["ratios"]["vs_mlflow_spark_udf"] == pytest.approx(6.0 / 4.0)
    assert entry["mlflow_batch_sizes"]["apply_over"] == pytest.approx({1: 3.0, 8: 1.5, 16: 2.0})
    assert entry["ratios"]["long_vs_bare_engine"] == pytest.approx(4.0 / 5.0)
    # Variants are listed in the report's order, (b)'s batch sizes after (b).
    assert list(entry["variants"]) == [APPLY, MLFLOW, mlflow_variant(8), mlflow_variant(16), PIPELINE, ENGINE,
                                       APPLY_LONG, ENGINE_LONG]


def test_roofline_per_engine_variant_against_its_own_layout():
    entry = _entry()
    assert set(entry["roofline"]) == {APPLY, ENGINE, APPLY_LONG, ENGINE_LONG}
    apply, engine = entry["roofline"][APPLY], entry["roofline"][ENGINE]
    # (a): 3,000 prompt tokens and 2 x 32 steps at the two workers' summed roof.
    assert apply["ideal_seconds"] == pytest.approx(2 * 10**8 * 3_000 / (200 * GB) + 64 * 4 * 10**8 / (20 * GB))
    assert engine["ideal_seconds"] == pytest.approx(2 * 10**8 * 3_000 / (180 * GB) + 32 * 4 * 10**8 / (18 * GB))
    assert entry["targets"]["roofline_apply_instruction"]["value"] == pytest.approx(apply["efficiency"])
    assert entry["mfu"][APPLY] == pytest.approx(2 * 10**8 * 3_512 / 4.0 / (200 * GB))


def test_markdown_shows_every_variant_and_the_roofline():
    report = {"generated_at": "now", "wall_seconds": 1.0, "spark_master": "local[2]",
              "settings": {"max_new_tokens": 32, "seed": 0, "token_budget": 16384, "max_batch_rows": 64},
              "machine": MACHINE, "models": [_entry(), _entry("tiny")]}
    text = markdown(report)
    for label in ("(b) mlflow spark_udf, batch_size 16", "(a) apply_instruction, long instruction",
                  "(d) bare engine, long instruction", "roofline_apply_instruction", "fp32, 2 processes × 1 thread"):
        assert label in text
    assert "ratios of (a) are taken over the fastest, batch_size 8" in text


def test_replay_gives_each_micro_batch_its_worker_rows_prompt_tokens_and_steps():
    config = EngineConfig(token_budget=16384, max_batch_rows=3)
    rows = [RowTokens(0, 10, 8, "length"), RowTokens(0, 20, 3, "stop"), RowTokens(0, 30, 5, "stop"),
            RowTokens(0, 40, 2, "stop"), RowTokens(1, 50, 7, "stop")]
    stats, work = replay(rows, 8, config, arrow_batch_rows=1024)
    # Partition 0's rows, longest first, in micro-batches of at most 3 rows; partition 1 alone.
    assert work == [MicroBatch(0, 3, 90, 5), MicroBatch(0, 1, 10, 8), MicroBatch(1, 1, 50, 7)]
    assert sum(b.rows * b.steps for b in work) == stats.generated_slots
    assert [(b.rows, b.prompt_tokens) for b in work] == [(3, 90), (1, 10), (1, 50)]
