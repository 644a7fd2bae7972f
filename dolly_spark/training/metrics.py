"""Answer quality: ROUGE-L F1 (the ``rouge-score`` package, with stemming, so figures compare with
published ones), exact match and stop rate, overall and per category; and a paired bootstrap
interval for the gain of one model over another on the same records."""
from __future__ import annotations

import re
from collections import defaultdict
from functools import lru_cache
from typing import Sequence

_WORD = re.compile(r"\w+", re.UNICODE)


@lru_cache(maxsize=1)
def _scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str | None, reference: str | None) -> float:
    """ROUGE-L F1 of ``prediction`` against ``reference`` (Porter-stemmed, lower-cased words)."""
    if not prediction or not reference:
        return 0.0
    return float(_scorer().score(reference, prediction)["rougeL"].fmeasure)


def _words(text: str | None) -> list[str]:
    return _WORD.findall((text or "").lower())


def exact_match(prediction: str | None, reference: str | None) -> float:
    """1.0 when the answers are equal word for word (case and punctuation aside)."""
    return float(bool(_words(reference)) and _words(prediction) == _words(reference))


def score_by_category(predictions: Sequence[str | None], references: Sequence[str],
                      categories: Sequence[str], stopped: Sequence[bool] | None = None
                      ) -> dict[str, dict[str, float]]:
    """{category: {"rouge_l", "exact_match", "count"[, "stop_rate"]}}, plus an "overall" entry.

    ``stopped``: whether each answer ended with the model's stop (not the length limit).
    """
    groups: dict[str, list[tuple[float, ...]]] = defaultdict(list)
    for index, (prediction, reference, category) in enumerate(zip(predictions, references, categories)):
        values = (rouge_l(prediction, reference), exact_match(prediction, reference))
        if stopped is not None:
            values += (float(stopped[index]),)
        groups[category].append(values)
        groups["overall"].append(values)
    names = ("rouge_l", "exact_match", "stop_rate")
    return {
        category: {**{name: sum(v[i] for v in rows) / len(rows) for i, name in enumerate(names[: len(rows[0])])},
                   "count": float(len(rows))}
        for category, rows in sorted(groups.items())
    }


def paired_bootstrap(before: Sequence[float], after: Sequence[float], samples: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """(mean gain, low, high): the mean of ``after - before`` over the same records, and its
    percentile bootstrap interval, resampling records with replacement."""
    import numpy as np

    gains = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    if gains.size == 0:
        return float("nan"), float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = gains[rng.integers(0, gains.size, size=(samples, gains.size))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(gains.mean()), float(low), float(high)
