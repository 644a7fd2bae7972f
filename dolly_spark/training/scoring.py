"""Answer quality: ROUGE-L F1 and exact match, overall and per category."""
from __future__ import annotations

import re
from collections import defaultdict
from typing import Sequence

_WORD = re.compile(r"\w+", re.UNICODE)


def _words(text: str | None) -> list[str]:
    return _WORD.findall((text or "").lower())


def rouge_l(prediction: str | None, reference: str | None) -> float:
    """ROUGE-L F1 over lower-cased words: longest common subsequence against both lengths."""
    predicted, expected = _words(prediction), _words(reference)
    if not predicted or not expected:
        return 0.0
    previous = [0] * (len(expected) + 1)
    for word in predicted:
        current = [0]
        for position, other in enumerate(expected, start=1):
            current.append(previous[position - 1] + 1 if word == other else max(previous[position], current[-1]))
        previous = current
    common = previous[-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str | None, reference: str | None) -> float:
    """1.0 when the answers are equal word for word (case and punctuation aside)."""
    return float(bool(_words(reference)) and _words(prediction) == _words(reference))


def score_by_category(predictions: Sequence[str | None], references: Sequence[str],
                      categories: Sequence[str]) -> dict[str, dict[str, float]]:
    """{category: {"rouge_l", "exact_match", "count"}}, plus an "overall" entry."""
    groups: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for prediction, reference, category in zip(predictions, references, categories):
        pair = (rouge_l(prediction, reference), exact_match(prediction, reference))
        groups[category].append(pair)
        groups["overall"].append(pair)
    return {
        category: {
            "rouge_l": sum(p[0] for p in pairs) / len(pairs),
            "exact_match": sum(p[1] for p in pairs) / len(pairs),
            "count": float(len(pairs)),
        }
        for category, pairs in sorted(groups.items())
    }
