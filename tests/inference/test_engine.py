"""The instruction engine on tiny models: batching, stopping, parsing and bad input."""
from __future__ import annotations

import weakref
from contextlib import contextmanager

import pytest
import torch

from conftest import TAUGHT
from engine_helpers import bound_engine

from dolly_spark.inference.engines import EngineConfig
from dolly_spark.request import Request

LENGTHS_INSTRUCTIONS = [
    "Hi.",
    "Summarize the following ticket for the support lead, naming the product and the customer's mood.",
    "What went wrong?",
    "Explain " + "the billing problem in detail " * 12,
    "Why?",
    "List the steps.",
]
LENGTHS_CONTEXTS = [None, "My thermostat resets every night " * 20, "", None, "Short.", "Step one. " * 40]


def engine_for(model_and_tokenizer, **settings):
    model, tokenizer = model_and_tokenizer
    return bound_engine(model, tokenizer, "dolly", **settings)


def taught_rows(*names):
    rows = [TAUGHT[name] for name in names]
    return [r[0] for r in rows], [r[1] for r in rows]


@pytest.mark.parametrize("min_length_ratio", [0.0, 0.75])
def test_batched_greedy_equals_one_row_at_a_time(tiny_model, min_length_ratio):
    engine = engine_for(tiny_model, max_new_tokens=12, token_budget=100_000, min_length_ratio=min_length_ratio)
    batched = engine.run(LENGTHS_INSTRUCTIONS, LENGTHS_CONTEXTS)
    assert len(engine.stats.micro_batches) == 1  # everything decoded as one left-padded batch
    # ratio 0: prefilled as one padded batch; 0.75: prefilled in groups, then decoded together
    assert (len(engine.stats.prefill_groups) > 1) == (min_length_ratio > 0)
    single = [engine.run([i], [c])[0] for i, c in zip(LENGTHS_INSTRUCTIONS, LENGTHS_CONTEXTS)]
    assert [r.response for r in batched] == [r.response for r in single]
    assert [r.prompt_tokens for r in batched] == [r.prompt_tokens for r in single]
    assert len({r.prompt_tokens for r in batched}) == len(batched)  # lengths differ widely


def test_order_is_restored_and_micro_batches_fit_the_budget(tiny_model):
    budget = 700
    engine = engine_for(tiny_model, max_new_tokens=8, token_budget=budget)
    results = engine.run(LENGTHS_INSTRUCTIONS, LENGTHS_CONTEXTS)
    reference = engine_for(tiny_model, max_new_tokens=8, token_budget=100_000)
    expected = [reference.run([i], [c])[0] for i, c in zip(LENGTHS_INSTRUCTIONS, LENGTHS_CONTEXTS)]
    assert [r.response for r in results] == [r.response for r in expected]
    assert len(engine.stats.micro_batches) > 1
    for rows, padded in engine.stats.micro_batches:
        assert rows == 1 or rows * (padded + 8) <= budget
    assert sum(rows for rows, _ in engine.stats.micro_batches) == len(LENGTHS_INSTRUCTIONS)


def test_prefill_groups_keep_similar_lengths_together(tiny_model):
    engine = engine_for(tiny_model, max_new_tokens=4, token_budget=100_000, min_length_ratio=0.75)
    results = engine.run(LENGTHS_INSTRUCTIONS, LENGTHS_CONTEXTS)
    lengths = sorted((r.prompt_tokens for r in results), reverse=True)
    cursor = 0
    for rows, padded in engine.stats.prefill_groups:
        batch = lengths[cursor: cursor + rows]
        assert batch[0] == padded and min(batch) >= 0.75 * padded
        cursor += rows
    assert cursor == len(lengths)
    one_batch = engine_for(tiny_model, max_new_tokens=4, token_budget=100_000, min_length_ratio=0.0)
    one_batch.run(LENGTHS_INSTRUCTIONS, LENGTHS_CONTEXTS)
    assert len(one_batch.stats.prefill_groups) == 1
    assert engine.stats.padded_prompt_tokens < one_batch.stats.padded_prompt_tokens


def test_finish_reasons_stop_eos_and_length(taught_model):
    engine = engine_for(taught_model, max_new_tokens=40)
    stop, eos, long_ = engine.run(*taught_rows("stop", "eos", "long"))
    assert (stop.response, stop.finish_reason, stop.error) == ("blueberry pie", "stop", None)
    assert "### End" not in stop.response
    assert (eos.response, eos.finish_reason) == ("open sesame", "eos")
    short = engine_for(taught_model, max_new_tokens=3).run(*taught_rows("long"))[0]
    assert short.finish_reason == "length" and short.completion_tokens == 3
    assert (long_.response, long_.finish_reason) == (TAUGHT["long"][2], "stop")
    assert stop.completion_tokens == len(taught_model[1]("blueberry pie\n\n")["input_ids"]) + 1


