"""The benchmark's models: registered once in a benchmark-only MLflow registry, resolved once.

Every variant of a model's run reads the same registered version: apply_instruction and
mlflow.pyfunc.spark_udf through its ``models:/name/version`` URI, the hand-written pipeline
UDF and the bare engine through the files apply_instruction's workers download (the node-local
model cache). The registry is a SQLite file under ``<project home>/bench/``, apart from the demo's
registry, so ``make bench`` never adds versions to models a user works with.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import yaml

from benchmarks.workload import tokenizer_corpus
from dolly_spark.registry import CHAMPION, ModelSpec, alias_version, log_and_register, resolve_model
from dolly_spark.settings import project_home

log = logging.getLogger(__name__)

MODEL_KEYS = ("tiny", "demo")
TINY_NAME, DEMO_NAME = "bench_tiny_dolly", "bench_smollm2"
EXPERIMENT = "dolly_spark_bench"
# The tiny model: dolly_spark.testing's GPT-NeoX, with a context window that holds the longest
# workload prompt plus the answer, so no variant truncates (the engine would, a pipeline would not),
# and a tokenizer vocabulary large enough that prompts have realistic token counts.
TINY_HIDDEN, TINY_LAYERS, TINY_CONTEXT, TINY_VOCAB = 64, 2, 2048, 4096


@dataclass
class BenchModel:
    """One registered model as every variant sees it."""

    key: str
    spec: ModelSpec
    model_path: str
    tokenizer_path: str
    prompt_template: str | None  # what mlflow.pyfunc wraps the caller's text in, if anything

    @property
    def uri(self) -> str:
        return self.spec.uri

    @property
    def prompt_format(self) -> str:
        return self.spec.prompt_format or "auto"


def bench_home() -> Path:
    home = project_home() / "bench"
    home.mkdir(parents=True, exist_ok=True)
    return home


def configure_bench_mlflow() -> str:
    """Point MLflow at the benchmark registry unless MLFLOW_TRACKING_URI says otherwise."""
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        uri = f"sqlite:///{bench_home() / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(EXPERIMENT) is None:
        mlflow.create_experiment(EXPERIMENT, artifact_location=(bench_home() / "mlartifacts").as_uri())
    mlflow.set_experiment(EXPERIMENT)
    return mlflow.get_tracking_uri()


def register_tiny(seed: int) -> str:
    """``models:/bench_tiny_dolly@champion``, built and registered unless the champion was
    built from the same seed and recipe (the build is deterministic, so it is reused)."""
    from dolly_spark.testing import build_tiny_model, train_tiny_tokenizer

    recipe = f"testing.build_tiny_model hidden={TINY_HIDDEN} layers={TINY_LAYERS} ctx={TINY_CONTEXT} vocab={TINY_VOCAB}"
    version = alias_version(TINY_NAME, CHAMPION)
    if version is not None:
        metadata = mlflow.models.get_model_info(f"models:/{TINY_NAME}/{version}").metadata or {}
        if metadata.get("bench_seed") == str(seed) and metadata.get("bench_recipe") == recipe:
            return f"models:/{TINY_NAME}@{CHAMPION}"
    tokenizer = train_tiny_tokenizer(tokenizer_corpus(), vocab_size=TINY_VOCAB)
    model = build_tiny_model(tokenizer, seed=seed, hidden_size=TINY_HIDDEN, layers=TINY_LAYERS,
                             context_window=TINY_CONTEXT)
    log_and_register(model, tokenizer, TINY_NAME, "dolly", alias=CHAMPION,
                     metadata={"bench_seed": str(seed), "bench_recipe": recipe})
    return f"models:/{TINY_NAME}@{CHAMPION}"


def register_demo() -> str:
    """``models:/bench_smollm2@champion``: SmolLM2-135M-Instruct, chat format, registered once."""
    from dolly_spark.demo import ensure_demo_model_registered

    ensure_demo_model_registered(DEMO_NAME)
    return f"models:/{DEMO_NAME}@{CHAMPION}"


def prepare_model(key: str, seed: int) -> BenchModel:
    """Register (or reuse) model ``key``, resolve its alias to one version and fetch its files."""
    from dolly_spark.models import checkpoint_paths, fetch_model_files

    if key not in MODEL_KEYS:
        raise ValueError(f"unknown model {key!r}; choose from {', '.join(MODEL_KEYS)}")
    alias_uri = register_tiny(seed) if key == "tiny" else register_demo()
    spec = resolve_model(alias_uri)
    model_dir = fetch_model_files(spec)
    model_path, tokenizer_path = checkpoint_paths(model_dir)
    return BenchModel(key, spec, model_path, tokenizer_path, _prompt_template(Path(model_dir)))


def _prompt_template(model_dir: Path) -> str | None:
    # MLflow keeps a transformers model's prompt template in the MLmodel metadata.
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text(encoding="utf-8"))
    return (mlmodel.get("metadata") or {}).get("prompt_template")


def mlflow_input_for(prompt: str, template: str | None) -> str:
    """The text to give mlflow.pyfunc so that, wrapped in the model's stored prompt template, it
    becomes exactly ``prompt``; raises if the template cannot produce it."""
    if template is None:
        return prompt
    before, after = (part.replace("{{", "{").replace("}}", "}") for part in template.split("{prompt}"))
    if not (prompt.startswith(before) and prompt.endswith(after)):
        raise ValueError("the registered prompt template does not frame the engine's prompt; "
                         "the MLflow variant would see a different prompt")
    text = prompt[len(before):len(prompt) - len(after)]
    if template.format(prompt=text) != prompt:
        raise ValueError("the registered prompt template renders a different prompt than the engine's")
    return text


def parameter_counts(model: Any) -> dict[str, int]:
    """Parameters in total and those a token passes through as matmuls.

    MFU counts 2 FLOPs per matmul parameter per token. An input embedding is a table lookup, not
    a matmul, so it is left out unless it is tied to the output head (then the head's matmul
    uses those same weights, and ``parameters()`` lists them once).
    """
    total = sum(p.numel() for p in model.parameters())
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == embedding.data_ptr()
    return {"total": total, "matmul": total if tied else total - embedding.numel(), "tied_embeddings": int(tied)}


def describe_registry() -> dict[str, Any]:
    """Where the benchmark's models are registered, for the report."""
    return {"tracking_uri": mlflow.get_tracking_uri(), "registry_uri": mlflow.get_registry_uri(),
            "experiment": EXPERIMENT}
