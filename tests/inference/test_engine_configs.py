"""An engine setting never changes what a row gets: one request under two very different engine
configurations (a token budget far under one prompt against a large one, one row per micro-batch
against many, continuous against static batching, prefill groups and prefix reuse on and off)
gives equal answers and equal errors, row for row, in fp32 on the CPU, where arithmetic cannot
explain a difference. The "vllm" engine's side of this is in ``test_vllm_engine``."""
from __future__ import annotations

from dataclasses import asdict

import pytest

from dolly_spark.inference.engine import InstructionEngine
from dolly_spark.inference.engines import EngineConfig, Rows
from dolly_spark.request import Request

# Far apart on every field of EngineConfig that decides how rows run. The small budget is under
# any one prompt here, so each row runs in a micro-batch of its own.
SMALL = EngineConfig(engine="hf", token_budget=16, max_batch_rows=1, min_length_ratio=0.0, strategy="continuous",
                     reuse_prefix=False, dtype="float32")
LARGE = EngineConfig(engine="hf", token_budget=100_000, max_batch_rows=64, min_length_ratio=0.75, strategy="static",
                     reuse_prefix=True, dtype="float32")
LONG_INPUT = "The printer jams on every page and the paper tray is stuck. " * 30
ROWS = Rows(
    ["Summarize the ticket.", "What is the customer asking for?", "Summarize the ticket.", None,
     "Which team should handle this? " * 12, "Summarize the ticket."],
    ["The printer jams on every page.", "My order never arrived; please refund it.", LONG_INPUT, "x",
     "The invoice charged me twice.", "   "],
    ["T-1", "T-2", "T-3", "T-4", "T-5", "T-6"],
)
REQUESTS = {
    "generated": Request(max_new_tokens=12, max_input_tokens=160),
    "refusing": Request(max_new_tokens=12, max_input_tokens=160, on_overlong="error"),
    "choices": Request(max_new_tokens=12, max_input_tokens=160, choices=("billing", "shipping", "ship")),
}


def answers(engine, request: Request) -> tuple[list[dict], list[list[float]]]:
    """Each row's result without its probabilities, and the probabilities apart: batches of other
    shapes pad and sum in another order, so these may differ in their last bits."""
    rows = [asdict(result) for result in engine.run(ROWS, request)]
    probabilities = [row.pop("choice_probabilities") or [] for row in rows]
    for row in rows:
        row.pop("label_probability")
    return rows, probabilities


@pytest.mark.parametrize("name", list(REQUESTS))
def test_two_engine_configurations_give_every_row_the_same_result(tiny_model, name):
    model, tokenizer = tiny_model
    request = REQUESTS[name]
    small, large = (InstructionEngine(model, tokenizer, "dolly", config) for config in (SMALL, LARGE))
    got, probabilities = answers(small, request)
    expected, expected_probabilities = answers(large, request)
    assert got == expected
    for row, expected_row in zip(probabilities, expected_probabilities):
        assert row == pytest.approx(expected_row, abs=1e-5)
    batches = small.stats.micro_batches + small.stats.choice_batches
    assert len(batches) >= 3 and all(rows == 1 for rows, _ in batches)  # each row alone, none refused for it
    errors = [row["error"] for row in got]
    assert errors[3].startswith("instruction is null")
    # The long input is cut to max_input_tokens (or refused for it), whatever the budget.
    assert got[2]["truncated"] or errors[2].startswith("prompt has ")
    assert sum(error is None for error in errors) >= 3
