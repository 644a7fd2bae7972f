"""Records, settings and weight comparisons shared by the fine-tune tests: one process, several
on the driver node, and barrier tasks on the standalone cluster."""
from __future__ import annotations

import json
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


def eight_records_file(directory: Path) -> Path:
    """EIGHT, as the JSON-lines training data a fine-tune command reads, in ``directory``."""
    data = directory / "train.jsonl"
    data.write_text("\n".join(json.dumps(record) for record in EIGHT))
    return data


def the_run_of_the_one_version(client, model_name: str):
    """The MLflow run of ``client``'s store, which must hold that run alone, and it must have
    registered the one version of ``model_name``."""
    versions = client.search_model_versions(f"name='{model_name}'")
    assert [str(v.version) for v in versions] == ["1"]
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [r.info.run_id for r in runs] == [versions[0].run_id]
    return runs[0]


def one_process_run(base_model: Path, data: Path, model_name: str, directory: Path, training: dict):
    """(the result, its loss per step) of the fine-tune in this process at a global batch of 4
    (1 x 4), uninterrupted, with no checkpoints, in the session's MLflow registry."""
    from mlflow.tracking import MlflowClient

    from dolly_spark.training.configs import FinetuneConfig
    from dolly_spark.training.finetune import run_finetune

    result = run_finetune(FinetuneConfig(base_model=str(base_model), train_data=str(data), model_name=model_name,
                                         batch_size=4, save_steps=0, checkpoint_dir=str(directory), **training))
    return result, {m.step: m.value for m in MlflowClient().get_metric_history(result.run_id, "loss")}


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