def test_quoted_keys_in_context_neither_stop_nor_corrupt(taught_model):
    engine = engine_for(taught_model, max_new_tokens=20)
    instructions, contexts = taught_rows("quoted", "stop")
    quoted, other = engine.run(instructions, contexts)
    assert (quoted.response, quoted.finish_reason) == ("code red", "stop")
    assert other.response == "blueberry pie"


def test_bad_input_gets_errors_and_spares_the_batch(taught_model):
    engine = engine_for(taught_model, max_new_tokens=20)
    window = taught_model[0].config.max_position_embeddings
    huge = "word " * 40_000  # 200,000 characters
    instructions = [TAUGHT["stop"][0], None, "", "   ", "Summarize.", TAUGHT["eos"][0], "Answer."]
    contexts = [None, "ctx", None, None, huge, "", None]
    results = engine.run(instructions, contexts)
    assert results[0].response == "blueberry pie"
    assert results[5].response == "open sesame"  # an empty context means no Input block
    for index, word in [(1, "null"), (2, "empty"), (3, "empty")]:
        assert results[index].finish_reason == "error" and word in results[index].error
        assert results[index].response is None
    # Truncated, not rejected: what the taught model then writes for an input it never saw may be
    # nothing at all, which is the only error such a row may get.
    assert results[4].truncated
    assert results[4].error is None or results[4].error.startswith("empty response"), results[4].error
    assert results[4].prompt_tokens <= window - 20
    assert not any(results[i].truncated for i in (0, 5, 6))


def test_overlong_can_be_an_error_instead(taught_model):
    engine = engine_for(taught_model, max_new_tokens=20, on_overlong="error")
    result = engine.run(["Summarize."], ["word " * 2000])[0]
    assert result.finish_reason == "error" and "over the" in result.error and not result.truncated


def test_instruction_alone_too_long_is_an_error(tiny_model):
    result = engine_for(tiny_model, max_new_tokens=8).run(["please " * 2000])[0]
    assert result.finish_reason == "error" and "instruction alone" in result.error


@contextmanager
def generating_token_at(engine, offset: int, token_id: int):
    """Make the engine's model emit ``token_id`` as its ``offset``-th generated token."""
    original = engine.model.generate

    def generate(**kwargs):
        output = original(**kwargs)
        output[:, kwargs["input_ids"].shape[1] + offset] = token_id
        return output

    engine.model.generate = generate
    try:
        yield
    finally:
        del engine.model.generate


def test_empty_answer_is_flagged(taught_model):
    _, tokenizer = taught_model
    engine = engine_for(taught_model, max_new_tokens=5)
    with generating_token_at(engine, 0, tokenizer.convert_tokens_to_ids("### End")):
        result = engine.run(["Anything."])[0]
    assert result.response is None and result.finish_reason == "stop" and "empty response" in result.error


def test_a_new_instruction_key_ends_the_answer(taught_model):
    _, tokenizer = taught_model
    engine = engine_for(taught_model, max_new_tokens=20)
    instruction_id = tokenizer.convert_tokens_to_ids("### Instruction:")
    with generating_token_at(engine, 2, instruction_id):
        result = engine.run(*taught_rows("long"))[0]
    assert result.finish_reason == "stop" and result.completion_tokens == 3
    assert result.response == tokenizer.decode(tokenizer("one two three")["input_ids"][:2]).strip()
    assert instruction_id in engine.stop_ids


def test_sampling_is_seeded_per_row_key(tiny_model):
    engine = engine_for(tiny_model, max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95)
    alone = engine.run(["Tell me a story."], keys=["ticket-7"])[0]
    in_batch = engine.run(["Hi.", "Tell me a story.", LENGTHS_INSTRUCTIONS[3]], keys=["a", "ticket-7", "b"])[1]
    assert alone.response == in_batch.response
    others = {engine.run(["Tell me a story."], keys=[f"k{n}"])[0].response for n in range(4)}
    assert len(others) > 1


