"""The benchmark's models: registered once in a benchmark-only MLflow registry, resolved once.

Every variant of a model's run reads the same registered version: apply_instruction and
mlflow.pyfunc.spark_udf through its ``models:/name/version`` URI, the hand-written pipeline
UDF and the bare engine through the files apply_instruction's workers download (the node-local
model cache). The registry is a SQLite file under ``<project home>/bench/``, apart from the demo's
registry, so ``make bench`` never adds versions to models a user works with.

For (b) at a pipeline batch size above 1, each model also gets a benchmark-only copy,
``<name>_pyfunc_batched``: the same files and stored inference config, with ``batch_size``
declared as an inference param (see ``register_batched_pyfunc``).
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
from dolly_spark.lifecycle.registry import CHAMPION, ModelSpec, alias_version, log_and_register, resolve_model
from dolly_spark.paths import project_home

log = logging.getLogger(__name__)

MODEL_KEYS = ("tiny", "demo")
TINY_NAME, DEMO_NAME = "bench_tiny_dolly", "bench_smollm2"
EXPERIMENT = "dolly_spark_bench"
# The tiny model: dolly_spark.testing.tiny_models's GPT-NeoX, with a context window that holds the longest
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
    model_dir: str  # the MLflow model directory of the version (MLmodel, requirements.txt, ...)

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
    from dolly_spark.testing.tiny_models import build_tiny_model, train_tiny_tokenizer

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
    from dolly_spark.batch.demo import ensure_demo_model_registered

    ensure_demo_model_registered(DEMO_NAME)
    return f"models:/{DEMO_NAME}@{CHAMPION}"


def prepare_model(key: str, seed: int) -> BenchModel:
    """Register (or reuse) model ``key``, resolve its alias to one version and fetch its files."""
    from dolly_spark.lifecycle.loader import checkpoint_paths, fetch_model_files

    if key not in MODEL_KEYS:
        raise ValueError(f"unknown model {key!r}; choose from {', '.join(MODEL_KEYS)}")
    alias_uri = register_tiny(seed) if key == "tiny" else register_demo()
    spec = resolve_model(alias_uri)
    model_dir = fetch_model_files(spec)
    model_path, tokenizer_path = checkpoint_paths(model_dir)
    return BenchModel(key, spec, model_path, tokenizer_path, _prompt_template(Path(model_dir)), model_dir)


BATCHED_SUFFIX = "_pyfunc_batched"
SOURCE_TAG, RECIPE_TAG = "bench_source", "bench_batched_recipe"
# What the batched copy changes; a copy made by another recipe is not reused.
BATCHED_RECIPE = "signature params + batch_size (long, default 1); tokenizer saved with padding_side=left"


def register_batched_pyfunc(bench: BenchModel) -> str:
    """``models:/<name>_pyfunc_batched/<v>``: ``bench``'s version as mlflow.pyfunc serves it at a
    pipeline batch size above 1. Registered once per source version (a version tag names it).

    MLflow 3.17's transformers pyfunc calls the pipeline with the stored ``model_config`` merged
    with the call's params, and ``batch_size`` is an argument of that call; but spark_udf drops
    params the signature does not declare and ``model_config`` keys the logged config does not
    have, and the registered versions declare only ``max_new_tokens``. So this copy is the same
    weights, tokenizer, prompt template, stored config, metadata and requirements, with the
    signature declaring ``batch_size`` (default 1) beside ``max_new_tokens``. A batched
    decoder-only pipeline must pad on the left and needs a pad token: the copy's tokenizer is
    saved with ``padding_side="left"`` (transformers' text-generation pipeline also switches a
    right-padding tokenizer to the left when it loads) and gets the EOS as pad token if it has
    none. Nothing else differs.
    """
    from mlflow.models import ModelSignature
    from mlflow.pyfunc import MODEL_CONFIG
    from mlflow.tracking import MlflowClient
    from mlflow.types.schema import ParamSchema, ParamSpec
    from transformers import AutoModelForCausalLM, AutoTokenizer

    name = bench.spec.name + BATCHED_SUFFIX
    client = MlflowClient()
    try:
        for version in client.search_model_versions(f"name='{name}'"):
            if version.tags.get(SOURCE_TAG) == bench.uri and version.tags.get(RECIPE_TAG) == BATCHED_RECIPE:
                return f"models:/{name}/{version.version}"
    except mlflow.exceptions.MlflowException:
        pass
    info = mlflow.models.get_model_info(bench.uri)
    signature = info.signature
    params = [p for p in (signature.params.params if signature.params else []) if p.name != "batch_size"]
    batched = ModelSignature(signature.inputs, signature.outputs,
                             ParamSchema([*params, ParamSpec("batch_size", "long", 1)]))
    # Passed to the constructor, not set afterwards: only constructor arguments are saved.
    tokenizer = AutoTokenizer.from_pretrained(bench.tokenizer_path, padding_side="left")
    pad_added = tokenizer.pad_token is None
    if pad_added:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(bench.model_path)
    metadata = {k: v for k, v in (info.metadata or {}).items() if k != "prompt_template"}
    config = info.flavors["python_function"].get(MODEL_CONFIG) or {}
    with mlflow.start_run(run_name=f"register-{name}"):
        logged = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer}, name="model", task="text-generation",
            signature=batched, prompt_template=bench.prompt_template,
            model_config=config,
            metadata={**metadata, SOURCE_TAG: bench.uri}, registered_model_name=name,
            pip_requirements=str(Path(bench.model_dir) / "requirements.txt"),
        )
    version = str(logged.registered_model_version)
    stored = mlflow.models.get_model_info(f"models:/{name}/{version}").flavors["python_function"].get(MODEL_CONFIG)
    if stored != config:  # greedy decoding and the stop tokens live there
        raise RuntimeError(f"{name} version {version} stores inference config {stored}, not {bench.uri}'s {config}")
    client.set_model_version_tag(name, version, SOURCE_TAG, bench.uri)
    client.set_model_version_tag(name, version, RECIPE_TAG, BATCHED_RECIPE)
    client.set_model_version_tag(name, version, "bench_pad_token_added", str(pad_added))
    log.info("registered %s version %s: %s with batch_size as an inference param", name, version, bench.uri)
    return f"models:/{name}/{version}"


def pipeline_batch_check(model_uri: str, inputs: list[str], batch_sizes: list[int]) -> dict[str, Any]:
    """Whether ``batch_size`` reaches the pipeline: ``model_uri`` loaded with mlflow.pyfunc (as
    spark_udf's workers load it), then each batch size passed as a param to ``predict`` on
    ``inputs`` with max_new_tokens=1, counting the rows of every forward call the pipeline makes.
    Also the pyfunc load seconds: in local mode spark_udf loads the model in each task, so
    about that much of each (b) timed run is loading."""
    import time

    from dolly_spark.lifecycle.loader import fetch_model_files

    started = time.perf_counter()
    model = mlflow.pyfunc.load_model(fetch_model_files(resolve_model(model_uri)))
    load_seconds = time.perf_counter() - started
    pipe = model.get_raw_model()
    seen: list[int] = []
    forward = pipe._forward

    def counting_forward(model_inputs, **kwargs):
        seen.append(int(model_inputs["input_ids"].shape[0]))
        return forward(model_inputs, **kwargs)

    pipe._forward = counting_forward
    checks = []
    for batch_size in batch_sizes:
        seen.clear()
        model.predict(inputs, params={"max_new_tokens": 1, "batch_size": batch_size})
        checks.append({"batch_size": batch_size, "rows": len(inputs), "forward_rows": list(seen),
                       "reaches_pipeline": max(seen, default=0) == min(batch_size, len(inputs))})
    return {"model_uri": model_uri, "pyfunc_load_seconds": load_seconds,
            "tokenizer_padding_side": pipe.tokenizer.padding_side, "pad_token_id": pipe.tokenizer.pad_token_id,
            "checks": checks}


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
