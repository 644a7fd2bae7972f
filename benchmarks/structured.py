"""python -m benchmarks.structured [--model demo|tiny] [--max-new-tokens 64]

Structured answers on the demo model, with the bare engine (no Spark), on the same rows:
- accuracy of ``choices`` (scored) against free generation plus string matching, on the
  package's sample tickets and their hand-written expected labels (the triage labels);
- accuracy on the dolly sample's ``classification`` records whose reference is one of a fixed
  set named in the instruction ("Which is a species of fish? Tope or Rope", "Identify which
  instrument is string or percussion: Kpanlogo, Shamisen"), one row per item;
- rows/s of ``choices``, of ``schema`` (the triage fields) and of free generation over the
  sample tickets.
Writes benchmarks/results/structured.md and structured.json.
"""
from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from benchmarks.report import write_results
from benchmarks.run_all import RESULTS_DIR

log = logging.getLogger("benchmarks.structured")
DOLLY_SAMPLE = Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly15k_sample.jsonl"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.structured", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--max-new-tokens", type=int, default=64, help="for free generation and schema answers")
    parser.add_argument("--dolly-sample", type=Path, default=DOLLY_SAMPLE, help="the dolly-15k sample (JSONL)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where structured.md and .json go")
    return parser.parse_args(argv)


def matched_label(text: str | None, labels: Sequence[str]) -> str | None:
    """The label a free answer names first (longest labels tried first at each position, whole
    words, any case); None when it names none."""
    if not text:
        return None
    pattern = "|".join(re.escape(label) for label in sorted(labels, key=len, reverse=True))
    found = re.search(rf"\b({pattern})\b", text, re.IGNORECASE)
    return next(label for label in labels if label.lower() == found.group(1).lower()) if found else None


def dolly_items(path: Path) -> list[dict[str, Any]]:
    """The dolly sample's classification records whose reference is one of a fixed set of labels
    the instruction names, one item each: {"instruction", "choices", "label"}."""
    items = []
    for line in path.read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        if record["category"] != "classification":
            continue
        instruction, response = record["instruction"].strip(), record["response"].strip().rstrip(".")
        either = re.fullmatch(r"(.*\?)\s*(.+?) or (.+?)", instruction)
        if either and response in either.group(2, 3):
            items.append({"instruction": instruction, "choices": list(either.group(2, 3)), "label": response})
            continue
        # "Identify which <thing> is <a> or <b>: X, Y" answered "Y is <a>, X is <b>."
        which = re.fullmatch(r"(Identify which .+?) is (\w+) or (\w+): (.+)", instruction)
        if not which:
            continue
        labels = list(which.group(2, 3))
        answers = dict(re.findall(rf"([^,]+?) is ({'|'.join(labels)})", response))
        for item in (part.strip() for part in which.group(4).split(",")):
            if answers.get(item) in labels:
                items.append({"instruction": f"{which.group(1)} is {labels[0]} or {labels[1]}: {item}",
                              "choices": labels, "label": answers[item]})
    return items


