"""Scoring a model on held-out records: eval loss, and ROUGE-L / exact match / stop rate per
category, in a named prompt format."""
from __future__ import annotations

import logging
from typing import Any

import torch

from dolly_spark.inference.results import FINISH_EOS, FINISH_STOP
from dolly_spark.prompts import get_format, stop_token_ids
from dolly_spark.training.examples import encode_examples
from dolly_spark.training.metrics import paired_bootstrap, rouge_l, score_by_category

log = logging.getLogger(__name__)


def eval_loss(model: Any, tokenizer: Any, records: list[dict[str, str]], prompt_format: str, max_length: int) -> float:
    """Mean loss per response token (prompt tokens excluded) over ``records`` in ``prompt_format``."""
    stops = stop_token_ids(model, tokenizer, prompt_format)
    encoded = encode_examples(tokenizer, get_format(prompt_format, tokenizer), records, max_length, stops).examples
    total, tokens = 0.0, 0
    model.eval()
    with torch.inference_mode():
        for example in encoded:
            ids = torch.tensor([example["input_ids"]], device=model.device)
            labels = torch.tensor([example["labels"]], device=model.device)
            counted = int((labels[:, 1:] != -100).sum())
            total += float(model(input_ids=ids, labels=labels).loss) * counted
            tokens += counted
    return total / tokens if tokens else float("nan")


def score_model(model: Any, tokenizer: Any, records: list[dict[str, str]], prompt_format: str,
                max_new_tokens: int, max_length: int, repetition: dict[str, float] | None = None) -> dict[str, Any]:
    """How ``model`` answers ``records`` in ``prompt_format``, greedy, with ``repetition`` control
    (``repetition_penalty``, ``no_repeat_ngram_size``; none by default): {"prompt_format",
    "repetition", "eval_loss", "scores": {category: {...}}, "predictions", "rouge_l": per record,
    "stopped": per record (the answer ended with the model's stop within ``max_new_tokens``)}."""
    from dolly_spark.inference.engine import InstructionEngine
    from dolly_spark.inference.engines import Rows
    from dolly_spark.request import Request

    repetition = dict(repetition or {})
    engine = InstructionEngine(model, tokenizer, prompt_format)
    rows = Rows([r["instruction"] for r in records], [r["context"] for r in records])
    results = engine.run(rows, Request(max_new_tokens=max_new_tokens, **repetition))
    predictions = [result.response for result in results]
    references = [r["response"] for r in records]
    stopped = [result.finish_reason in (FINISH_STOP, FINISH_EOS) for result in results]
    scores = score_by_category(predictions, references, [r["category"] for r in records], stopped)
    return {"prompt_format": prompt_format, "repetition": repetition,
            "eval_loss": eval_loss(model, tokenizer, records, prompt_format, max_length),
            "scores": scores, "predictions": predictions, "stopped": stopped,
            "rouge_l": [rouge_l(p, r) for p, r in zip(predictions, references)]}


def gain_metrics(before: dict[str, Any], after: dict[str, Any]) -> dict[str, float]:
    """The ROUGE-L gain of ``after`` over ``before`` on the same records, with its 95% paired
    bootstrap interval: a gain whose interval excludes 0 is larger than the split's noise."""
    gain, low, high = paired_bootstrap(before["rouge_l"], after["rouge_l"])
    return {"rouge_l_gain": gain, "rouge_l_gain_low": low, "rouge_l_gain_high": high}


def flat_metrics(prefix: str, evaluation: dict[str, Any]) -> dict[str, float]:
    """MLflow metric names for an evaluation: ``{prefix}_eval_loss``, ``{prefix}_rouge_l`` (overall)
    and ``{prefix}_{category}_rouge_l`` / ``_exact_match`` / ``_stop_rate``."""
    metrics = {f"{prefix}_eval_loss": evaluation["eval_loss"]}
    for category, values in evaluation["scores"].items():
        name = prefix if category == "overall" else f"{prefix}_{category}"
        metrics[f"{name}_rouge_l"] = values["rouge_l"]
        metrics[f"{name}_exact_match"] = values["exact_match"]
        if "stop_rate" in values:
            metrics[f"{name}_stop_rate"] = values["stop_rate"]
    return metrics


def category_chart(evaluations: dict[str, dict[str, Any]]):
    """A bar chart of ROUGE-L per category for each evaluated model (a matplotlib Figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    categories = sorted({c for e in evaluations.values() for c in e["scores"]})
    figure, axes = plt.subplots(figsize=(max(6, len(categories) * 1.2), 4))
    width = 0.8 / max(1, len(evaluations))
    for offset, (label, evaluation) in enumerate(evaluations.items()):
        values = [evaluation["scores"].get(c, {}).get("rouge_l", 0.0) for c in categories]
        axes.bar([i + offset * width for i in range(len(categories))], values, width, label=label)
    axes.set_xticks([i + width * (len(evaluations) - 1) / 2 for i in range(len(categories))], categories,
                    rotation=30, ha="right")
    axes.set_ylabel("ROUGE-L F1")
    axes.set_ylim(0, 1)
    axes.legend()
    figure.tight_layout()
    return figure
