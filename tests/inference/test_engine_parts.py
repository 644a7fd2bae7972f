"""The engine's planner and parser on their own: no model, no tokenizer files."""
from __future__ import annotations

import math

from dolly_spark.inference.encoder import MAX_CHARS_PER_TOKEN, EncodedRow, PromptEncoder, prompt_limit
from dolly_spark.inference.parser import ResponseParser, cut_at_stop
from dolly_spark.request import Request
from dolly_spark.inference.planner import micro_batches, prefill_groups, shared_prefix_length
from dolly_spark.prompts import get_format

STOP_KEY, EOS = 900, 901


def test_micro_batches_sort_longest_first_and_fit_the_budget():
    lengths = [10, 300, 40, 300, 5, 120]
    plan = micro_batches(lengths, token_budget=700, max_new_tokens=20, max_rows=64)
    assert [i for batch in plan for i in batch] == [1, 3, 5, 2, 0, 4]  # ties keep input order
    for batch in plan:
        assert len(batch) == 1 or len(batch) * (lengths[batch[0]] + 20) <= 700
    assert plan[0] == [1, 3]


def test_a_row_over_the_budget_goes_alone_and_max_rows_caps_a_batch():
    assert micro_batches([5000, 10, 10], token_budget=100, max_new_tokens=10, max_rows=64) == [[0], [1, 2]]
    assert micro_batches([3] * 5, token_budget=10_000, max_new_tokens=1, max_rows=2) == [[0, 1], [2, 3], [4]]


def test_prefill_groups_cut_where_a_row_is_much_shorter():
    assert prefill_groups([400, 380, 300, 290, 100, 90], 0.75) == [[0, 1, 2], [3], [4, 5]]
    assert prefill_groups([400, 380, 300, 290, 100, 90], 0.0) == [[0, 1, 2, 3, 4, 5]]
    assert prefill_groups([], 0.75) == []


def test_shared_prefix_leaves_each_row_a_token_and_needs_two_rows():
    template = list(range(20))
    assert shared_prefix_length([template + [1, 2, 3], template + [1, 7], template + [4]]) == 20
    assert shared_prefix_length([template + [1, 2, 3], template + [1, 2, 3]]) == 22  # all equal: the last token is generate's
    assert shared_prefix_length([template + [5]]) == 0
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 9]]) == 0  # below the minimum worth a pass
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 9]], minimum=2) == 3
    assert shared_prefix_length([[9] + template, template]) == 0


def parser(stop_strings=("### Instruction:",)) -> ResponseParser:
    vocabulary = {i: chr(ord("a") + i) for i in range(26)} | {27: " ", 28: "#"}
    return ResponseParser(lambda ids: "".join(vocabulary.get(i, "") for i in ids), {STOP_KEY}, {EOS}, stop_strings)


def test_cut_at_the_first_stop_counts_the_stop_token():
    assert cut_at_stop([1, 2, STOP_KEY, 3], {STOP_KEY}, {EOS}) == ([1, 2], "stop", 3)
    assert cut_at_stop([1, EOS, EOS, EOS], {STOP_KEY}, {EOS}) == ([1], "eos", 2)
    assert cut_at_stop([1, 2, 3], {STOP_KEY}, {EOS}) == ([1, 2, 3], "length", 3)


def test_parser_builds_results_and_flags_empty_answers():
    row = EncodedRow(index=0, ids=[5] * 12, truncated=True, seed=0)
    done = parser().parse(row, [7, 8, 27, 27, STOP_KEY, EOS], sampled=False)
    assert (done.response, done.finish_reason, done.completion_tokens, done.prompt_tokens, done.truncated) == \
        ("hi", "stop", 5, 12, True)
    assert done.retryable is None  # no error, nothing to retry
    empty = parser().parse(row, [27, EOS], sampled=False)
    assert empty.response is None and empty.finish_reason == "eos" and empty.error.startswith("empty response")


def test_an_error_is_retryable_only_where_a_retry_can_change_it():
    row = EncodedRow(index=0, ids=[5] * 12, truncated=False, seed=0)
    # A greedy answer comes out the same on every run: empty, or JSON cut off by max_new_tokens.
    assert parser().parse(row, [27, EOS], sampled=False).retryable is False
    assert parser().parse(row, [27, EOS], sampled=True).retryable is True
    cut = parser().parse_json(row, [7, 8], max_new_tokens=2, sampled=False)
    assert cut.error.startswith("answer is not complete JSON: cut off") and cut.retryable is False
    assert parser().parse_json(row, [7, 8], max_new_tokens=2, sampled=True).retryable is True
    # Refused input follows from the input and the request alone.
    encoder = PromptEncoder(LongTokenTokenizer(), get_format("plain"), 10, "max_input_tokens=10", "error", 0)
    assert [encoder.encode(0, None, "x", key=None).retryable, encoder.encode(0, "Sum.", "x" * 1000, key=None).retryable,
            encoder.encode(0, "Sum.", None, key=None, require_context=True).retryable] == [False] * 3


def test_parser_ends_the_answer_at_a_stop_key_spelled_out_as_text():
    ends_in_text = ResponseParser(lambda ids: "fine\n### Instruction:\nmore", {STOP_KEY}, {EOS}, ("### Instruction:",))
    result = ends_in_text.parse(EncodedRow(0, [1], False, 0), [1, 2, 3], sampled=False)
    assert (result.response, result.finish_reason, result.completion_tokens) == ("fine", "stop", 3)


def test_prompt_limit_is_the_lesser_of_input_cap_and_window():
    assert prompt_limit(Request(max_new_tokens=256), window=131_072) == (4096, "max_input_tokens=4096")
    assert prompt_limit(Request(max_new_tokens=256), window=2048) == \
        (1792, "the model's context window of 2048 minus max_new_tokens=256")


class LongTokenTokenizer:
    """One token per 32 characters: more than MAX_CHARS_PER_TOKEN, as a run of spaces can be."""

    def __call__(self, text, **kwargs):
        return {"input_ids": [0] * math.ceil(len(text) / 32)}

    def decode(self, ids):
        return "x" * (32 * len(ids))


def test_an_input_past_the_character_cut_is_counted_in_full_before_it_is_cut():
    limit = 100
    encoder = PromptEncoder(LongTokenTokenizer(), get_format("plain"), limit, "max_input_tokens=100", "truncate", 0)
    fits = "x" * (limit * MAX_CHARS_PER_TOKEN + 1000)  # past the cut, but 82 tokens
    row = encoder.encode(0, "Sum.", fits, key=None)
    assert isinstance(row, EncodedRow) and not row.truncated and len(row.ids) <= limit
    over = encoder.encode(0, "Sum.", "x" * (limit * 40), key=None)
    assert isinstance(over, EncodedRow) and over.truncated and len(over.ids) <= limit
