"""The benchmark's roofline arithmetic, machine figures and report, on given counts: no Spark, no model."""
from __future__ import annotations

import pytest

from benchmarks.machine import combine, layout_figures, read_bandwidth
from benchmarks.roofline import BYTES_PER_ELEMENT, MicroBatch, Roof, ideal_seconds, roofline

GB = 1e9


def test_ideal_time_is_prompt_flops_at_peak_plus_one_weight_read_per_step():
    roof = Roof(peak_flops=100 * GB, bandwidth=10 * GB)
    ideal = ideal_seconds(matmul_params=10**8, precision="fp32", prompt_tokens=5_000, steps=64, roof=roof)
    assert ideal["prefill"] == pytest.approx(2 * 10**8 * 5_000 / (100 * GB))  # 10 s
    assert ideal["decode"] == pytest.approx(64 * 4 * 10**8 / (10 * GB))  # 2.56 s
    assert ideal["total"] == pytest.approx(ideal["prefill"] + ideal["decode"])
    # bf16 reads half the bytes; the prefill term does not depend on the element size.
    bf16 = ideal_seconds(10**8, "bf16", 5_000, 64, roof)
    assert bf16["decode"] == pytest.approx(ideal["decode"] / 2)
    assert bf16["prefill"] == pytest.approx(ideal["prefill"])


def test_roofline_of_one_process_counts_every_micro_batch():
    roof = Roof(100 * GB, 10 * GB)
    batches = [MicroBatch(0, rows=16, prompt_tokens=3_000, steps=32),
               MicroBatch(0, rows=4, prompt_tokens=2_000, steps=10)]
    figures = roofline(10**8, "fp32", roof, seconds=10.0, micro_batches=batches)
    assert figures["prompt_tokens"] == 5_000
    assert figures["decode_steps"] == 42  # steps, not rows x steps: a step reads the weights once
    assert figures["ideal_seconds"] == pytest.approx(10.0 + 42 * 0.04)
    assert figures["efficiency"] == pytest.approx(figures["ideal_seconds"] / 10.0)
    assert figures["max_rows_per_step"] == 16 and figures["micro_batches"] == 2
    assert "worker_imbalance" not in figures and "prefill_mfu" not in figures


def test_two_workers_share_the_measured_roof_and_their_imbalance_is_reported():
    roof = Roof(200 * GB, 20 * GB)  # the two workers measured at once, summed
    batches = [MicroBatch(0, 16, 4_000, 32), MicroBatch(1, 16, 2_000, 32)]
    figures = roofline(10**8, "fp32", roof, seconds=8.0, micro_batches=batches)
    per_worker = [2 * 10**8 * tokens / (100 * GB) + 32 * 4 * 10**8 / (10 * GB) for tokens in (4_000, 2_000)]
    assert figures["per_worker_ideal_seconds"] == pytest.approx(per_worker)
    # All the work at the summed rates is the workers' ideal times at half the rates, over two.
    assert figures["ideal_seconds"] == pytest.approx(sum(per_worker) / 2)
    assert figures["worker_imbalance"] == pytest.approx(max(per_worker) / (sum(per_worker) / 2))


def test_phases_give_prefill_mfu_and_decode_bandwidth_use():
    roof = Roof(100 * GB, 10 * GB)
    batches = [MicroBatch(0, 8, 1_000, 11), MicroBatch(0, 8, 1_000, 1)]
    phases = {"prefill_seconds": 8.0, "prefill_tokens": 2_000, "decode_seconds": 0.8, "decode_tokens": 80}
    figures = roofline(10**8, "fp32", roof, seconds=8.8, micro_batches=batches, phases=phases)
    assert figures["prefill_mfu"] == pytest.approx(2 * 10**8 * 2_000 / 8.0 / (100 * GB))  # 0.5
    # The max_new_tokens=1 run took each micro-batch's first step: 10 + 0 steps are left.
    assert figures["decode_steps_after_first_token"] == 10
    assert figures["decode_bandwidth_utilization"] == pytest.approx(10 * 4 * 10**8 / 0.8 / (10 * GB))  # 0.5


def test_ridge_rows():
    roof = Roof(peak_flops=200 * GB, bandwidth=10 * GB)
    # fp32: a step with r rows does 2 * P * r FLOPs and reads 4 * P bytes; equal time at r = 40.
    assert roof.ridge_rows("fp32") == pytest.approx(40)
    assert roof.ridge_rows("bf16") == pytest.approx(20)
    assert BYTES_PER_ELEMENT == {"fp32": 4, "bf16": 2}


def test_combine_sums_processes_and_takes_the_faster_read_method():
    each = [{"fp32": {"peak_flops": 100.0, "matmul_size": 2048, "matvec": 8.0, "sum": 10.0}},
            {"fp32": {"peak_flops": 90.0, "matmul_size": 1024, "matvec": 7.0, "sum": 9.0}}]
    roofs = combine(each)
    assert roofs["fp32"]["peak_flops"] == 190.0
    assert roofs["fp32"]["bandwidth"] == 19.0 and roofs["fp32"]["bandwidth_matvec"] == 15.0
    assert roofs["fp32"]["bandwidth_sum"] == 19.0 and roofs["fp32"]["matmul_size"] == 1024
    assert roofs["fp32"]["each"] == [each[0]["fp32"], each[1]["fp32"]]
    assert "each" not in combine(each[:1])["fp32"]


def test_measured_figures_have_one_entry_per_precision_and_method():
    figures = layout_figures(1, ["fp32", "bf16"], size=256, seconds=0.02, bandwidth_seconds=0.02)
    assert set(figures) == {"fp32", "bf16"}
    for values in figures.values():
        assert set(values) == {"peak_flops", "matmul_size", "matvec", "sum"}
        assert values["peak_flops"] > 0 and values["matvec"] > 0 and values["sum"] > 0
    assert read_bandwidth("sum", seconds=0.01, mebibytes=4) > 0
