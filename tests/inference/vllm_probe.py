"""Runs the rows and requests of ``test_vllm_engine`` through the "vllm" engine in a process of its
own and writes every result as JSON: ``python vllm_probe.py OUT DOLLY_MODEL_DIR CHAT_MODEL_DIR``
(a checkpoint, or a registered version's files as executors fetch them).
Then it prints ``ready`` and waits on its standard input, its vLLM engines still loaded, so that the
test can kill it and see their engine processes go with it.

A process of its own because importing vLLM sets process-wide things (threads, random
generators) the rest of the test session must not inherit. The test process compares these
results with the "hf" engine's, computed in the test process on the same checkpoints.

The Dolly model's engine runs under a configuration far from the defaults (``SMALL``: one row
at a time, a token budget under any prompt), the chat model's under the defaults; the test
compares both with the "hf" engine under its defaults. After vLLM has run the GPT-NeoX
checkpoint, the "hf" engine runs it in this same process; and on the chat model, one batch has
vLLM raise on one row (a failure injected into vLLM's ``generate`` for that row's prompt).
Two vLLM loads in all: each spawns an engine process and a worker process that import vLLM
anew, about 25 s here.
"""
from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict

# Enums as the Spark layer writes them: a required one, and a nullable one whose values include null.
SCHEMA = json.dumps({"type": "object", "properties": {
    "topic": {"type": "string", "enum": ["billing", "shipping", "hardware"]},
    "urgency": {"type": ["string", "null"], "enum": ["low", "medium", "high", None]}},
    "required": ["topic", "urgency"], "additionalProperties": False})
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

# name -> Request settings.
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


# The requests the Dolly model runs: a sampled row's seed follows its key whatever the model, and
# in batches of one row its position could not matter, so the sampled requests run on the chat
# model only.
UNSAMPLED = tuple(name for name in REQUESTS if not name.startswith("sampled"))


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


# How the Dolly model's configuration differs from the defaults: one row at a time, a token
# budget under any prompt.
SMALL = {"token_budget": 16, "max_batch_rows": 1}


def engine_process_ids() -> list[int]:
    """The pids of this process's children: vLLM's engine processes."""
    from pathlib import Path

    children = Path(f"/proc/self/task/{os.getpid()}/children").read_text().split()
    return [int(pid) for pid in children]


def one_row_failing(engine) -> list[dict]:
    """The greedy request, with vLLM raising on any batch that holds row T-2's prompt."""
    from dolly_spark.request import Request

    request = Request(**REQUESTS["greedy"])
    poisoned = engine.rows.encode_answers(request, tuple(rows()))[1][1].ids
    generate = engine._generate

    def failing(prompts, sampling):
        if any(ids == poisoned for ids in prompts):
            raise ValueError("vLLM could not process this prompt")
        return generate(prompts, sampling)

    engine._generate = failing
    try:
        return [asdict(r) for r in engine.run(rows(), request)]
    finally:
        engine._generate = generate


def load(engine: str, model_dir: str, **settings):
    """The ``engine`` engine for a checkpoint or a registered version's files (an MLflow model
    directory, as executors fetch it: its tokenizer apart from its weights), in fp32."""
    from dolly_spark.inference.engines import EngineConfig, engine_class
    from dolly_spark.lifecycle.loader import checkpoint_paths

    weights, tokenizer = checkpoint_paths(model_dir)
    config = EngineConfig(engine=engine, dtype="float32", **settings)
    return engine_class(engine).from_pretrained(weights, tokenizer_path=tokenizer, config=config)


def main(out: str, dolly: str, chat: str) -> None:
    report, engines = {}, {}  # the engines stay loaded, and their processes alive, until the end
    for model_dir, settings, names in ((dolly, SMALL, UNSAMPLED), (chat, {}, tuple(REQUESTS))):
        engine = engines[model_dir] = load("vllm", model_dir, **settings)
        report[model_dir] = {"engine": type(engine).__name__, "device": str(engine.device), "settings": settings,
                             "answers": run_all(engine, names)}
    report[chat]["one_row_failing"] = one_row_failing(engines[chat])
    # The "hf" engine on the GPT-NeoX checkpoint vLLM has run in this process.
    report[dolly]["hf_after_vllm"] = run_all(load("hf", dolly), ("greedy",))
    report["engine_processes"] = engine_process_ids()
    with open(out, "w", encoding="utf-8") as handle:
        json.dump(report, handle)
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes it, or kills this process


if __name__ == "__main__":
    main(*sys.argv[1:4])
