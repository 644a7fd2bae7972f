"""What the generation backends share: what each is built with, the greedy generation config,
and the keyword a model's forward takes its KV cache under."""
from __future__ import annotations

import inspect
from typing import Any

from transformers import GenerationConfig

from dolly_spark.inference.engines import EngineConfig
from dolly_spark.inference.results import EngineStats
from dolly_spark.request import Request


class Backend:
    """What every backend is built with: the model, the request and the engine's configuration,
    the token ids that end a row and pad one, and the engine's counters, which the backend adds
    its micro-batches to. A backend generates one micro-batch at a time (rows sorted longest
    first): each row's new token ids, stop tokens included, in the rows' order; it raises on
    failure, and the engine splits and retries."""

    def __init__(self, model: Any, request: Request, config: EngineConfig, stop_ids: list[int], pad_id: int,
                 stats: EngineStats):
        self.model = model
        self.request = request
        self.config = config
        self.stop_ids = stop_ids
        self.pad_id = pad_id
        self.stats = stats
        self.device = next(model.parameters()).device


def generation_config(max_new_tokens: int, stop_ids: list[int], pad_id: int) -> GenerationConfig:
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
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


def cache_argument(model: Any) -> str:
    """The keyword a model's forward (and generate) takes a KV cache under: ``cache`` in newer
    transformers, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
