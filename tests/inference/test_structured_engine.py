"""Structured answers in the engine, without Spark: ``choices`` scored exactly (checked against a
brute-force forward per row and choice) and ``json_schema`` answers generated under a grammar
(every complete answer parses and has the schema's types), batched as one row at a time."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import PACKAGE_TICKETS, shared_sample, tokenizer_corpus
from engine_helpers import bound_engine

from dolly_spark.request import Request
from dolly_spark.prompts import answer_ids, choice_instruction, encode_segments, get_format, schema_instruction

# "ship" is a prefix of "shipping"; "billing refund" takes several tokens.
CHOICES = ("ship", "shipping", "billing refund", "other")
# Short keys and bounded strings: a random-weight model's answers then end within 64 tokens.
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z0-9-]{1,6}$"},
        "item": {"type": "string", "maxLength": 6},
        "refund": {"type": "boolean"},
        "amount": {"type": "number", "minimum": 0, "maximum": 10000},
        "mood": {"enum": ["angry", "calm", "happy"]},
    },
    "required": ["id", "item", "refund", "amount", "mood"],
    "additionalProperties": False,
}
SCHEMA_TEXT = json.dumps(SCHEMA)


def varied_rows(count: int = 210) -> tuple[list[str], list[str | None]]:
    """At least ``count`` rows of widely varied length: the shared Dolly sample (read from
    beside the repository), the package's tickets, and short rows with and without input."""
    instructions, contexts = [], []
    for line in shared_sample().read_text(encoding="utf-8").splitlines():
        record = json.loads(line)
        instructions.append(record["instruction"])
        contexts.append(record.get("context") or None)
    for line in PACKAGE_TICKETS.read_text(encoding="utf-8").splitlines():
        instructions.append("Which team should handle this ticket?")
        contexts.append(json.loads(line)["body"])
    short = ["Where is my parcel?", "Refund me.", "Hi.", "The box came late and broken, I want my money back."]
    while len(instructions) < count:
        n = len(instructions)
        instructions.append(short[n % len(short)] + " Please" * (n % 7))
        contexts.append(None if n % 3 else "Order " + "A-1 " * (n % 11))
    return instructions, contexts


ROWS = varied_rows()


def engine_for(model_and_tokenizer, prompt_format="dolly", **settings):
    return bound_engine(*model_and_tokenizer, prompt_format, **settings)


def check_schema_answer(result, max_new_tokens: int) -> bool:
    """True for a complete answer with the schema's types; one cut off must say so. (JSON that
    ends exactly at max_new_tokens, with no room left for the stop token, is complete.)"""
    if result.error is not None:
        assert result.finish_reason == "length"
        assert result.error == (f"answer is not complete JSON: cut off by max_new_tokens={max_new_tokens}; "
                                "raise max_new_tokens")
        assert result.response and result.response.startswith("{")
        return False
    assert result.finish_reason in ("stop", "eos", "length"), result
    answer = json.loads(result.response)
    assert set(answer) == set(SCHEMA["required"])
    assert isinstance(answer["id"], str) and isinstance(answer["item"], str) and len(answer["item"]) <= 6
    assert isinstance(answer["refund"], bool)
    assert isinstance(answer["amount"], (int, float)) and not isinstance(answer["amount"], bool)
    assert answer["mood"] in SCHEMA["properties"]["mood"]["enum"]
    return True


def reference_probabilities(model, prompt: list[int], endings: list[list[int]], pad_id: int) -> torch.Tensor:
    """Each choice's probability from a whole forward over prompt + choice + end: no cache, no
    left padding. The choices' sequences run side by side, right-padded, which changes nothing
    for the real tokens of a causal model."""
    width = len(prompt) + max(len(ending) for ending in endings)
    ids = torch.full((len(endings), width), pad_id)
    for row, ending in enumerate(endings):
        ids[row, :len(prompt) + len(ending)] = torch.tensor(prompt + ending)
    with torch.inference_mode():
        log_probs = model(input_ids=ids).logits.float().log_softmax(-1)
    totals = [sum(log_probs[row, len(prompt) - 1 + step, token].item() for step, token in enumerate(ending))
              for row, ending in enumerate(endings)]
    return torch.tensor(totals, dtype=torch.float64).softmax(-1)


@pytest.fixture(scope="module")
def tiny_chat():
    """(model, tokenizer): a tiny random chat model (ChatML template, no Dolly keys) that stops
    at its end of turn as well as at EOS."""
    from dolly_spark.testing.tiny_models import build_tiny_model, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(tokenizer_corpus(), dolly_keys=False)
    model = build_tiny_model(tokenizer, seed=1)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    return model, tokenizer


