"""Roofline figures of one timed run: the time the machine's measured limits allow, over the time taken.

Pure arithmetic on counts and measured rates (standard library only), so it is tested without
Spark or a model. benchmarks/README.md ("Roofline efficiency") gives the formula and says how the
two Spark workers of apply_instruction are combined.

- Prefill is compute-bound: its ideal time is its matmul FLOPs, 2 x matmul parameters x prompt
  tokens, at the measured matmul peak.
- Decoding is memory-bound: every decoding step of a micro-batch reads every weight once,
  whatever its row count, so its ideal time is the weight bytes (matmul parameters x bytes per
  element) at the measured read bandwidth. A micro-batch whose longest answer took n tokens ran
  n steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

BYTES_PER_ELEMENT = {"fp32": 4, "bf16": 2}


@dataclass(frozen=True)
class Roof:
    """A thread layout's measured limits in one precision."""

    peak_flops: float  # matmul FLOP/s
    bandwidth: float  # sustained weight-read bytes/s

    def ridge_rows(self, precision: str) -> float:
        """Rows per decoding step above which a step's matmul FLOPs (2 x params x rows) take
        longer at the peak than reading its weights at the bandwidth; below it, the memory term
        alone is the step's roofline time."""
        return self.peak_flops * BYTES_PER_ELEMENT[precision] / (2.0 * self.bandwidth)


@dataclass(frozen=True)
class MicroBatch:
    """What one micro-batch did: which worker ran it, its rows, their real prompt tokens, and
    its decoding steps (its longest answer in tokens, the stop token included)."""

    worker: int
    rows: int
    prompt_tokens: int
    steps: int


def ideal_seconds(matmul_params: int, precision: str, prompt_tokens: int, steps: int, roof: Roof) -> dict[str, float]:
    """Ideal prefill, decode and total seconds of a run that prefilled ``prompt_tokens`` real
    tokens and ran ``steps`` decoding steps, on ``roof``."""
    prefill = 2.0 * matmul_params * prompt_tokens / roof.peak_flops
    decode = steps * matmul_params * BYTES_PER_ELEMENT[precision] / roof.bandwidth
    return {"prefill": prefill, "decode": decode, "total": prefill + decode}


def _ideal(matmul_params: int, precision: str, batches: Iterable[MicroBatch], roof: Roof) -> dict[str, Any]:
    batches = list(batches)
    prompt_tokens = sum(b.prompt_tokens for b in batches)
    steps = sum(b.steps for b in batches)
    return {"prompt_tokens": prompt_tokens, "decode_steps": steps,
            **ideal_seconds(matmul_params, precision, prompt_tokens, steps, roof)}


def roofline(matmul_params: int, precision: str, roof: Roof, seconds: float, micro_batches: Sequence[MicroBatch],
             phases: dict[str, Any] | None = None) -> dict[str, Any]:
    """The roofline figures of one run of ``seconds``.

    Workers run at the same time and ``roof`` is the limits of all of them together (measured
    at once), so the ideal time is all the work at the summed rates: the sum of each worker's
    ideal time at its share of the rates (1 / workers), over the number of workers. A worker
    with more work than the other makes the run slower than that, and the efficiency shows it;
    ``worker_imbalance`` (the slowest worker's ideal time over their mean) says how much of the
    gap the partitioning explains.

    ``phases`` (optional): ``prefill_seconds`` and ``prefill_tokens`` (the same rows again with
    max_new_tokens=1: prefill and the first token) and ``decode_seconds`` (the rest of the run),
    for the prefill MFU and the decode bandwidth utilization. The first token's step belongs to
    the prefill run, so the decode phase ran each micro-batch's steps but one.
    """
    whole = _ideal(matmul_params, precision, micro_batches, roof)
    weight_bytes = matmul_params * BYTES_PER_ELEMENT[precision]
    figures: dict[str, Any] = {
        "precision": precision, "weight_bytes": weight_bytes,
        "peak_flops": roof.peak_flops, "bandwidth": roof.bandwidth,
        "prompt_tokens": whole["prompt_tokens"], "decode_steps": whole["decode_steps"],
        "micro_batches": len(micro_batches),
        "max_rows_per_step": max((b.rows for b in micro_batches), default=0),
        "ridge_rows": roof.ridge_rows(precision),
        "ideal_prefill_seconds": whole["prefill"], "ideal_decode_seconds": whole["decode"],
        "ideal_seconds": whole["total"], "seconds": seconds, "efficiency": whole["total"] / seconds,
    }
    workers = sorted({b.worker for b in micro_batches})
    if len(workers) > 1:
        share = Roof(roof.peak_flops / len(workers), roof.bandwidth / len(workers))
        per_worker = [_ideal(matmul_params, precision, (b for b in micro_batches if b.worker == w), share)
                      for w in workers]
        figures["per_worker_ideal_seconds"] = [w["total"] for w in per_worker]
        mean = sum(figures["per_worker_ideal_seconds"]) / len(workers)
        figures["worker_imbalance"] = max(figures["per_worker_ideal_seconds"]) / mean if mean else None
    if phases:
        after_first = sum(max(b.steps - 1, 0) for b in micro_batches)
        figures["prefill_mfu"] = (2.0 * matmul_params * phases["prefill_tokens"] / phases["prefill_seconds"]
                                  / roof.peak_flops)
        figures["decode_steps_after_first_token"] = after_first
        figures["decode_bandwidth_utilization"] = (
            after_first * weight_bytes / phases["decode_seconds"] / roof.bandwidth
            if phases["decode_seconds"] > 0 else None)
    return figures