def test_out_of_memory_splits_the_batch(tiny_model):
    engine = engine_for(tiny_model, max_new_tokens=6, token_budget=100_000)
    expected = engine.run(LENGTHS_INSTRUCTIONS, LENGTHS_CONTEXTS)
    original = engine.model.generate
    poison_length = expected[3].prompt_tokens

    def generate_on_a_small_gpu(**kwargs):
        input_ids = kwargs["input_ids"]
        if input_ids.shape[0] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if bool((kwargs["attention_mask"].sum(dim=1) == poison_length).any()):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")
        return original(**kwargs)

    engine.model.generate = generate_on_a_small_gpu
    try:
        results = engine.run(LENGTHS_INSTRUCTIONS, LENGTHS_CONTEXTS)
    finally:
        del engine.model.generate
    assert results[3].finish_reason == "error" and "OutOfMemoryError" in results[3].error
    survivors = [i for i in range(len(expected)) if i != 3]
    assert [results[i].response for i in survivors] == [expected[i].response for i in survivors]


def test_a_failure_that_is_not_out_of_memory_raises_with_its_traceback(tiny_model, monkeypatch):
    engine = engine_for(tiny_model, max_new_tokens=4, token_budget=100_000)

    def device_assert(batch, attention):
        raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(engine.static, "generate", device_assert)
    with pytest.raises(RuntimeError, match="device-side assert") as raised:
        engine.run(LENGTHS_INSTRUCTIONS, LENGTHS_CONTEXTS)
    assert raised.traceback[-1].name == "device_assert"  # the original traceback, not a re-raise
    # Per-row problems still get error rows before generation is reached.
    monkeypatch.undo()
    assert engine.run([None, "Hi."])[0].finish_reason == "error"


def test_out_of_memory_retries_halves_after_the_failed_batch_is_freed(tiny_model, monkeypatch):
    engine = engine_for(tiny_model, max_new_tokens=4, token_budget=100_000)
    expected = engine.run(LENGTHS_INSTRUCTIONS[:4], LENGTHS_CONTEXTS[:4])
    real_generate = engine.static.generate
    scratch_refs, alive_at_each_call = [], []

    def generate_on_a_small_gpu(batch, attention):
        alive_at_each_call.append(any(ref() is not None for ref in scratch_refs))
        if len(batch) > 1:
            scratch = torch.empty(1024)  # what a failed batch's frames hold: its tensors
            scratch_refs.append(weakref.ref(scratch))
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB")
        return real_generate(batch, attention)

    monkeypatch.setattr(engine.static, "generate", generate_on_a_small_gpu)
    results = engine.run(LENGTHS_INSTRUCTIONS[:4], LENGTHS_CONTEXTS[:4])
    assert [r.response for r in results] == [r.response for r in expected]
    assert len(scratch_refs) == 3  # 4 rows, then 2 + 2, then four single rows
    assert not any(alive_at_each_call), "a retry ran while a failed batch's tensors were still alive"


def test_out_of_memory_on_a_single_row_is_that_rows_error(tiny_model, monkeypatch):
    engine = engine_for(tiny_model, max_new_tokens=4)

    def too_big(batch, attention):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(engine.static, "generate", too_big)
    result = engine.run(["Summarize."], ["A ticket."])[0]
    assert result.finish_reason == "error" and result.error.startswith("OutOfMemoryError: CUDA out of memory")
    assert result.response is None and result.prompt_tokens > 0


HUGE_TICKET = "The invoice was charged twice. " * 6452  # 200,012 characters


def test_max_input_tokens_truncates_a_huge_input_without_tokenizing_it_all(tiny_model):
    engine = engine_for(tiny_model, max_new_tokens=8, max_input_tokens=96)
    tokenized = []
    tokenizer = engine.encoder.tokenizer

    class RecordingTokenizer:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, text, **kwargs):
            tokenized.append(len(text))
            return tokenizer(text, **kwargs)

    engine.encoder.tokenizer = RecordingTokenizer()
    result, short = engine.run(["Summarize the ticket.", "Summarize the ticket."], [HUGE_TICKET, "Refund please."])
    assert len(HUGE_TICKET) >= 200_000
    assert result.truncated and result.finish_reason != "error" and result.prompt_tokens <= 96
    assert result.prompt_tokens > 80  # cut to the limit, not far below it
    assert not short.truncated
    assert max(tokenized) <= 96 * 16 + 100, "the whole 200,000-character input was tokenized"

    refused = engine_for(tiny_model, max_new_tokens=8, max_input_tokens=96, on_overlong="error")
    error = refused.run(["Summarize the ticket."], [HUGE_TICKET])[0]
    assert error.finish_reason == "error" and not error.truncated
    assert "over the 96 that fit (max_input_tokens=96)" in error.error


