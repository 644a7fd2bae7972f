"""The MLflow model registry: log and register models, and resolve a model URI on the driver.

``resolve_model`` turns what a caller passes (``models:/name/3``, ``models:/name@champion``,
``models:/<model id>``, a local checkpoint path, a hub id) into a ``ModelSpec``: one concrete,
immutable model that every executor loads, with its prompt format from the model's metadata.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from dolly_spark.lifecycle.aliases import CHALLENGER, CHAMPION  # noqa: F401 - re-exported
from dolly_spark.request import REGISTERED_DEFAULTS, ModelSpec

log = logging.getLogger(__name__)

_REGISTRY_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:/(?P<version>[^/@]+)|@(?P<alias>[^/@]+))?/?$")


class ModelNotFoundError(ValueError):
    """The model URI names no model, version or alias that exists."""


def resolve_model(model_uri: str, prompt_format: str | None = None) -> ModelSpec:
    """Resolve ``model_uri`` to one concrete model; raise ModelNotFoundError naming what is missing.

    An alias is resolved here, once: an alias moved afterwards does not change the result.
    ``prompt_format`` overrides the one recorded in the model's metadata.
    """
    if model_uri.startswith("models:/"):
        return _resolve_registry_uri(model_uri, prompt_format)
    path = Path(model_uri).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"model path {str(path)!r} exists but holds no config.json; pass a transformers "
                "checkpoint directory (save_pretrained output)."
            )
        resolved = str(path.resolve())
        return ModelSpec("local", resolved, path.name, _checkpoint_fingerprint(path), prompt_format)
    if model_uri.startswith(("/", ".", "~")) or model_uri.count("/") > 1:
        raise ModelNotFoundError(f"model path {model_uri!r} does not exist")
    # Anything else is a hub id such as databricks/dolly-v2-3b, downloaded by transformers.
    return ModelSpec("hub", model_uri, model_uri, "hub", prompt_format)


def _resolve_registry_uri(model_uri: str, prompt_format: str | None) -> ModelSpec:
    match = _REGISTRY_URI.match(model_uri)
    if not match:
        raise ModelNotFoundError(
            f"cannot read model URI {model_uri!r}; use models:/<name>/<version>, "
            "models:/<name>@<alias> or models:/<model id>"
        )
    client = MlflowClient()
    name, version, alias = match["name"], match["version"], match["alias"]
    if version is None and alias is None:
        if name.startswith("m-"):
            return _resolve_logged_model(client, name, prompt_format)
        raise ModelNotFoundError(
            f"model URI {model_uri!r} names no version or alias; use models:/{name}/<version> or "
            f"models:/{name}@{CHAMPION}"
        )
    try:
        if alias is not None:
            model_version = client.get_model_version_by_alias(name, alias)
        elif version == "latest":
            model_version = max(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version))
        else:
            model_version = client.get_model_version(name, version)
    except (MlflowException, ValueError) as exc:
        raise ModelNotFoundError(_missing_message(client, model_uri, name)) from exc
    metadata = _model_metadata(f"models:/{name}/{model_version.version}")
    return ModelSpec(
        "registry",
        f"models:/{name}/{model_version.version}",
        name,
        str(model_version.version),
        prompt_format or metadata.get("prompt_format"),
        mlflow.get_tracking_uri(),
        mlflow.get_registry_uri(),
        _generation_defaults(metadata),
    )


def _resolve_logged_model(client: MlflowClient, model_id: str, prompt_format: str | None) -> ModelSpec:
    try:
        logged = mlflow.get_logged_model(model_id)
    except MlflowException as exc:
        raise ModelNotFoundError(f"no logged model with id {model_id!r} in {mlflow.get_tracking_uri()}") from exc
    metadata = _model_metadata(f"models:/{model_id}")
    return ModelSpec("registry", f"models:/{model_id}", logged.name, model_id,
                     prompt_format or metadata.get("prompt_format"),
                     mlflow.get_tracking_uri(), mlflow.get_registry_uri(), _generation_defaults(metadata))


def _generation_defaults(metadata: dict[str, Any]) -> tuple[tuple[str, float], ...]:
    recorded = metadata.get("generation_defaults") or {}
    return tuple((name, recorded[name]) for name in REGISTERED_DEFAULTS if name in recorded)


def _missing_message(client: MlflowClient, model_uri: str, name: str) -> str:
    try:
        registered = client.get_registered_model(name)
    except MlflowException:
        return (f"model URI {model_uri!r}: no registered model {name!r} in the registry at "
                f"{mlflow.get_registry_uri()}; register one first (dolly-spark finetune) or check the name")
    aliases = sorted(registered.aliases or {})
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    return (f"model URI {model_uri!r}: registered model {name!r} has no such version or alias; "
            f"versions: {versions}, aliases: {aliases}")


def _model_metadata(uri: str) -> dict[str, Any]:
    try:
        return mlflow.models.get_model_info(uri).metadata or {}
    except MlflowException:
        return {}


def _checkpoint_fingerprint(path: Path) -> str:
    """A version tag for a local checkpoint that changes when its weights change."""
    weights = sorted(path.glob("*.safetensors")) + sorted(path.glob("*.bin"))
    stamp = max((w.stat().st_mtime_ns for w in weights), default=path.stat().st_mtime_ns)
    return f"local-{stamp}"


# --------------------------------------------------------------------------------------------
def log_and_register(
    model: Any,
    tokenizer: Any,
    registered_name: str,
    prompt_format: str,
    alias: str | None = None,
    metadata: dict[str, Any] | None = None,
    max_new_tokens: int = 256,
    repetition_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> str:
    """Log ``model`` and ``tokenizer`` with the transformers flavor in the active run (one is
    started when none is), register them as a new version of ``registered_name``, point
    ``alias`` at it, and return the version.

    The metadata records the prompt format, so ``apply_instruction`` picks it without being
    told. The prompt template, stop tokens and tokenization recorded with the model give plain
    ``mlflow.pyfunc`` callers the answers ``apply_instruction`` gives to instructions without
    input; only user text that spells a special token differs (the pipeline reads it as one).
    Repetition control given here becomes the version's default for ``apply_instruction`` (its
    metadata). It stays out of the pipeline's model config: transformers' options of the same
    names also count the prompt, which keeps answers from quoting their input (see
    ``dolly_spark.inference.repetition``), so plain pyfunc callers generate without it.
    """
    from mlflow.models import infer_signature

    from dolly_spark.prompts import stop_token_ids

    signature = infer_signature(["What is Spark?"], ["A distributed engine."], params={"max_new_tokens": max_new_tokens})
    repetition = {name: value for name, value, off in (("repetition_penalty", repetition_penalty, 1.0),
                                                       ("no_repeat_ngram_size", no_repeat_ngram_size, 0))
                  if value != off}
    started_here = mlflow.active_run() is None
    if started_here:
        mlflow.start_run(run_name=f"register-{registered_name}")
    try:
        info = mlflow.transformers.log_model(
            transformers_model={"model": model, "tokenizer": tokenizer},
            name="model",
            task="text-generation",
            signature=signature,
            prompt_template=_prompt_template(prompt_format, tokenizer),
            model_config={
                # Greedy unless a caller asks otherwise: the text-generation pipeline would
                # otherwise sample with the model's default temperature.
                "do_sample": False,
                "max_new_tokens": max_new_tokens,
                # The pipeline tokenizes the filled template with the tokenizer's defaults, which
                # for some tokenizers prepend a BOS; the prompt already holds all the special
                # tokens it needs (a chat template writes its own BOS), as the engine encodes it.
                "add_special_tokens": False,
                # The pipeline would stop on the generation config's EOS only.
                "eos_token_id": stop_token_ids(model, tokenizer, prompt_format),
            },
            metadata={"prompt_format": prompt_format, **({"generation_defaults": repetition} if repetition else {}),
                      **(metadata or {})},
            registered_model_name=registered_name,
            # Stated, not inferred: inference imports optional packages (torchvision) that a
            # text model does not need, and fails where they are missing.
            pip_requirements=_pip_requirements(),
        )
    finally:
        if started_here:
            mlflow.end_run()
    version = str(info.registered_model_version)
    if alias:
        MlflowClient().set_registered_model_alias(registered_name, alias, version)
    log.info("registered %s version %s%s", registered_name, version, f" as @{alias}" if alias else "")
    return version


def _prompt_template(prompt_format: str, tokenizer: Any) -> str:
    """The engine's prompt for an instruction without input, as an MLflow prompt template: plain
    ``mlflow.pyfunc`` callers get the prompt ``apply_instruction`` builds."""
    from dolly_spark.prompts import get_format

    sentinel = "\x00"
    text = get_format(prompt_format, tokenizer).prompt(sentinel)
    if text.count(sentinel) != 1:
        raise ValueError(f"the {prompt_format!r} prompt format does not show the instruction exactly once")
    # MLflow fills {prompt} with str.format, so the template's own braces must be literal.
    return text.replace("{", "{{").replace("}", "}}").replace(sentinel, "{prompt}")


def _pip_requirements() -> list[str]:
    from importlib.metadata import version

    return [_requirement(package, version(package)) for package in ("transformers", "torch", "accelerate", "tokenizers")]


def _requirement(package: str, installed: str) -> str:
    """``package==version`` without the version's local part (``torch==2.5.1`` for ``2.5.1+cu121``):
    local builds such as a Databricks runtime's CUDA torch are not on PyPI, so an environment
    rebuilt from the pins (``spark_udf(env_manager="virtualenv")``, model serving) would fail."""
    from packaging.version import Version

    return f"{package}=={Version(installed).public}"


def alias_version(name: str, alias: str) -> str | None:
    """The version ``alias`` points at, or None when the alias (or the model) does not exist."""
    try:
        return str(MlflowClient().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_alias(name: str, alias: str, version: str) -> None:
    """Point ``models:/<name>@<alias>`` at ``version`` of the registered model ``name``."""
    MlflowClient().set_registered_model_alias(name, alias, version)
