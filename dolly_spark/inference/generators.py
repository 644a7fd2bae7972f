"""The generation backends' common ground: the interface the engine calls, and the greedy
generation config they share."""
from __future__ import annotations

from typing import Any, Protocol

from transformers import GenerationConfig

from dolly_spark.inference.encoder import EncodedRow
from dolly_spark.inference.results import EngineStats, GenerationSettings


class Generator(Protocol):
    """Generates one micro-batch (rows sorted longest first): each row's new token ids, stop
    tokens included, in the rows' order. Raises on failure; the engine splits and retries."""

    def generate(self, batch: list[EncodedRow]) -> list[list[int]]: ...


class Backend:
    """What every backend is built with: the model, the settings, the token ids that end a row
    and pad one, and the engine's counters, which the backend adds its micro-batches to."""

    def __init__(self, model: Any, settings: GenerationSettings, stop_ids: list[int], pad_id: int,
                 stats: EngineStats):
        self.model = model
        self.settings = settings
        self.stop_ids = stop_ids
        self.pad_id = pad_id
        self.stats = stats
        self.device = next(model.parameters()).device


def generation_config(settings: GenerationSettings, stop_ids: list[int], pad_id: int) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=settings.max_new_tokens,
        do_sample=False,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        use_cache=True,
        # Off here whatever the checkpoint's generation_config ships: transformers' versions count
        # the prompt and the padding. The engine's own control is ``repetition.RepetitionControl``.
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        # Every micro-batch has its own shape; compiling the forward for the preallocated
        # cache (what generate does on a GPU by default) would recompile again and again.
        disable_compile=True,
    )
