"""python -m benchmarks.choices_engines [--rows 40]

``choices`` on both engines, side by side in one process, on the demo model in fp32: the seven
triage labels scored over the package's sample tickets, first by the "hf" engine's scorer (one
prefill per row, then the labels' tokens), then by the "vllm" engine (each row's prompt once, its
cached blocks serving every label's tokens). Prints and writes
benchmarks/results/choices_engines.json: seconds and rows/s of each (after a warm-up row), their
ratio, and the largest difference between their probabilities.
"""
from __future__ import annotations

import argparse
import json
import time
from typing import Sequence

from benchmarks.run_all import RESULTS_DIR


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.choices_engines", description=__doc__.split("\n\n")[1])
    parser.add_argument("--rows", type=int, default=40, help="sample tickets scored (at most 40)")
    args = parser.parse_args(argv)
    from benchmarks.machine import cpu_model
    from dolly_spark.batch.demo import TRIAGE_INSTRUCTION, TRIAGE_LABELS, demo_checkpoint, sample_tickets
    from dolly_spark.inference.engines import EngineConfig, Rows, engine_class
    from dolly_spark.request import Request

    bodies = [ticket["body"] for ticket in sample_tickets()][: args.rows]
    rows = Rows([TRIAGE_INSTRUCTION] * len(bodies), bodies)
    request = Request(choices=tuple(TRIAGE_LABELS))
    report: dict = {"cpu": cpu_model(), "rows": len(bodies), "choices": len(TRIAGE_LABELS)}
    probabilities = {}
    for name in ("hf", "vllm"):
        started = time.perf_counter()
        engine = engine_class(name).from_pretrained(str(demo_checkpoint()), prompt_format="chat",
                                                    config=EngineConfig(engine=name, dtype="float32"))
        load = time.perf_counter() - started
        engine.run(Rows(rows.instructions[:1], rows.contexts[:1]), request)  # warm-up
        started = time.perf_counter()
        results = engine.run(rows, request)
        seconds = time.perf_counter() - started
        probabilities[name] = [result.choice_probabilities for result in results]
        report[name] = {"load_seconds": round(load, 1), "seconds": round(seconds, 2),
                        "rows_per_second": round(len(bodies) / seconds, 2)}
        if hasattr(engine, "close"):
            engine.close()
    report["vllm_over_hf_seconds"] = round(report["vllm"]["seconds"] / report["hf"]["seconds"], 2)
    report["max_probability_difference"] = max(abs(a - b) for ours, theirs in zip(probabilities["hf"],
                                                                                     probabilities["vllm"])
                                               for a, b in zip(ours, theirs))
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "choices_engines.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
