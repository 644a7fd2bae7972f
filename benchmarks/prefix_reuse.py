"""python -m benchmarks.prefix_reuse [--rows 32] [--max-new-tokens 32] [--repeats 2]

The shared prompt prefix prefilled once per micro-batch, against every row prefilled whole: the
bare engine on the demo model (SmolLM2-135M-Instruct, chat format), the benchmark's tickets, with
the workload's instruction and with its long (about 150-token) one. Reports prompt tokens, the
tokens served from the shared prefix, seconds (the best of ``--repeats`` runs, after a warm-up)
and rows/s, and checks that the answers are identical. Runs in one process, one setting after
the other, on the same model.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.workload import INSTRUCTION, LONG_INSTRUCTION, generate_tickets
from dolly_spark.inference.engine import InstructionEngine
from dolly_spark.inference.engines import EngineConfig, Rows
from dolly_spark.request import Request


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/prefix_reuse.json"))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dolly_spark.batch.demo import demo_checkpoint

    path = demo_checkpoint()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    bodies = [body for _, body in generate_tickets(args.rows, seed=0)]
    warm = [body for _, body in generate_tickets(4, seed=1)]
    report: dict = {"rows": args.rows, "max_new_tokens": args.max_new_tokens, "runs": {}}
    for label, instruction in (("workload instruction", INSTRUCTION), ("long instruction", LONG_INSTRUCTION)):
        answers = {}
        for reuse in (True, False):
            engine = InstructionEngine(model, tokenizer, "chat", EngineConfig(reuse_prefix=reuse))
            request = Request(max_new_tokens=args.max_new_tokens, require_input=True)
            engine.run(Rows([instruction] * len(warm), warm), request)
            best = float("inf")
            for _ in range(args.repeats):
                engine.stats.__init__()
                started = time.perf_counter()
                results = engine.run(Rows([instruction] * len(bodies), bodies), request)
                best = min(best, time.perf_counter() - started)
            answers[reuse] = [r.response for r in results]
            report["runs"][f"{label}, reuse {'on' if reuse else 'off'}"] = entry = {
                "seconds": best, "rows_per_second": len(bodies) / best,
                "prompt_tokens": engine.stats.prompt_tokens, "reused_prefix_tokens": engine.stats.reused_prefix_tokens,
            }
            print(f"{label:<22} reuse {'on ' if reuse else 'off'}  {best:6.2f} s  {entry['rows_per_second']:5.2f} rows/s  "
                  f"prompt tokens {entry['prompt_tokens']}, from the shared prefix {entry['reused_prefix_tokens']}",
                  flush=True)
        on, off = (report["runs"][f"{label}, reuse {state}"] for state in ("on", "off"))
        report["runs"][f"{label}, gain"] = gain = {"rows_per_second_ratio": on["rows_per_second"] / off["rows_per_second"],
                                                  "answers_identical": answers[True] == answers[False]}
        print(f"{label:<22} gain {gain['rows_per_second_ratio']:.2f}x, answers identical: {gain['answers_identical']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
