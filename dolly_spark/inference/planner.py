"""Pure planning over token lengths: which rows decode together (micro-batches), which of
those prefill together (prefill groups), and how many leading tokens a micro-batch shares.

No model and no tensors: everything here is a function of lengths, ids and settings, so the
benchmarks can replay the engine's plan from token counts alone.
"""
from __future__ import annotations

from typing import Sequence

# A shared prefix shorter than this is prefilled with each row: one extra forward pass for the
# prefix costs more than recomputing a handful of tokens per row saves.
MIN_SHARED_PREFIX_TOKENS = 8


def micro_batches(lengths: Sequence[int], token_budget: int, max_new_tokens: int, max_rows: int) -> list[list[int]]:
    """Indices into ``lengths``, longest first, cut so that rows × (longest prompt +
    ``max_new_tokens``) stays within ``token_budget`` and no batch has more than ``max_rows``
    rows; a single row over the budget goes alone. Equal lengths keep their input order."""
    batches: list[list[int]] = []
    current: list[int] = []
    for index in sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True):
        longest = lengths[current[0]] if current else lengths[index]
        footprint = (len(current) + 1) * (longest + max_new_tokens)
        if current and (footprint > token_budget or len(current) >= max_rows):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def choice_batches(lengths: Sequence[int], token_budget: int, choice_count: int, choice_tokens: int,
                   max_rows: int) -> list[list[int]]:
    """Like ``micro_batches``, for scoring ``choice_count`` choices of up to ``choice_tokens``
    tokens after each prompt: every row's cache is copied once per choice, so rows × choices ×
    (longest prompt + ``choice_tokens``) stays within ``token_budget``."""
    return micro_batches(lengths, token_budget // choice_count, choice_tokens, max_rows)


def prefill_groups(lengths: Sequence[int], min_length_ratio: float) -> list[list[int]]:
    """Positions into ``lengths`` (sorted longest first) cut into runs whose rows are at least
    ``min_length_ratio`` as long as the run's first; 0 keeps everything in one run."""
    groups: list[list[int]] = []
    for position, length in enumerate(lengths):
        if groups and length >= min_length_ratio * lengths[groups[-1][0]]:
            groups[-1].append(position)
        else:
            groups.append([position])
    return groups


def shared_prefix_length(sequences: Sequence[Sequence[int]], minimum: int = MIN_SHARED_PREFIX_TOKENS) -> int:
    """How many leading tokens every sequence shares, leaving each at least one token of its
    own (the one generation starts from); 0 when fewer than two sequences share ``minimum``."""
    if len(sequences) < 2:
        return 0
    limit = min(len(sequence) for sequence in sequences) - 1
    first = sequences[0]
    shared = 0
    while shared < limit and all(sequence[shared] == first[shared] for sequence in sequences[1:]):
        shared += 1
    return shared if shared >= minimum else 0
