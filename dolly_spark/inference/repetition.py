"""Repetition control over each row's answer: what stops a small model's loops without
stopping it from quoting its input.

transformers' ``repetition_penalty`` and ``no_repeat_ngram_size`` count a decoder-only model's
whole ``input_ids``: the prompt, and in a left-padded batch the padding too. Counting the prompt
keeps an answer from reusing the input's words and phrases, which summaries and extractions
must do: on the dolly sample with the demo model, ROUGE-L fell from 0.187 to 0.133 (penalty 1.1)
and 0.150 (no repeated 4-gram) that way. Counting padding makes an answer depend on its
micro-batch. So this processor applies transformers' two rules, with the same arithmetic, to the
tokens each row has generated so far, and nothing else.
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor

# The key of a request's [repetition_penalty, no_repeat_ngram_size] in vLLM's
# ``SamplingParams.extra_args`` (``vllm_repetition.AnswerRepetition`` reads it).
REPETITION_ARG = "dolly_spark_repetition"


class RepetitionControl(LogitsProcessor):
    def __init__(self, rows: int, prompt_width: int, penalty: float, ngram_size: int, constrained: bool = False):
        """``prompt_width``: where the generated tokens start in ``input_ids``. ``constrained``:
        a grammar runs before this processor and may leave a row only tokens this one bans."""
        self.penalty = penalty
        self.ngram_size = ngram_size
        self.prompt_width = prompt_width
        self.constrained = constrained
        self.answers: list[list[int]] = [[] for _ in range(rows)]
        # Per row: the tokens its answer holds, and each (n-1)-gram of it -> the tokens that followed.
        self.seen: list[set[int]] = [set() for _ in range(rows)]
        self.followers: list[dict[tuple[int, ...], set[int]]] = [{} for _ in range(rows)]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        new = input_ids[:, self.prompt_width + len(self.answers[0]):]
        if new.shape[1]:
            self._record(new)
        # Only the scores of the tokens the rules name (a few per row) are read and written:
        # passes over the whole vocabulary cost about 6 ms a step for 16 rows of the demo
        # model's 49k tokens on a CPU core, these about 1 ms.
        rows = range(len(self.answers))
        penalized = self._indices([self.seen[row] for row in rows], scores) if self.penalty != 1.0 else None
        banned = self._indices([self._banned(row) for row in rows], scores) if self.ngram_size > 0 else None
        if penalized is None and banned is None:
            return scores
        scores = scores.clone()
        if penalized is not None:
            values = scores[penalized]
            scores[penalized] = torch.where(values < 0, values * self.penalty, values / self.penalty)
        if banned is not None:
            # Under a grammar a row may have only banned tokens left; it then keeps them, as a
            # row must write something. Without one, the model's scores are all finite.
            allowed = scores.clone() if self.constrained else None
            scores[banned] = float("-inf")
            if allowed is not None:
                stuck = torch.isinf(scores).all(dim=-1, keepdim=True)
                scores = torch.where(stuck, allowed, scores)
        return scores

    @staticmethod
    def _indices(tokens_per_row: list[set[int]], scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, tokens) index tensors of every row's tokens that ``scores`` has a column for;
        None when there are none."""
        vocabulary = scores.shape[-1]
        pairs = [(row, token) for row, tokens in enumerate(tokens_per_row) for token in tokens if token < vocabulary]
        if not pairs:
            return None
        rows, tokens = zip(*pairs)
        return torch.tensor(rows, device=scores.device), torch.tensor(tokens, device=scores.device)

    def _record(self, new: torch.LongTensor) -> None:
        n = self.ngram_size
        for row, tokens in enumerate(new.tolist()):
            answer = self.answers[row]
            for token in tokens:
                answer.append(token)
                self.seen[row].add(token)
                if n > 0 and len(answer) >= n:
                    self.followers[row].setdefault(tuple(answer[-n:-1]), set()).add(token)

    def _banned(self, row: int) -> set[int]:
        """Tokens that would complete an n-gram the row's answer already holds."""
        answer, n = self.answers[row], self.ngram_size
        if len(answer) < n - 1:
            return set()
        return self.followers[row].get(tuple(answer[len(answer) - n + 1:]), set())


def penalized_scores(scores: torch.Tensor, answer: list[int], penalty: float, ngram_size: int) -> torch.Tensor:
    """One row's next-token ``scores`` under ``RepetitionControl``'s two rules, for an engine
    that hands over one row and its ``answer`` so far at a time (vLLM's logits processors). A
    row left with only banned tokens (a grammar allowed no other) keeps them."""
    vocabulary = scores.shape[-1]
    seen = [token for token in set(answer) if token < vocabulary] if penalty != 1.0 else []
    banned: set[int] = set()
    if ngram_size > 0 and len(answer) >= ngram_size - 1:
        tail = tuple(answer[len(answer) - ngram_size + 1:]) if ngram_size > 1 else ()
        banned = {answer[start + ngram_size - 1] for start in range(len(answer) - ngram_size + 1)
                  if tuple(answer[start:start + ngram_size - 1]) == tail}
        banned = {token for token in banned if token < vocabulary}
    if not seen and not banned:
        return scores
    scores = scores.clone()
    if seen:
        index = torch.tensor(seen, device=scores.device)
        values = scores[index]
        scores[index] = torch.where(values < 0, values * penalty, values / penalty)
    if banned:
        allowed = scores.clone()
        scores[torch.tensor(sorted(banned), device=scores.device)] = float("-inf")
        if torch.isinf(scores).all():
            return allowed
    return scores
