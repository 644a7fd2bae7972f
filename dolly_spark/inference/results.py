"""What the engine is told (GenerationSettings), what each row gets (InstructionResult) and
what the engine counts (EngineStats)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

FINISH_STOP, FINISH_EOS, FINISH_LENGTH, FINISH_ERROR = "stop", "eos", "length", "error"
STRATEGIES = ("static", "continuous")


@dataclass(frozen=True)
class GenerationSettings:
    """How the engine generates.

    ``token_budget`` bounds each micro-batch: rows × (longest prompt + max_new_tokens), the
    tokens its KV cache holds at the end. Within a micro-batch, prompts are prefilled in groups
    of similar length: a row shorter than ``min_length_ratio`` of its group's longest prompt
    starts a new group (0 prefills the micro-batch as one group); then the whole micro-batch
    decodes together. ``max_input_tokens`` caps each prompt (template, instruction and input);
    the prompt limit is the least of it, the model's context window and ``token_budget``, each
    less ``max_new_tokens``, so no row ever needs a micro-batch over the budget. A prompt over
    the limit follows ``on_overlong``: "truncate" cuts the context from its end and flags the
    row; "error" answers the row with an error instead.
    ``repetition_penalty`` (> 1 discourages every token already in the row's answer, with
    transformers' arithmetic; 1.0: off) and ``no_repeat_ngram_size`` (no n-gram of that size twice
    in a row's answer; 0: off) stop the loops small models fall into. Unlike transformers' options
    of the same names, they never count the prompt, so an answer may quote its input.
    ``reuse_prefix``: the prompt tokens every row of a micro-batch shares (the template and a
    literal instruction, before each row's input) are prefilled once, not once per row.

    Structured answers (see ``dolly_spark.prompts.choice_instruction`` and
    ``schema_instruction`` for what the model is told):
    ``choices`` (at least two distinct, non-blank labels; a list is kept as a tuple) makes each
    row's answer exactly one of them, chosen by scoring, not generation: every label's tokens and
    the answer's end are scored after the row's prompt, and the row gets the likeliest label, its
    probability and every label's probability (a softmax over the labels, in this order).
    ``json_schema`` (a JSON Schema as JSON text; a dict is serialised) constrains generation so
    the answer is compact JSON the schema allows, ended by the model's stop token. With both,
    each row gets a label and a JSON answer.
    """

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    token_budget: int = 16384
    max_input_tokens: int = 4096
    max_batch_rows: int = 64
    min_length_ratio: float = 0.75
    on_overlong: str = "truncate"
    strategy: str = "static"
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    reuse_prefix: bool = True
    choices: tuple[str, ...] = ()
    json_schema: str | None = None

    def __post_init__(self):
        # Normalised here, so equal settings hash alike (they key the engine cache).
        if not isinstance(self.choices, tuple):
            if isinstance(self.choices, str):
                raise ValueError(f"choices must be a list of labels, not the string {self.choices!r}")
            object.__setattr__(self, "choices", tuple(self.choices))
        if self.json_schema is not None and not isinstance(self.json_schema, str):
            object.__setattr__(self, "json_schema", json.dumps(self.json_schema))
        check_choices(self.choices)
        if self.json_schema is not None:
            check_json_schema(self.json_schema)
        if self.on_overlong not in ("truncate", "error"):
            raise ValueError(f"on_overlong must be 'truncate' or 'error', not {self.on_overlong!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, not {self.strategy!r}")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be at least 1")
        if self.max_input_tokens < 1:
            raise ValueError(f"max_input_tokens must be at least 1, not {self.max_input_tokens}")
        if self.token_budget <= self.max_new_tokens:
            raise ValueError(
                f"token_budget={self.token_budget} leaves no room for a prompt beside max_new_tokens="
                f"{self.max_new_tokens}: a micro-batch holds rows x (prompt + max_new_tokens) tokens; "
                "raise token_budget or lower max_new_tokens"
            )
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


def check_choices(choices: tuple[Any, ...]) -> None:
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
    try:
        schema = json.loads(json_schema)
    except json.JSONDecodeError as exc:
        raise ValueError(f"json_schema is not valid JSON ({exc}); pass the schema as JSON text") from None
    if not isinstance(schema, dict):
        raise ValueError(f"json_schema must be a JSON object (a JSON Schema), not {type(schema).__name__}")


@dataclass
class InstructionResult:
    """What one row gets: the answer, or the reason there is none.

    With ``choices``: ``label`` (one of the choices), ``label_probability`` and
    ``choice_probabilities`` (every choice's, in the order of ``settings.choices``, summing to
    1); with choices alone ``response`` is the label too. With ``json_schema``: ``response`` is
    the JSON text when it parses; otherwise the raw text, with ``error`` saying why.
    """

    response: str | None
    finish_reason: str
    error: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    truncated: bool = False
    label: str | None = None
    label_probability: float | None = None
    choice_probabilities: list[float] | None = None


@dataclass
class EngineStats:
    """Counters over every ``run`` of an engine, for logs and benchmarks."""

    rows: int = 0
    micro_batches: list[tuple[int, int]] = field(default_factory=list)  # (rows, longest prompt), decoded together
    prefill_groups: list[tuple[int, int]] = field(default_factory=list)  # (rows, padded prompt length)
    prompt_tokens: int = 0
    padded_prompt_tokens: int = 0
    completion_tokens: int = 0
    generated_slots: int = 0  # rows × decoding steps, finished rows included
    generate_seconds: float = 0.0
    # Prompt tokens whose keys and values were copied from a micro-batch's shared prefix,
    # computed once, instead of being prefilled again for each row.
    reused_prefix_tokens: int = 0
    # (rows, longest prompt) of each micro-batch whose choices were scored together.
    choice_batches: list[tuple[int, int]] = field(default_factory=list)

    @property
    def padding_waste(self) -> float:
        """Padded tokens processed per real token (1.0 means no padding at all)."""
        real = self.prompt_tokens + self.completion_tokens
        return (self.padded_prompt_tokens + self.generated_slots) / real if real else 0.0
