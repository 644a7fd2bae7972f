"""Scoring a model on held-out records: eval loss, and ROUGE-L / exact match per category."""
from __future__ import annotations

import logging
from typing import Any

import torch

from dolly_spark.prompts import get_format
from dolly_spark.training.examples import encode_examples
from dolly_spark.training.scoring import score_by_category

log = logging.getLogger(__name__)


def eval_loss(model: Any, tokenizer: Any, records: list[dict[str, str]], prompt_format: str, max_length: int) -> float:
    """Mean loss per response token (prompt tokens excluded) over ``records`` in ``prompt_format``."""
    encoded = encode_examples(tokenizer, get_format(prompt_format, tokenizer), records, max_length).examples
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
                max_new_tokens: int, max_length: int) -> dict[str, Any]:
    """{"eval_loss", "scores": {category: {...}}, "predictions"} of the model on ``records``, greedy."""
    from dolly_spark.engine import GenerationSettings, InstructionEngine

    engine = InstructionEngine(model, tokenizer, prompt_format, GenerationSettings(max_new_tokens=max_new_tokens))
    results = engine.run([r["instruction"] for r in records], [r["context"] for r in records])
    predictions = [result.response for result in results]
    scores = score_by_category(predictions, [r["response"] for r in records], [r["category"] for r in records])
    return {"eval_loss": eval_loss(model, tokenizer, records, prompt_format, max_length), "scores": scores, "predictions": predictions}


def flat_metrics(prefix: str, evaluation: dict[str, Any]) -> dict[str, float]:
    """MLflow metric names for an evaluation: ``{prefix}_eval_loss``, ``{prefix}_rouge_l`` (overall)
    and ``{prefix}_{category}_rouge_l`` / ``_exact_match``."""
    metrics = {f"{prefix}_eval_loss": evaluation["eval_loss"]}
    for category, values in evaluation["scores"].items():
        name = prefix if category == "overall" else f"{prefix}_{category}"
        metrics[f"{name}_rouge_l"] = values["rouge_l"]
        metrics[f"{name}_exact_match"] = values["exact_match"]
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
