"""Records, settings and weight comparisons shared by the fine-tune tests: one process, several
on the driver node, and barrier tasks on the standalone cluster."""
from __future__ import annotations

from pathlib import Path

import torch

RECORDS = [
    {"instruction": "What color is the sky?", "context": "", "response": "The sky is blue.", "category": "open_qa"},
    {"instruction": "Name a big cat.", "context": "", "response": "A tiger.", "category": "open_qa"},
    {"instruction": "Summarize the ticket.", "context": "My router reboots every hour.",
     "response": "Router reboots hourly.", "category": "summarization"},
    {"instruction": "Summarize the ticket.", "context": "I was billed twice in May.",
     "response": "Double billing in May.", "category": "summarization"},
    {"instruction": "Is this positive or negative?", "context": "I love the new app!",
     "response": "Positive.", "category": "classification"},
    {"instruction": "Is this positive or negative?", "context": "The earbuds broke in a day.",
     "response": "Negative.", "category": "classification"},
]
# Eight records, two optimizer steps an epoch at a global batch of 4 (1 process x 4, or 2 x 2).
EIGHT = RECORDS + [{"instruction": "Name a fruit.", "context": "", "response": "An apple.", "category": "open_qa"},
                   {"instruction": "Name a color.", "context": "", "response": "Red.", "category": "open_qa"}]

# What the multi-process tests train with: the tiny model at a global batch of 4, no evaluation.
SETTINGS = dict(learning_rate=1e-3, warmup_fraction=0.0, max_length=256, eval_fraction=0.0, evaluate=False, seed=5)


def flags(settings: dict) -> str:
    """``settings`` as the fine-tune job's command-line flags."""
    return " ".join(f"--{name.replace('_', '-')} {str(value).lower() if isinstance(value, bool) else value}"
                    for name, value in settings.items())


def weights_of(path: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def registered_weights(model_name: str, version: str, cache: Path) -> dict[str, torch.Tensor]:
    from dolly_spark.lifecycle.loader import local_model_paths
    from dolly_spark.lifecycle.registry import resolve_model

    path, _ = local_model_paths(resolve_model(f"models:/{model_name}/{version}"), str(cache))
    return weights_of(Path(path))


def relative_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    """How far ``b`` is from ``a``, as a fraction of how far training moved ``a`` from ``base``."""
    assert a.keys() == b.keys() == base.keys()
    flat = {name: torch.cat([w[k].float().flatten() for k in sorted(a)]) for name, w in (("a", a), ("b", b),
                                                                                         ("base", base))}
    moved = float((flat["a"] - flat["base"]).norm())
    assert moved > 0.01, moved  # it trained
    return float((flat["a"] - flat["b"]).norm()) / moved
