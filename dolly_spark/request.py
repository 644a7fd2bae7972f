"""What an answer depends on, built once on the driver: the resolved model version and the request.

A ``Request`` holds the model version (``ModelSpec``: name, version, prompt format, registered
defaults), the instruction, the sampling and repetition settings, the input guard and the
output spec (``choices``, ``json_schema``). It is frozen and hashable; ``fingerprint()`` is the
one place a request's identity is made, so the summarize job reprocesses exactly what a change
of any of these affects. How rows are run (engine, token budget, batch rows, dtype, prefix
reuse) is engine configuration (``dolly_spark.inference.engines.EngineConfig``): it never
enters the fingerprint.

``build_request`` is the one place a version's registered defaults apply: a setting the caller
leaves unset (None) takes the value registered with the version, else its off value.

No Spark, no MLflow, no torch here: every layer imports this.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Sequence

ON_OVERLONG = ("truncate", "error")
# Registered defaults a version may carry, with their types and off values.
REGISTERED_DEFAULTS = {"repetition_penalty": (float, 1.0), "no_repeat_ngram_size": (int, 0)}


@dataclass(frozen=True)
class ModelSpec:
    """One concrete model, as executors load it.

    ``kind`` is "registry" (``uri`` is ``models:/name/version`` or ``models:/<model id>``),
    "local" (a checkpoint directory) or "hub" (an id the hub serves). ``prompt_format`` None
    means: infer it from the tokenizer when loading. ``generation_defaults``: the generation
    settings registered with the version (repetition control), as (name, value) pairs.
    """

    kind: str
    uri: str
    name: str
    version: str
    prompt_format: str | None = None
    tracking_uri: str | None = None
    registry_uri: str | None = None
    generation_defaults: tuple[tuple[str, float], ...] = ()

    @property
    def cache_key(self) -> str:
        """A directory name unique to this model version in its registry (two registries may
        both hold a version 1 of the same name)."""
        origin = hashlib.sha256(f"{self.registry_uri}|{self.uri}".encode()).hexdigest()[:10]
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{self.name}-{self.version}").strip("_")
        return f"{safe}-{origin}"

    @property
    def registered_defaults(self) -> dict[str, float | int]:
        """The settings registered with this version, typed as a Request takes them."""
        return {name: REGISTERED_DEFAULTS[name][0](value) for name, value in self.generation_defaults
                if name in REGISTERED_DEFAULTS}


@dataclass(frozen=True)
class Request:
    """Everything an answer depends on. ``model`` is None only for an engine driven directly on
    a model in memory (a test, a benchmark, a fine-tune's scoring).

    ``instruction`` is one string for every row, or None when each row brings its own.
    ``require_input``: a row whose input is null or blank gets an error instead of a prompt
    without an ``Input:`` block. Greedy unless ``temperature`` > 0; when sampling, each row's
    seed derives from ``seed`` and its key. ``repetition_penalty`` (> 1 discourages tokens the
    answer already holds; 1.0 off) and ``no_repeat_ngram_size`` (0 off) count the answer only.
    ``max_input_tokens`` caps each prompt; a longer input is cut from its end and flagged
    (``on_overlong="truncate"``) or refused (``"error"``). ``choices`` (two or more distinct
    labels) are scored, not generated; ``json_schema`` (JSON Schema text) constrains generated
    answers; ``output_type`` is the Spark type answers are parsed into (its JSON), which the
    fingerprint counts because it changes the typed result.
    """

    model: ModelSpec | None = None
    instruction: str | None = None
    require_input: bool = False
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    max_input_tokens: int = 4096
    on_overlong: str = "truncate"
    choices: tuple[str, ...] = ()
    json_schema: str | None = None
    output_type: str | None = None

    def __post_init__(self):
        # Normalised here, so equal requests hash alike (they key each engine's prepared parts).
        if not isinstance(self.choices, tuple):
            if isinstance(self.choices, str):
                raise ValueError(f"choices must be a list of labels, not the string {self.choices!r}")
            object.__setattr__(self, "choices", tuple(self.choices))
        if self.json_schema is not None and not isinstance(self.json_schema, str):
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        check_choices(self.choices)
        if self.json_schema is not None:
            check_json_schema(self.json_schema)
        if self.instruction is not None and not (isinstance(self.instruction, str) and self.instruction.strip()):
            raise ValueError("instruction must be a non-empty string (or None: one instruction per row)")
        if self.on_overlong not in ON_OVERLONG:
            raise ValueError(f"on_overlong must be 'truncate' or 'error', not {self.on_overlong!r}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.max_input_tokens < 1:
            raise ValueError(f"max_input_tokens must be at least 1, not {self.max_input_tokens}")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise ValueError(
                f"need temperature >= 0, 0 < top_p <= 1 and top_k >= 0 (0: off); got temperature="
                f"{self.temperature}, top_p={self.top_p}, top_k={self.top_k}"
            )
        if self.repetition_penalty <= 0 or self.no_repeat_ngram_size < 0:
            raise ValueError(f"need repetition_penalty > 0 (1.0: off) and no_repeat_ngram_size >= 0 (0: off); got "
                             f"{self.repetition_penalty} and {self.no_repeat_ngram_size}")

    @property
    def sampling(self) -> bool:
        return self.temperature > 0

    @property
    def controls_repetition(self) -> bool:
        return self.repetition_penalty != 1.0 or self.no_repeat_ngram_size > 0

    @property
    def generates(self) -> bool:
        """Whether rows are generated: always, except with ``choices`` alone (scored only)."""
        return self.json_schema is not None or not self.choices

    def fingerprint_fields(self) -> dict[str, Any]:
        """What the fingerprint hashes: the model version and format, the instruction, the input
        guard, and, when anything is generated, the settings that change generated text. Labels
        alone are scored, never generated: generation settings do not change them. Fields are
        added only where they differ from what every earlier fingerprint assumed (greedy, input
        required, truncation), so results written before them stay current."""
        model = self.model
        fields: dict[str, Any] = {
            "model_name": model.name if model else None, "model_version": model.version if model else None,
            "prompt_format": (model.prompt_format if model else None) or "auto",
            "instruction": self.instruction, "max_input_tokens": self.max_input_tokens,
        }
        if self.generates:
            decoding: Any = "greedy"
            if self.sampling:
                decoding = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                            "seed": self.seed}
            fields.update({"max_new_tokens": self.max_new_tokens, "decoding": decoding,
                           "repetition_penalty": float(self.repetition_penalty),
                           "no_repeat_ngram_size": float(self.no_repeat_ngram_size)})
        if self.choices:
            fields["choices"] = list(self.choices)
        if self.output_type is not None or self.json_schema is not None:
            fields["schema"] = self.output_type if self.output_type is not None else self.json_schema
        if not self.require_input:
            fields["require_input"] = False
        if self.on_overlong != "truncate":
            fields["on_overlong"] = self.on_overlong
        return fields

    def fingerprint(self) -> str:
        """A stable hash of ``fingerprint_fields`` (key order irrelevant)."""
        return hashlib.sha256(json.dumps(self.fingerprint_fields(), sort_keys=True, default=str).encode()).hexdigest()


def build_request(model: ModelSpec | None, instruction: str | None = None, *,
                  repetition_penalty: float | None = None, no_repeat_ngram_size: int | None = None,
                  **settings: Any) -> Request:
    """The request for ``model``, with the defaults registered with its version wherever the
    caller left a setting unset (None); ``settings`` are the other ``Request`` fields."""
    chosen = {"repetition_penalty": repetition_penalty, "no_repeat_ngram_size": no_repeat_ngram_size}
    return Request(model, instruction, **in_effect(chosen, model.registered_defaults if model else {}), **settings)


def in_effect(chosen: dict[str, Any], registered: dict[str, float | int]) -> dict[str, float | int]:
    """The registered defaults in effect: each of ``chosen`` (a default's name to the caller's
    value, None when unset) takes the caller's value, else the registered one, else its off value."""
    return {name: (value if value is not None else registered.get(name, REGISTERED_DEFAULTS[name][1]))
            for name, value in chosen.items()}


def check_choices(choices: Sequence[Any]) -> None:
    """Raises ValueError unless ``choices`` is empty (no classification) or at least two
    distinct, non-blank strings."""
    if not choices:
        return
    if not all(isinstance(choice, str) for choice in choices):
        raise ValueError(f"choices must be strings; got {choices!r}")
    if len(choices) < 2:
        raise ValueError(f"choices needs at least two labels to choose between; got {list(choices)!r}")
    if any(not choice.strip() for choice in choices):
        raise ValueError(f"choices must not be empty or blank; got {list(choices)!r}")
    stripped = [choice.strip() for choice in choices]
    repeated = sorted({choice for choice in stripped if stripped.count(choice) > 1})
    if repeated:
        raise ValueError(f"choices must be distinct; {repeated!r} given more than once in {list(choices)!r}")


def check_json_schema(json_schema: str) -> None:
    """Raises ValueError unless ``json_schema`` is JSON text of a JSON object (a schema)."""
    json_schema_object(json_schema)


def json_schema_object(text: str, name: str = "json_schema") -> dict[str, Any]:
    """The JSON object (a JSON Schema) in ``text``; a ValueError that calls it ``name`` when
    ``text`` is not JSON, or not an object."""
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON ({exc}); pass the schema as JSON text") from None
    if not isinstance(schema, dict):
        raise ValueError(f"{name} must be a JSON object (a JSON Schema), not {type(schema).__name__}")
    return schema
