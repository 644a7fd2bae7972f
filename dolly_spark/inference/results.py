"""What each row gets (InstructionResult) and what an engine counts (EngineStats)."""
from __future__ import annotations

from dataclasses import dataclass, field

FINISH_STOP, FINISH_EOS, FINISH_LENGTH, FINISH_ERROR = "stop", "eos", "length", "error"
# A row encoded and not run: ``RowEncoder.encode_only``'s results (a dry run's counts).
FINISH_PENDING = "pending"


@dataclass
class InstructionResult:
    """What one row gets: the answer, or the reason there is none.

    With ``choices``: ``label`` (one of the choices), ``label_probability`` and
    ``choice_probabilities`` (every choice's, in the order of the request's ``choices``, summing to
    1); with choices alone ``response`` is the label too. With ``json_schema``: ``response`` is
    the JSON text when it parses; otherwise the raw text, with ``error`` saying why.

    ``retryable`` (with an error) says whether running the same request on the same input again
    could change it, as decided where the error was made: a refused input or a greedy answer
    cut off comes out the same every time; an out-of-memory row or a sampled answer may not.
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
    retryable: bool | None = None


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