def test_choice_and_schema_instructions_are_golden():
    assert choice_instruction("Classify the ticket.", ["billing", "shipping", "other"]) == (
        "Classify the ticket.\nAnswer with exactly one of: billing, shipping, other.")
    assert schema_instruction("Extract the order.", SCHEMA_TEXT) == (
        "Extract the order.\nAnswer with a JSON object with these fields: id (string), item (string), "
        "refund (boolean), amount (number), mood (angry, calm or happy).")
    nullable = {"type": "object", "properties": {
        "order_id": {"type": ["string", "null"], "description": "as written, e.g. PB-90417"},
        "tags": {"type": ["array", "null"], "items": {"type": ["string", "null"]}},
        "opened": {"type": ["string", "null"], "format": "date"}}}
    assert schema_instruction("Extract.", nullable) == (
        "Extract.\nAnswer with a JSON object with these fields: order_id (string or null: as written, e.g. "
        "PB-90417), tags (list of string or null), opened (date or null).")
    assert schema_instruction("List.", {"type": "array", "items": {"type": "integer"}}) == (
        'List.\nAnswer with JSON that matches this schema: {"type":"array","items":{"type":"integer"}}')


def test_structured_settings_are_checked_and_hashable():
    for bad, match in [(("only",), "at least two"), (("a", " "), "blank"), (("a", "b", "a "), "distinct"),
                       ("ab", "list of labels")]:
        with pytest.raises(ValueError, match=match):
            Request(choices=bad)
    with pytest.raises(ValueError, match="not valid JSON"):
        Request(json_schema="{type: object")
    with pytest.raises(ValueError, match="must be a JSON object"):
        Request(json_schema="[1, 2]")
    listed = Request(choices=["a", "b"], json_schema=SCHEMA)
    assert listed == Request(choices=("a", "b"), json_schema=SCHEMA_TEXT)
    assert hash(listed) == hash(Request(choices=("a", "b"), json_schema=SCHEMA_TEXT))


def test_choices_over_200_rows_equal_a_brute_force_forward_per_row_and_choice(tiny_model):
    model, tokenizer = tiny_model
    instructions, contexts = ROWS
    engine = engine_for(tiny_model, choices=CHOICES, token_budget=4096)
    results = engine.run(instructions, contexts)
    assert len(results) >= 200 and len(engine.stats.choice_batches) > 1
    for rows, longest in engine.stats.choice_batches:  # the cache is copied once per choice
        assert rows == 1 or rows * len(CHOICES) * (longest + engine.scorer.longest_choice) <= 4096
    fmt, end = get_format("dolly"), tokenizer.convert_tokens_to_ids("### End")
    endings = [answer_ids(tokenizer, fmt, choice, end) for choice in CHOICES]
    assert endings[0][-3:] == endings[1][-3:] == tokenizer("\n\n### End", add_special_tokens=False)["input_ids"]
    assert len(endings[2]) > 4  # "billing refund" is several tokens before its ending
    compared = 0
    for instruction, context, result in zip(instructions, contexts, results):
        assert result.label in CHOICES and result.response == result.label, result
        assert (result.finish_reason, result.error, result.completion_tokens) == ("stop", None, 0)
        assert abs(sum(result.choice_probabilities) - 1.0) < 1e-5
        assert result.label_probability == max(result.choice_probabilities)
        if result.truncated:  # the reference below would need the truncated input
            continue
        prompt = encode_segments(tokenizer, fmt.prompt_segments(choice_instruction(instruction, CHOICES), context))
        assert result.prompt_tokens == len(prompt)
        expected = reference_probabilities(model, prompt, endings, tokenizer.pad_token_id)
        assert CHOICES[int(expected.argmax())] == result.label
        assert torch.allclose(torch.tensor(result.choice_probabilities, dtype=torch.float64), expected, atol=1e-4)
        compared += 1
    assert compared >= 180


def test_choices_batched_equal_one_row_at_a_time_in_the_chat_format(tiny_chat):
    instructions, contexts = ROWS[0][::23], ROWS[1][::23]
    engine = engine_for(tiny_chat, "chat", choices=CHOICES, token_budget=100_000)
    assert engine.end_id == tiny_chat[1].convert_tokens_to_ids("<|im_end|>")
    batched = engine.run(instructions, contexts)
    assert len(engine.stats.choice_batches) == 1
    single = [engine.run([i], [c])[0] for i, c in zip(instructions, contexts)]
    assert [r.label for r in batched] == [r.label for r in single]
    for one, other in zip(batched, single):
        assert max(abs(p - q) for p, q in zip(one.choice_probabilities, other.choice_probabilities)) < 1e-4


