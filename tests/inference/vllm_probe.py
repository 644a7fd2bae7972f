"""Runs the rows and requests of ``test_vllm_engine`` through the "vllm" engine in a process of its
own and writes every result as JSON: ``python vllm_probe.py OUT MODEL_DIR...``.

A process of its own because loading vLLM changes the process that loads it: it rewires
transformers' model classes for the architectures it runs through transformers (GPT-NeoX here),
seeds the global random generators and binds threads. The test process compares these results
with the "hf" engine's, computed in the test process on the same checkpoints.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict

SCHEMA = json.dumps({"type": "object", "properties": {
    "topic": {"type": "string", "enum": ["billing", "shipping", "hardware"]}, "urgent": {"type": "boolean"}},
    "required": ["topic", "urgent"]})
LONG_INPUT = "The printer jams on every page and the paper tray is stuck. " * 30

# One row of every kind an engine must answer or refuse: ordinary inputs, a long one (truncated or
# refused by the request's limit), a null and a blank instruction, a null input.
ROWS = {
    "instructions": ["Summarize the ticket.", "What is the customer asking for?", "Summarize the ticket.", None, "  ",
                     "Summarize the ticket.", "Which team should handle this?"],
    "contexts": ["The printer jams on every page and the tray is stuck.", "My order never arrived; please refund it.",
                 LONG_INPUT, "x", "y", None, "The invoice charged me twice for one laptop."],
    "keys": ["T-1", "T-2", "T-3", "T-4", "T-5", "T-6", "T-7"],
}

# name -> Request settings; every one is run on every model.
REQUESTS = {
    "greedy": {"max_new_tokens": 24, "max_input_tokens": 96},
    "repetition": {"max_new_tokens": 24, "repetition_penalty": 1.3, "no_repeat_ngram_size": 3, "max_input_tokens": 96},
    "refuse_long": {"max_new_tokens": 8, "max_input_tokens": 96, "on_overlong": "error"},
    "require_input": {"max_new_tokens": 8, "require_input": True},
    "choices": {"max_new_tokens": 8, "choices": ["billing", "shipping", "ship"], "max_input_tokens": 256},
    "schema": {"max_new_tokens": 40, "json_schema": SCHEMA, "max_input_tokens": 96},
    "sampled": {"max_new_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 7, "max_input_tokens": 96},
    "sampled_other_seed": {"max_new_tokens": 12, "temperature": 0.9, "top_p": 0.95, "seed": 8, "max_input_tokens": 96},
}


def rows(reverse: bool = False):
    from dolly_spark.inference.engines import Rows

    columns = [list(ROWS[name]) for name in ("instructions", "contexts", "keys")]
    return Rows(*[column[::-1] if reverse else column for column in columns])


def run_all(engine, names=tuple(REQUESTS)) -> dict:
    """{request name: [result as a dict, per row]} for the requests ``names``, plus
    "sampled_reversed" when "sampled" is among them: the sampled request on the rows in reverse
    order (each row's seed follows its key, not its position)."""
    from dolly_spark.request import Request

    answers = {name: [asdict(r) for r in engine.run(rows(), Request(**REQUESTS[name]))] for name in names}
    if "sampled" in names:
        answers["sampled_reversed"] = [asdict(r) for r in engine.run(rows(reverse=True), Request(**REQUESTS["sampled"]))]
    return answers


def main(out: str, model_dirs: list[str]) -> None:
    from dolly_spark.inference.engines import EngineConfig, engine_class

    report = {}
    for model_dir in model_dirs:
        engine = engine_class("vllm").from_pretrained(model_dir, config=EngineConfig(engine="vllm", dtype="float32"))
        report[model_dir] = {"engine": type(engine).__name__, "device": str(engine.device), "answers": run_all(engine)}
        del engine
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(report, handle)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