def timed(run, instructions: list[str], contexts: list[str | None]) -> tuple[list, float]:
    """``run(instructions, contexts)``'s results and seconds."""
    started = time.perf_counter()
    results = run(instructions, contexts)
    return results, time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    import dataclasses

    from benchmarks.machine import cpu_model
    from dolly_spark.batch.demo import (DEMO_REPETITION_CONTROL, TRIAGE_FIELDS, TRIAGE_INSTRUCTION, TRIAGE_LABELS,
                                  TRIAGE_SCHEMA, demo_checkpoint, sample_labels, sample_tickets)
    from dolly_spark.inference.engine import InstructionEngine
    from dolly_spark.inference.engines import Rows
    from dolly_spark.request import Request
    from dolly_spark.prompts import choice_instruction
    from dolly_spark.spark.structured import json_schema

    checkpoint = str(demo_checkpoint())
    # The repetition control the demo model is registered with, as the jobs run it.
    base = Request(max_new_tokens=args.max_new_tokens, **DEMO_REPETITION_CONTROL)
    engine = InstructionEngine.from_pretrained(checkpoint, prompt_format="chat")
    tickets = sample_tickets()
    expected = sample_labels()
    bodies = [ticket["body"] for ticket in tickets]
    gold = [expected[ticket["ticket_id"]] for ticket in tickets]
    instructions = [TRIAGE_INSTRUCTION] * len(tickets)

    def runner(**settings):
        """Runs rows through the engine with the base request changed by ``settings``."""
        request = dataclasses.replace(base, **settings)
        return lambda instructions, contexts=None: engine.run(Rows(instructions, contexts), request)

    free_run = runner()
    # One row first, so no mode pays for the first call's one-off costs in its timing.
    free_run([TRIAGE_INSTRUCTION], bodies[:1])
    log.info("free generation, %d tickets", len(tickets))
    free, free_seconds = timed(free_run, [choice_instruction(TRIAGE_INSTRUCTION, TRIAGE_LABELS)] * len(tickets), bodies)
    log.info("choices")
    scored, choice_seconds = timed(runner(choices=tuple(TRIAGE_LABELS)), instructions, bodies)
    log.info("schema")
    schema_text = json.dumps(json_schema(TRIAGE_FIELDS))
    extracted, schema_seconds = timed(runner(json_schema=schema_text), instructions, bodies)

    free_labels = [matched_label(result.response, TRIAGE_LABELS) for result in free]
    tickets_report = {
        "rows": len(tickets),
        "choices_accuracy": sum(r.label == g for r, g in zip(scored, gold)) / len(gold),
        "free_generation_accuracy": sum(label == g for label, g in zip(free_labels, gold)) / len(gold),
        "free_generation_unmatched": sum(label is None for label in free_labels),
        "schema_parsed": sum(r.error is None for r in extracted),
        "rows_per_second": {"choices": len(tickets) / choice_seconds, "schema": len(tickets) / schema_seconds,
                            "free_generation": len(tickets) / free_seconds},
        # The answers differ in length, so the grammar's cost shows per generated token.
        "generated_tokens": {"schema": sum(r.completion_tokens for r in extracted),
                             "free_generation": sum(r.completion_tokens for r in free)},
        "seconds": {"choices": choice_seconds, "schema": schema_seconds, "free_generation": free_seconds},
        "answers": [{"ticket_id": t["ticket_id"], "expected": g, "choices": r.label,
                     "probability": round(r.label_probability, 3), "free": f.response, "free_label": fl,
                     "schema": x.response, "schema_error": x.error}
                    for t, g, r, f, fl, x in zip(tickets, gold, scored, free, free_labels, extracted)],
    }

    items = dolly_items(args.dolly_sample) if args.dolly_sample.exists() else []
    dolly_report: dict[str, Any] = {"items": len(items)}
    if items:
        log.info("dolly classification items: %d", len(items))
        scored_items = [runner(choices=tuple(item["choices"]))([item["instruction"]])[0] for item in items]
        free_items = [free_run([choice_instruction(item["instruction"], item["choices"])])[0] for item in items]
        dolly_report.update({
            "choices_accuracy": sum(r.label == i["label"] for r, i in zip(scored_items, items)) / len(items),
            "free_generation_accuracy": sum(matched_label(r.response, i["choices"]) == i["label"]
                                            for r, i in zip(free_items, items)) / len(items),
            "answers": [{**item, "choices_label": r.label, "free": f.response}
                        for item, r, f in zip(items, scored_items, free_items)],
        })

    report = {"generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_model(),
              "model": checkpoint, "max_new_tokens": args.max_new_tokens, "triage_labels": TRIAGE_LABELS,
              "triage_schema": TRIAGE_SCHEMA, "sample_tickets": tickets_report, "dolly_classification": dolly_report}
    text = markdown(report)
    write_results(args.out_dir, "structured", report, text)
    print(text)
    return 0


def markdown(report: dict[str, Any]) -> str:
    tickets, dolly = report["sample_tickets"], report["dolly_classification"]
    speed = tickets["rows_per_second"]
    lines = [f"# Structured answers ({report['generated_at']})", "",
             f"Demo model (SmolLM2-135M-Instruct, chat format, fp32, its registered repetition control), bare engine, "
             f"{report['cpu']}; free generation and schema answers up to {report['max_new_tokens']} new tokens, "
             "greedy. Free generation is told the labels the same way (`choice_instruction`).", "",
             "| rows | labelled by | accuracy | free generation + string match | no label found in the free answer |",
             "|---|---|---:|---:|---:|",
             f"| {tickets['rows']} sample tickets | `choices` (scored) | {tickets['choices_accuracy']:.1%} | "
             f"{tickets['free_generation_accuracy']:.1%} | {tickets['free_generation_unmatched']} |"]
    if dolly["items"]:
        lines.append(f"| {dolly['items']} dolly classification items | `choices` (scored) | "
                     f"{dolly['choices_accuracy']:.1%} | {dolly['free_generation_accuracy']:.1%} | |")
    lines += ["", f"Schema answers that parsed: {tickets['schema_parsed']} of {tickets['rows']}.", "",
              "| mode | rows/s | over free generation |", "|---|---:|---:|"]
    for mode in ("choices", "schema", "free_generation"):
        lines.append(f"| {mode} | {speed[mode]:.2f} | {speed[mode] / speed['free_generation']:.2f}x |")
    tokens, seconds = tickets["generated_tokens"], tickets["seconds"]
    per_token = {mode: seconds[mode] / max(tokens[mode], 1) * 1000 for mode in tokens}
    lines += ["", f"Per generated token (prompts included): schema {per_token['schema']:.1f} ms over "
              f"{tokens['schema']} tokens, free generation {per_token['free_generation']:.1f} ms over "
              f"{tokens['free_generation']} tokens ({per_token['schema'] / per_token['free_generation']:.2f}x)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
