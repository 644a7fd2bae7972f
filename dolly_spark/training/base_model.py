"""The model a fine-tune starts from: loaded unmodified, with the prompt format it answers best in."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dolly_spark.prompts import infer_format_name


@dataclass
class BaseModel:
    """A loaded base model. ``uri`` names exactly this model again: a registry base as
    ``models:/name/version`` (never an alias, which moves), a local checkpoint as its absolute
    path, a hub id as itself."""

    model: Any
    tokenizer: Any
    uri: str
    registered_format: str | None = None
    # The repetition control registered with the version (see ``registry.log_and_register``),
    # which the jobs generate with: the same goes for scoring it.
    repetition: dict[str, float | int] = field(default_factory=dict)

    @property
    def own_format(self) -> str:
        return own_format(self.tokenizer, self.registered_format)


def own_format(tokenizer: Any, registered: str | None = None) -> str:
    """The prompt format a model answers best in: its registered one, else the one its unmodified
    tokenizer shows (Dolly keys in the vocabulary, as in a Dolly checkpoint, else a chat template,
    else plain text)."""
    return registered or infer_format_name(tokenizer)


def load_base_model(base_model: str) -> BaseModel:
    """A hub id, a local checkpoint or a registered model URI, in fp32, as it is."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dolly_spark.lifecycle.loader import local_model_paths
    from dolly_spark.lifecycle.registry import resolve_model

    model_path = tokenizer_path = uri = base_model
    registered_format, repetition = None, {}
    if base_model.startswith("models:/"):
        spec = resolve_model(base_model)
        model_path, tokenizer_path = local_model_paths(spec)
        uri, registered_format, repetition = spec.uri, spec.prompt_format, spec.registered_defaults
    elif Path(base_model).expanduser().exists():
        uri = str(Path(base_model).expanduser().resolve())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return BaseModel(model, tokenizer, uri, registered_format, repetition)
