"""Classification by scoring: each row's probability of every choice, with no decoding loop.

A choice is scored as the whole answer a model would write for it, through the token that ends
an answer (``prompts.answer_ids``), so a label that is a prefix of another ("ship" and
"shipping") is told apart: after "ship" the first must end, the second must go on. A row's
choice log-probability is the sum of those tokens' log-softmax after its prompt.

Per micro-batch, the left-padded prompts are prefilled once; the last position's log-probs
score every choice's first token. The prompt cache is then repeated once per choice and one
forward over every choice's remaining tokens (right-padded, masked, positions continuing each
row's own) scores the rest, so the cost is one prefill per row plus the choices' tokens.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from transformers import DynamicCache

from dolly_spark.inference.backend import cache_argument
from dolly_spark.inference.encoder import EncodedRow
from dolly_spark.inference.results import FINISH_STOP, EngineStats, InstructionResult

# Logits scored at once: a chunk of positions × vocabulary in float32 stays near 256 MiB.
_LOGIT_CHUNK_ELEMENTS = 64 * 1024 * 1024


class ChoiceScorer:
    """Scores fixed token sequences (``choice_ids``, one per choice, each ending with the
    answer's end token) after the prompts of a micro-batch."""

    def __init__(self, model: Any, choice_ids: Sequence[Sequence[int]], pad_id: int, stats: EngineStats):
        self.model = model
        self.choice_ids = [list(ids) for ids in choice_ids]
        self.pad_id = pad_id
        self.stats = stats
        self.device = next(model.parameters()).device
        self.cache_kwarg = cache_argument(model)
        self.longest_choice = max(len(ids) for ids in self.choice_ids)

    def log_probs(self, batch: list[EncodedRow]) -> torch.Tensor:
        """rows × choices: each choice's sequence log-probability after each row's prompt
        (float64, on the CPU)."""
        rows, count = len(batch), len(self.choice_ids)
        longest = max(len(row.ids) for row in batch)
        input_ids = torch.full((rows, longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros((rows, longest), dtype=torch.long)
        for position, row in enumerate(batch):
            input_ids[position, longest - len(row.ids):] = torch.tensor(row.ids)
            mask[position, longest - len(row.ids):] = 1
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            # Positions follow the mask, so each left-padded row sits where it would alone.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             logits_to_keep=1)
            first = out.logits[:, -1].float().log_softmax(-1)
            scores = first[:, torch.tensor([ids[0] for ids in self.choice_ids], device=self.device)].double()
            states = [(layer.keys, layer.values) for layer in getattr(out, self.cache_kwarg).layers]
            del out
            scores += self._rest(states, mask, rows).view(rows, count)
        self.stats.choice_batches.append((rows, longest))
        self.stats.padded_prompt_tokens += rows * longest
        return scores.cpu()

    def _rest(self, states: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor, rows: int) -> torch.Tensor:
        """(rows × choices): the log-probability of every choice's tokens after its first, from
        one forward over all of them against the prompt cache repeated per choice (row-major:
        row r's choice c is sequence r × choices + c)."""
        count, width = len(self.choice_ids), self.longest_choice - 1
        inputs = torch.full((count, width), self.pad_id, dtype=torch.long)
        targets = torch.zeros((count, width), dtype=torch.long)
        valid = torch.zeros((count, width), dtype=torch.long)
        for choice, ids in enumerate(self.choice_ids):
            inputs[choice, :len(ids) - 1] = torch.tensor(ids[:-1])
            targets[choice, :len(ids) - 1] = torch.tensor(ids[1:])
            valid[choice, :len(ids) - 1] = 1
        inputs, targets, valid = (t.to(self.device).repeat(rows, 1) for t in (inputs, targets, valid))
        past = DynamicCache()
        for index, (keys, values) in enumerate(states):
            past.update(keys.repeat_interleave(count, dim=0), values.repeat_interleave(count, dim=0), index)
        prompt_mask = mask.repeat_interleave(count, dim=0)
        # Right padding: a choice's real tokens come before its padding, so causal attention
        # never shows it to them, and the padding's own scores are dropped below.
        positions = prompt_mask.sum(-1, keepdim=True) + torch.arange(width, device=self.device)
        logits = self.model(input_ids=inputs, attention_mask=torch.cat([prompt_mask, valid], dim=1),
                            position_ids=positions, use_cache=True, **{self.cache_kwarg: past}).logits
        del past
        totals = torch.zeros(rows * count, dtype=torch.float64, device=self.device)
        step = max(1, _LOGIT_CHUNK_ELEMENTS // (width * logits.shape[-1]))
        for start in range(0, rows * count, step):
            chunk = logits[start:start + step].float()
            picked = chunk.gather(-1, targets[start:start + step].unsqueeze(-1)).squeeze(-1) - chunk.logsumexp(-1)
            totals[start:start + step] = (picked * valid[start:start + step]).sum(-1).double()
        return totals


def choice_results(batch: list[EncodedRow], log_probs: torch.Tensor, choices: Sequence[str]) -> list[InstructionResult]:
    """Each row's result from its choices' log-probabilities: the likeliest choice as label and
    response, and the softmax over the choices (in their order) as probabilities. Nothing is
    generated, so ``completion_tokens`` is 0 and the answer ends as a stop."""
    probabilities = log_probs.double().softmax(-1)
    results = []
    for row, row_probabilities in zip(batch, probabilities.tolist()):
        best = max(range(len(choices)), key=row_probabilities.__getitem__)
        results.append(InstructionResult(
            choices[best], FINISH_STOP, None, len(row.ids), 0, row.truncated, label=choices[best],
            label_probability=row_probabilities[best], choice_probabilities=row_probabilities))
    return results
