"""The prompt prefix every row shares is prefilled once per micro-batch, and greedy answers are
exactly those of prefilling every row whole: on GPT-NeoX (Dolly's architecture), on a Llama
with grouped-query attention, and on the demo model (SmolLM2, Llama, chat format)."""
from __future__ import annotations

import pytest
import torch

from benchmarks.workload import INSTRUCTION, LONG_INSTRUCTION, generate_tickets
from engine_helpers import bound_engine

from dolly_spark.inference.planner import prefill_groups, shared_prefix_length

TICKETS = [body for _, body in generate_tickets(10, seed=3)]


def answers(model_and_tokenizer, prompt_format, instruction, reuse_prefix, tickets=TICKETS, **settings):
    engine = bound_engine(*model_and_tokenizer, prompt_format, reuse_prefix=reuse_prefix, token_budget=100_000,
                          require_input=True, **settings)
    results = engine.run([instruction] * len(tickets), tickets)
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

    from dolly_spark.batch.demo import demo_checkpoint

    checkpoint = demo_checkpoint()  # converted once per test run, in the session's user cache
    model_and_tokenizer = (AutoModelForCausalLM.from_pretrained(checkpoint).eval(),
                           AutoTokenizer.from_pretrained(checkpoint))
    tickets = TICKETS[:6]  # a 135M model: six tickets of different lengths are enough, and quick
    reused, with_reuse = answers(model_and_tokenizer, "chat", LONG_INSTRUCTION, True, tickets, max_new_tokens=12)
    _, without = answers(model_and_tokenizer, "chat", LONG_INSTRUCTION, False, tickets, max_new_tokens=12)
    assert reused.reused_prefix_tokens >= 150 * (len(tickets) - 1)  # the system turn and the rubric
    assert with_reuse == without
    assert sum(response is not None for response, *_ in with_reuse) >= len(tickets) // 2


def test_the_prefilled_cache_holds_every_prompt_but_its_last_token_and_zeros_elsewhere(tiny_llama):
    """The prefill writes each prefill group's keys straight into the preallocated cache, laid
    out as ``static_batching`` draws it: generate continues from column ``longest - 1``, and
    every prompt token's column holds its states, the columns left of each prefill group and
    the slots of tokens not generated yet hold zeros, and everything is finite."""
    engine = bound_engine(*tiny_llama, "dolly", max_new_tokens=5, token_budget=100_000, min_length_ratio=0.75)
    encoded = [engine.encoder.encode(index, INSTRUCTION, ticket, None) for index, ticket in enumerate(TICKETS)]
    (batch,) = engine.micro_batches(encoded, engine.request)
    groups = [[batch[p] for p in group] for group in prefill_groups([len(row.ids) for row in batch], 0.75)]
    assert len(groups) > 1
    longest = len(batch[0].ids)
    static = engine.static
    prefix = shared_prefix_length([row.ids for row in batch])
    assert prefix > 0
    input_ids, mask = static._laid_out(groups, longest, prefix)
    with torch.inference_mode():
        cache = static._prefill(groups, input_ids, mask, prefix)
    assert cache.get_seq_length() == longest - 1
    keys = cache.layers[0].keys
    assert keys.shape[0] == len(batch) and keys.shape[2] == longest - 1 + 5
    group_columns = torch.zeros(keys.shape[0], keys.shape[2], dtype=torch.bool)
    first = 0
    for group in groups:
        group_columns[first:first + len(group), longest - len(group[0].ids):longest - 1] = True
        first += len(group)
    prompt_tokens = torch.zeros_like(group_columns)
    prompt_tokens[:, :longest - 1] = mask[:, :longest - 1].bool()
    for layer in cache.layers:
        for states in (layer.keys, layer.values):
            assert torch.isfinite(states).all()
            nonzero = states.abs().sum(dim=(1, 3)) > 0
            assert nonzero[prompt_tokens].all()
            assert not nonzero[~group_columns].any()
