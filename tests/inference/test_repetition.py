"""Repetition control: transformers' arithmetic on each row's own tokens, so a row's answer does
not depend on the padding its micro-batch gives it."""
from __future__ import annotations

import pytest
import torch
from transformers import NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor

from engine_helpers import bound_engine

from dolly_spark.request import Request
from dolly_spark.inference.repetition import RepetitionControl, penalized_scores
from test_engine import LENGTHS_CONTEXTS, LENGTHS_INSTRUCTIONS

VOCAB = 50


@pytest.mark.parametrize("penalty,ngram", [(1.3, 0), (1.0, 3), (1.2, 2), (1.0, 1)])
def test_transformers_arithmetic_on_each_rows_answer_alone(penalty, ngram):
    generator = torch.Generator().manual_seed(0)
    prompts = [[3, 4, 5, 3, 4, 9], [7, 7, 8]]
    answers = [[5, 3, 4, 5, 3], [8, 7, 7, 1, 8]]
    width = 6  # the second prompt is left-padded with pad id 0
    padded = torch.tensor([prompts[0] + answers[0], [0, 0, 0] + prompts[1] + answers[1]])
    scores = torch.randn((2, VOCAB), generator=generator)
    control = RepetitionControl(2, width, penalty, ngram)
    control(padded[:, :width + 2], scores.clone())  # an earlier step
    ours = control(padded, scores.clone())
    for row in range(2):
        alone = torch.tensor([answers[row]])
        expected = scores[row:row + 1].clone()
        if penalty != 1.0:
            expected = RepetitionPenaltyLogitsProcessor(penalty)(alone, expected)
        if ngram:
            expected = NoRepeatNGramLogitsProcessor(ngram)(alone, expected)
        assert torch.equal(ours[row:row + 1], expected)


def test_prompt_and_padding_are_not_counted():
    control = RepetitionControl(2, 3, 2.0, 0)
    out = control(torch.tensor([[5, 6, 7, 2], [0, 0, 8, 3]]), torch.ones((2, 10)))
    assert out[0, 2] == 0.5 and out[1, 3] == 0.5  # generated: penalized
    assert out[0, 5] == 1.0 and out[1, 0] == 1.0 and out[1, 8] == 1.0  # prompt and padding: not


def test_scores_passed_in_are_left_as_they_are_and_a_grammar_keeps_a_row_its_last_token():
    # Row 0's answer 4 5 4 bans 5 (it would repeat the bigram "4 5"); a grammar left it only 5,
    # which the row then keeps, penalized as a token its answer holds.
    ids = torch.tensor([[9, 4, 5, 4]])
    scores = torch.full((1, 10), float("-inf"))
    scores[0, 5] = 1.0
    unconstrained = RepetitionControl(1, 1, 1.5, 2)(ids, scores)
    assert scores[0, 5] == 1.0  # a new tensor came back; the caller's is untouched
    assert torch.isinf(unconstrained).all()
    constrained = RepetitionControl(1, 1, 1.5, 2, constrained=True)(ids, scores)
    assert constrained[0, 5] == pytest.approx(1.0 / 1.5) and torch.isinf(constrained[0, :5]).all()


@pytest.mark.parametrize("reuse_prefix", [True, False])
def test_batched_answers_equal_one_row_at_a_time_with_repetition_control(tiny_model, reuse_prefix):
    engine = bound_engine(*tiny_model, "dolly", max_new_tokens=12, token_budget=100_000, repetition_penalty=1.3,
                          no_repeat_ngram_size=3, reuse_prefix=reuse_prefix)
    batched = engine.run(LENGTHS_INSTRUCTIONS, LENGTHS_CONTEXTS)
    single = [engine.run([i], [c])[0] for i, c in zip(LENGTHS_INSTRUCTIONS, LENGTHS_CONTEXTS)]
    assert [(r.response, r.completion_tokens) for r in batched] == [(r.response, r.completion_tokens) for r in single]
    plain = bound_engine(*tiny_model, "dolly", max_new_tokens=12, token_budget=100_000)
    assert [r.response for r in plain.run(LENGTHS_INSTRUCTIONS, LENGTHS_CONTEXTS)] != [r.response for r in batched]


def test_no_bigram_is_generated_twice_in_an_answer(tiny_model):
    engine = bound_engine(*tiny_model, "dolly", max_new_tokens=24, token_budget=100_000, no_repeat_ngram_size=2)
    generated: dict[int, list[int]] = {}
    parse = engine.parser.parse

    def recording_parse(row, tokens, sampled):
        generated[row.index] = list(tokens)
        return parse(row, tokens, sampled)

    engine.parser.parse = recording_parse
    engine.run(LENGTHS_INSTRUCTIONS, LENGTHS_CONTEXTS)
    stops = set(engine.stop_ids)
    for index, tokens in generated.items():
        answer = tokens[:next((p for p, t in enumerate(tokens) if t in stops), len(tokens))]
        bigrams = [tuple(answer[p:p + 2]) for p in range(len(answer) - 1)]
        assert len(answer) >= 3
        assert len(set(bigrams)) == len(bigrams), (index, answer)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="repetition_penalty"):
        Request(repetition_penalty=0)
    with pytest.raises(ValueError, match="no_repeat_ngram_size"):
        Request(no_repeat_ngram_size=-1)


def test_a_checkpoints_own_repetition_settings_do_not_leak_in(tiny_model):
    """transformers fills generate's unset options from the model's generation_config; its
    repetition rules count prompt and padding, so they must stay off in the engine."""
    model, tokenizer = tiny_model
    settings = dict(max_new_tokens=12, token_budget=100_000)
    expected = [r.response for r in bound_engine(model, tokenizer, "dolly", **settings).run(
        LENGTHS_INSTRUCTIONS, LENGTHS_CONTEXTS)]
    shipped = model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size
    model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = 5.0, 1
    try:
        answers = [r.response for r in bound_engine(model, tokenizer, "dolly", **settings).run(
            LENGTHS_INSTRUCTIONS, LENGTHS_CONTEXTS)]
    finally:
        model.generation_config.repetition_penalty, model.generation_config.no_repeat_ngram_size = shipped
    assert answers == expected


@pytest.mark.parametrize("penalty,ngram", [(1.3, 0), (1.0, 3), (1.2, 2), (1.0, 1), (1.5, 4)])
def test_one_rows_rules_for_vllm_are_the_batched_rules(penalty, ngram):
    """``penalized_scores`` (what the vllm engine's logits processor applies to one row and its
    answer so far) gives what ``RepetitionControl`` gives that row in a batch, step by step."""
    generator = torch.Generator().manual_seed(1)
    answer = [5, 3, 4, 5, 3, 4, 5, 9]
    control = RepetitionControl(1, 2, penalty, ngram)
    for step in range(len(answer) + 1):
        scores = torch.randn((1, VOCAB), generator=generator)
        batched = control(torch.tensor([[1, 2] + answer[:step]]), scores.clone())
        assert torch.equal(penalized_scores(scores[0].clone(), answer[:step], penalty, ngram), batched[0]), step


def test_one_row_left_only_banned_tokens_keeps_them():
    scores = torch.full((VOCAB,), float("-inf"))
    scores[5] = 1.0  # a grammar allowed only 5, which would repeat the bigram "4 5"
    out = penalized_scores(scores, [4, 5, 4], 1.0, 2)
    assert out[5] == 1.0 and torch.isinf(out).sum() == VOCAB - 1