def test_schema_answers_over_200_rows_parse_with_the_schemas_types(tiny_model):
    instructions, contexts = ROWS
    # Two micro-batches: decoding steps, not rows, are what a tiny model's CPU time goes to.
    engine = engine_for(tiny_model, json_schema=SCHEMA_TEXT, max_new_tokens=64, token_budget=100_000,
                        max_batch_rows=128)
    results = engine.run(instructions, contexts)
    assert len(engine.stats.micro_batches) == 2
    complete = sum(check_schema_answer(result, 64) for result in results)
    assert complete >= 0.9 * len(results)
    assert all(r.label is None and r.choice_probabilities is None for r in results)
    # Cut off by a tiny max_new_tokens: the raw text, and an error saying what to raise.
    cut = engine_for(tiny_model, json_schema=SCHEMA_TEXT, max_new_tokens=6).run(instructions[:40], contexts[:40])
    assert not any(check_schema_answer(result, 6) for result in cut)
    assert all(r.completion_tokens == 6 for r in cut)


def test_schema_answers_batched_equal_one_row_at_a_time(tiny_model):
    instructions, contexts = ROWS[0][::30], ROWS[1][::30]
    engine = engine_for(tiny_model, json_schema=SCHEMA_TEXT, max_new_tokens=64, token_budget=100_000)
    batched = engine.run(instructions, contexts)
    single = [engine.run([i], [c])[0] for i, c in zip(instructions, contexts)]
    assert [(r.response, r.completion_tokens) for r in batched] == [(r.response, r.completion_tokens) for r in single]
    assert sum(check_schema_answer(result, 64) for result in batched) >= len(batched) - 1


def test_seeded_sampling_under_the_schema_does_not_depend_on_the_batch(tiny_model):
    instructions, contexts = ROWS[0][:8], ROWS[1][:8]
    keys = [f"ticket-{n}" for n in range(8)]
    engine = engine_for(tiny_model, json_schema=SCHEMA_TEXT, max_new_tokens=64, temperature=1.0, top_k=50,
                        top_p=0.95, token_budget=100_000)
    together = engine.run(instructions, contexts, keys=keys)
    apart = engine.run(instructions[:3], contexts[:3], keys=keys[:3]) + engine.run(instructions[3:], contexts[3:],
                                                                                   keys=keys[3:])
    alone = engine.run([instructions[5]], [contexts[5]], keys=[keys[5]])[0]
    assert [r.response for r in together] == [r.response for r in apart]
    assert alone.response == together[5].response
    assert all(check_schema_answer(result, 64) or result.finish_reason == "length" for result in together)
    other_seeds = {engine.run([instructions[0]], [contexts[0]], keys=[f"k{n}"])[0].response for n in range(4)}
    assert len(other_seeds) > 1


def test_repetition_control_never_bans_what_the_grammar_requires(tiny_model):
    # The keys and separators repeat bigrams ('","'), which no_repeat_ngram_size=2 would ban.
    engine = engine_for(tiny_model, json_schema=SCHEMA_TEXT, max_new_tokens=64, no_repeat_ngram_size=2)
    results = engine.run(ROWS[0][:12], ROWS[1][:12])
    assert sum(check_schema_answer(result, 64) for result in results) >= 10


def test_choices_and_schema_together_give_a_label_and_a_json_answer(tiny_chat):
    instructions, contexts = ROWS[0][::29], ROWS[1][::29]
    both = engine_for(tiny_chat, "chat", choices=CHOICES, json_schema=SCHEMA_TEXT, max_new_tokens=64)
    labels = engine_for(tiny_chat, "chat", choices=CHOICES).run(instructions, contexts)
    answers = engine_for(tiny_chat, "chat", json_schema=SCHEMA_TEXT, max_new_tokens=64).run(instructions, contexts)
    results = both.run(instructions + [None], contexts + [None])
    for result, label, answer in zip(results, labels, answers):
        assert result.label == label.label and result.choice_probabilities == label.choice_probabilities
        assert (result.response, result.finish_reason) == (answer.response, answer.finish_reason)
        assert result.prompt_tokens == label.prompt_tokens + answer.prompt_tokens
        check_schema_answer(result, 64)
    refused = results[-1]
    assert refused.finish_reason == "error" and refused.error == "instruction is null; nothing to answer"
    assert refused.label is None and refused.label_probability is None and refused.choice_probabilities is None


