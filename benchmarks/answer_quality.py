"""python -m benchmarks.answer_quality [--records 139] [--max-new-tokens 96] [--variants ...] [--dtypes float32,bfloat16]

Answer quality of the demo model (SmolLM2-135M-Instruct, chat format) through the bare engine,
greedy, on the dolly sample (``../shared/data/dolly15k_sample.jsonl``): ROUGE-L against its
references with repetition control off and with a few settings of ``repetition_penalty`` and
``no_repeat_ngram_size`` (how the demo's defaults were chosen), plus the answers to two prompts
that loop without control. With two ``--dtypes``, every variant runs in each, and the report
adds the share of rows whose answer is identical across them and the ROUGE-L between the two
answers: the evidence for a bf16 default on CPUs with native bf16 matmul (AMX). Prints a table
and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dolly_spark.inference.devices import parse_dtype
from dolly_spark.inference.engine import InstructionEngine
from dolly_spark.inference.engines import Rows
from dolly_spark.request import Request
from dolly_spark.training.metrics import paired_bootstrap, rouge_l

SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly15k_sample.jsonl"
VARIANTS = {
    "off": {},
    "penalty 1.1": {"repetition_penalty": 1.1},
    "ngram 4": {"no_repeat_ngram_size": 4},
    "ngram 3": {"no_repeat_ngram_size": 3},
    "penalty 1.1 + ngram 4": {"repetition_penalty": 1.1, "no_repeat_ngram_size": 4},
    "penalty 1.2": {"repetition_penalty": 1.2},
}
LOOPS = [
    ("What is a serverless DBSQL warehouse, and how is it different from a pro or classic warehouse?", None),
    ("Write a tweet announcing our new data platform.", None),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    parser.add_argument("--records", type=int, default=139)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--dtypes", default="float32", help="one dtype, or two to compare answers across")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/answer_quality.json"))
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dolly_spark.batch.demo import demo_checkpoint

    path = demo_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    records = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    records = records[: args.records]
    dtypes = args.dtypes.split(",")
    report = {"records": len(records), "max_new_tokens": args.max_new_tokens, "dtypes": dtypes, "variants": {}}
    answers: dict[tuple[str, str], list[str | None]] = {}
    scored: dict[tuple[str, str], list[float]] = {}
    for dtype in dtypes:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(dtype)).eval()
        for name in args.variants.split(","):
            request = Request(max_new_tokens=args.max_new_tokens, **VARIANTS[name])
            engine = InstructionEngine(model, tokenizer, "chat")
            started = time.perf_counter()
            results = engine.run(Rows([r["instruction"] for r in records], [r.get("context") for r in records]), request)
            answers[dtype, name] = [result.response for result in results]
            scores = [rouge_l(result.response, record["response"]) for result, record in zip(results, records)]
            scored[dtype, name] = scores
            loops = engine.run(Rows([i for i, _ in LOOPS], [c for _, c in LOOPS]), request)
            label = name if len(dtypes) == 1 else f"{name} [{dtype}]"
            report["variants"][label] = entry = {
                "settings": VARIANTS[name], "dtype": dtype, "rouge_l": sum(scores) / len(scores),
                "hit_max_new_tokens": sum(r.finish_reason == "length" for r in results),
                "seconds": time.perf_counter() - started,
                "loop_prompts": [r.response for r in loops],
            }
            print(f"{label:<34} ROUGE-L {entry['rouge_l']:.4f}  hit max_new_tokens {entry['hit_max_new_tokens']:>3}/"
                  f"{len(records)}  {entry['seconds']:.0f} s", flush=True)
    if len(dtypes) == 2:
        report["across_dtypes"] = {}
        for name in args.variants.split(","):
            first, second = answers[dtypes[0], name], answers[dtypes[1], name]
            # The second precision's ROUGE-L against the references minus the first's, record by
            # record, with its 95% paired bootstrap interval: an interval around 0 is noise.
            gain, low, high = paired_bootstrap(scored[dtypes[0], name], scored[dtypes[1], name])
            report["across_dtypes"][name] = across = {
                "identical_share": sum(a == b for a, b in zip(first, second)) / len(first),
                "rouge_l_between": sum(rouge_l(a, b) for a, b in zip(first, second)) / len(first),
                "rouge_l_difference": gain, "rouge_l_difference_low": low, "rouge_l_difference_high": high,
            }
            print(f"{name}: {across['identical_share']:.0%} identical in {dtypes[0]} and {dtypes[1]}, "
                  f"ROUGE-L between them {across['rouge_l_between']:.4f}; ROUGE-L against the references "
                  f"{dtypes[1]} minus {dtypes[0]} {gain:+.4f} (95% interval {low:+.4f} to {high:+.4f})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    for name, entry in report["variants"].items():
        print(f"--- {name}")
        for (prompt, _), answer in zip(LOOPS, entry["loop_prompts"]):
            print(f"  {prompt}\n    -> {answer!r}")


if __name__ == "__main__":
    main()
