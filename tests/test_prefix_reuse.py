"""The prompt prefix every row shares is prefilled once per micro-batch, and greedy answers are
exactly those of prefilling every row whole: on GPT-NeoX (Dolly's architecture), on a Llama
with grouped-query attention, and on the demo model (SmolLM2, Llama, chat format)."""
from __future__ import annotations

import pytest

from benchmarks.workload import INSTRUCTION, LONG_INSTRUCTION, generate_tickets
from dolly_spark.engine import GenerationSettings, InstructionEngine

TICKETS = [body for _, body in generate_tickets(10, seed=3)]


def answers(model_and_tokenizer, prompt_format, instruction, reuse_prefix, **settings):
    engine = InstructionEngine(*model_and_tokenizer, prompt_format, GenerationSettings(
        reuse_prefix=reuse_prefix, token_budget=100_000, **settings))
    results = engine.run([instruction] * len(TICKETS), TICKETS, require_context=True)
    assert all(r.error is None or r.error.startswith("empty response") for r in results)
    return engine.stats, [(r.response, r.finish_reason, r.completion_tokens, r.prompt_tokens) for r in results]


@pytest.fixture(params=["gpt_neox", "llama"])
def model_and_tokenizer(request, tiny_model, tiny_llama):
    return tiny_model if request.param == "gpt_neox" else tiny_llama


@pytest.mark.parametrize("instruction", [INSTRUCTION, LONG_INSTRUCTION], ids=["short", "long"])
@pytest.mark.parametrize("min_length_ratio", [0.0, 0.75])
def test_greedy_answers_are_identical_with_prefix_reuse_on_and_off(model_and_tokenizer, instruction, min_length_ratio):
    reused, with_reuse = answers(model_and_tokenizer, "dolly", instruction, True,
                                 max_new_tokens=12, min_length_ratio=min_length_ratio)
    recomputed, without = answers(model_and_tokenizer, "dolly", instruction, False,
                                  max_new_tokens=12, min_length_ratio=min_length_ratio)
    assert with_reuse == without
    assert recomputed.reused_prefix_tokens == 0
    # One micro-batch of ten rows shares the template and the instruction: nine copies reused,
    # each at least as long as the instruction's own tokens.
    (rows, _), = reused.micro_batches
    assert rows == len(TICKETS)
    assert reused.reused_prefix_tokens >= (rows - 1) * len(instruction.split())


@pytest.mark.slow
def test_demo_model_answers_are_identical_with_prefix_reuse_on_and_off():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dolly_spark.demo import demo_checkpoint

    path = demo_checkpoint()
    model_and_tokenizer = (AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path))
    reused, with_reuse = answers(model_and_tokenizer, "chat", LONG_INSTRUCTION, True, max_new_tokens=16)
    _, without = answers(model_and_tokenizer, "chat", LONG_INSTRUCTION, False, max_new_tokens=16)
    assert reused.reused_prefix_tokens >= 150 * (len(TICKETS) - 1)  # the system turn and the rubric
    assert with_reuse == without
    assert sum(response is not None for response, *_ in with_reuse) >= len(TICKETS) // 2