def test_a_row_refused_for_its_label_alone_is_not_retryable(tiny_chat):
    instructions, contexts = ROWS[0][:1], ROWS[1][:1]
    # A short schema and many choices: the label's prompt (which lists the choices) is the longer.
    choices, schema = tuple(f"team {name}" for name in "abcdefghijkl"), '{"type": "boolean"}'
    label, answer = (engine_for(tiny_chat, "chat", **part).run(instructions, contexts)[0].prompt_tokens
                     for part in ({"choices": choices}, {"json_schema": schema, "max_new_tokens": 8}))
    assert label > answer
    result = engine_for(tiny_chat, "chat", choices=choices, json_schema=schema, max_new_tokens=8, on_overlong="error",
                        max_input_tokens=answer).run(instructions, contexts)[0]
    assert result.error.startswith("choices: prompt has ") and result.response is not None
    assert result.retryable is False  # the answer ran; the label cannot fit on any retry


def test_out_of_memory_while_scoring_splits_the_batch(tiny_model, monkeypatch):
    instructions, contexts = ROWS[0][:6], ROWS[1][:6]
    engine = engine_for(tiny_model, choices=CHOICES, token_budget=100_000)
    expected = engine.run(instructions, contexts)
    real_log_probs = engine.scorer.log_probs
    poison = expected[2].prompt_tokens

    def log_probs_on_a_small_gpu(batch):
        if len(batch) > 2 or any(len(row.ids) == poison for row in batch):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_log_probs(batch)

    monkeypatch.setattr(engine.scorer, "log_probs", log_probs_on_a_small_gpu)
    results = engine.run(instructions, contexts)
    assert results[2].finish_reason == "error" and "OutOfMemoryError" in results[2].error
    assert results[2].retryable is True  # on a retry, the row may land in a batch that fits
    assert results[2].label is None
    assert [r.label for i, r in enumerate(results) if i != 2] == [r.label for i, r in enumerate(expected) if i != 2]


def test_a_schema_the_library_cannot_compile_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="json_schema cannot be used"):
        engine_for(tiny_model, json_schema='{"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}').run(["Hi."])


def test_choices_equal_the_reference_on_a_llama(tiny_llama):
    model, tokenizer = tiny_llama
    instructions, contexts = ROWS[0][::17], ROWS[1][::17]
    results = engine_for(tiny_llama, choices=CHOICES, token_budget=100_000).run(instructions, contexts)
    fmt, end = get_format("dolly"), tokenizer.convert_tokens_to_ids("### End")
    endings = [answer_ids(tokenizer, fmt, choice, end) for choice in CHOICES]
    for instruction, context, result in zip(instructions, contexts, results):
        prompt = encode_segments(tokenizer, fmt.prompt_segments(choice_instruction(instruction, CHOICES), context))
        expected = reference_probabilities(model, prompt, endings, tokenizer.pad_token_id)
        assert CHOICES[int(expected.argmax())] == result.label
        assert torch.allclose(torch.tensor(result.choice_probabilities, dtype=torch.float64), expected, atol=1e-4)


def test_the_constraint_masks_per_row_and_ends_a_row_it_cannot_follow(tiny_model):
    from dolly_spark.inference.constrained import JsonGrammar

    _, tokenizer = tiny_model
    end = tokenizer.convert_tokens_to_ids("### End")
    grammar = JsonGrammar(tokenizer, SCHEMA_TEXT, end)
    constraint = grammar.constraint(rows=3, prompt_width=2)
    vocab = len(tokenizer) + 5  # a model vocabulary padded beyond the tokenizer's
    first = constraint(torch.zeros((3, 2), dtype=torch.long), torch.zeros((3, vocab)))
    opening = tokenizer.convert_tokens_to_ids("{")
    assert set(torch.isfinite(first[0]).nonzero().flatten().tolist()) >= {opening}
    assert not torch.isfinite(first[:, len(tokenizer):]).any() and not torch.isfinite(first[:, end]).any()
    letter = tokenizer.convert_tokens_to_ids("a")  # not JSON: row 1's matcher fails
    scores = constraint(torch.tensor([[0, 0, opening], [0, 0, letter], [0, 0, end]]), torch.zeros((3, vocab)))
    assert torch.isfinite(scores[0]).sum() < len(tokenizer) and not torch.isfinite(scores[0, end])
    assert torch.isfinite(scores[1]).nonzero().flatten().tolist() == [end]  # only the end is left
    assert torch.isfinite(scores[2]).all()  # an ended row is only padded: left alone


def test_continuous_strategy_generates_schema_answers_with_the_static_backend(tiny_model):
    instructions, contexts = ROWS[0][:4], ROWS[1][:4]
    static = engine_for(tiny_model, json_schema=SCHEMA_TEXT, max_new_tokens=64).run(instructions, contexts)
    engine = engine_for(tiny_model, json_schema=SCHEMA_TEXT, max_new_tokens=64, strategy="continuous")
    assert [r.response for r in engine.run(instructions, contexts)] == [r.response for r in static]
    assert engine.strategy == "static"