def test_no_micro_batch_exceeds_the_token_budget_and_a_row_over_it_runs_alone(tiny_model):
    budget, new = 200, 8
    engine = engine_for(tiny_model, max_new_tokens=new, token_budget=budget)  # max_input_tokens 4096 > window 512
    contexts = [HUGE_TICKET, "Short.", "Step one. " * 40, "My thermostat resets every night " * 20, None]
    results = engine.run(["Summarize the ticket."] * len(contexts), contexts)
    assert engine.max_prompt_tokens == 512 - new  # the window's limit: the budget cuts no prompt
    assert results[0].truncated and max(r.prompt_tokens for r in results) > budget
    assert all(r.finish_reason != "error" or r.error.startswith("empty response") for r in results)
    for rows, longest in engine.stats.micro_batches:
        assert rows == 1 or rows * (longest + new) <= budget, engine.stats.micro_batches
    assert (1, 504) in engine.stats.micro_batches  # the truncated ticket, alone


def test_continuous_batching_falls_back_where_unsupported(tiny_model):
    static = engine_for(tiny_model, max_new_tokens=8).run(LENGTHS_INSTRUCTIONS[:3], LENGTHS_CONTEXTS[:3])
    engine = engine_for(tiny_model, max_new_tokens=8, strategy="continuous")
    results = engine.run(LENGTHS_INSTRUCTIONS[:3], LENGTHS_CONTEXTS[:3])
    assert [r.response for r in results] == [r.response for r in static]


def test_continuous_batching_matches_static_on_llama(tiny_llama, monkeypatch):
    static = engine_for(tiny_llama, max_new_tokens=8).run(LENGTHS_INSTRUCTIONS[:4], LENGTHS_CONTEXTS[:4])
    continuous = engine_for(tiny_llama, max_new_tokens=8, strategy="continuous")
    model = tiny_llama[0]
    caches = []
    generate_batch = model.generate_batch
    monkeypatch.setattr(model, "generate_batch", lambda **kwargs: caches.append(
        (kwargs.get("continuous_batching_config"), kwargs["inputs"])) or generate_batch(**kwargs))
    results = continuous.run(LENGTHS_INSTRUCTIONS[:4], LENGTHS_CONTEXTS[:4])
    assert continuous.strategy == "continuous"
    assert [r.response for r in results] == [r.response for r in static]
    # The paged cache holds the micro-batch, not 90 % of the machine's free memory.
    for cache, inputs in caches:
        assert cache is not None and cache.num_blocks <= sum(len(ids) + 8 for ids in inputs) // cache.page_size + len(inputs) + 1


def test_settings_are_checked(tiny_model):
    with pytest.raises(ValueError, match="on_overlong"):
        Request(on_overlong="ignore")
    with pytest.raises(ValueError, match="strategy"):
        EngineConfig(strategy="magic")
    with pytest.raises(ValueError, match="engine must be one of"):
        EngineConfig(engine="magic")
    with pytest.raises(ValueError, match="top_p=0"):
        Request(temperature=0.7, top_p=0)
    with pytest.raises(ValueError, match="max_input_tokens must be at least 1"):
        Request(max_input_tokens=0)
    # The budget decides which rows run together, never whether one runs: under it, a row runs alone.
    assert engine_for(tiny_model, token_budget=4, max_new_tokens=8).run(["Hi."])[0].finish_reason != "error"


@pytest.mark.parametrize("structured", [False, True])
def test_the_row_encoder_counts_what_run_reports_and_loads_no_weights(tiny_model_dir, structured, monkeypatch):
    from transformers import AutoModelForCausalLM

    from dolly_spark.inference.engine import InstructionEngine
    from dolly_spark.inference.engines import Rows
    from dolly_spark.inference.row_encoder import RowEncoder

    schema = '{"type": "object", "properties": {"urgency": {"type": "string"}}, "required": ["urgency"]}'
    request = Request(require_input=True, max_new_tokens=2, max_input_tokens=160,
                      choices=("billing", "shipping") if structured else (), json_schema=schema if structured else None)
    contexts = ["My thermostat resets every night.", None, "  ", "word " * 500, "Step one. " * 3]
    rows = Rows(["Summarize the ticket."] * 4 + [None], contexts, [f"T-{i}" for i in range(5)])
    ran = InstructionEngine.from_pretrained(str(tiny_model_dir)).run(rows, request)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", None)  # any weights read would fail
    counted = RowEncoder.from_pretrained(str(tiny_model_dir)).encode_only(rows, request)
    assert [(r.prompt_tokens, r.truncated) for r in counted] == [(r.prompt_tokens, r.truncated) for r in ran]
    # Refused: a null input, a blank one, a null instruction; cut: the long input.
    assert [r.error for r in counted] == [None, *(r.error for r in ran[1:3]), None, ran[4].error]
    assert all(r.error for r in counted[1:3] + counted[4:]) and counted[3].truncated
    assert counted[0].prompt_tokens > 0 and counted[0].finish_reason == "pending"
