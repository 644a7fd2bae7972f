"""Decoding attention that reads only the live part of a left-padded, preallocated KV cache.

A micro-batch decodes as one batch over a cache sized for its longest prompt plus every new
token. With plain SDPA, each decoding step of each row reads the whole cache: the left padding
of short prompts and the slots of tokens not generated yet, all masked out. When short and long
prompts share a micro-batch that is most of the cache, and on a memory-bound decode those reads
cost as much as the weights. This attention function keeps SDPA's arithmetic but hands it, for
each run of rows of similar length (the engine's prefill groups, longest first), only the
columns from where that run's longest prompt starts to the last token written so far.

It is registered as an attention implementation under ``RAGGED_SDPA``; ``ragged_attention``
switches an SDPA model to it for one ``generate`` call. Steps it cannot slice safely (a prompt
prefill, a batch of another shape) go to plain SDPA unchanged.
"""
from __future__ import annotations

import contextlib
import threading
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from dolly_spark.inference.encoder import has_sliding_window

RAGGED_SDPA = "dolly_spark_ragged_sdpa"


@dataclass
class CacheLayout:
    """Where each run of rows has live keys in the cache during one ``generate`` call.

    ``runs`` holds (first row, end row, first live column) per run of consecutive rows;
    ``written`` is how many columns the cache holds before the first single-token step; each
    single-token step of a layer adds one, counted on the host so no device value is read back.
    """

    runs: list[tuple[int, int, int]]
    written: int
    steps: dict[int, int] = field(default_factory=dict)

    def live_end(self, layer_idx: int | None) -> int | None:
        """Columns written once this step's token is in the cache; None if the layer is unknown."""
        if layer_idx is None:
            return None
        self.steps[layer_idx] = self.steps.get(layer_idx, 0) + 1
        return self.written + self.steps[layer_idx]


_layout: ContextVar[CacheLayout | None] = ContextVar("dolly_spark_cache_layout", default=None)


# Models switched to the ragged attention, by id, with how many generate calls are using them:
# engines in several threads may share one model, and only the last one out restores SDPA.
_switch_lock = threading.Lock()
_users: dict[int, int] = {}


@contextlib.contextmanager
def ragged_attention(model: Any, layout: CacheLayout) -> Iterator[bool]:
    """For the duration of the block (one ``generate`` call), a model that runs on SDPA decodes
    with the ragged attention over ``layout``; other models are left as they are. Yields whether
    the ragged attention is in use. The model's own setting is restored when the last block
    using the model ends."""
    with _switch_lock:
        switched = _users.get(id(model), 0) > 0 or _can_switch(model)
        if switched and id(model) not in _users:
            model.set_attn_implementation(RAGGED_SDPA)
            switched = model.config._attn_implementation == RAGGED_SDPA
        if switched:
            _users[id(model)] = _users.get(id(model), 0) + 1
    token = _layout.set(layout if switched else None)
    try:
        yield switched
    finally:
        _layout.reset(token)
        if switched:
            with _switch_lock:
                _users[id(model)] -= 1
                if not _users[id(model)]:
                    del _users[id(model)]
                    model.set_attn_implementation("sdpa")


def _can_switch(model: Any) -> bool:
    config = model.config
    return (getattr(config, "_attn_implementation", None) == "sdpa" and hasattr(model, "set_attn_implementation")
            # one implementation for the whole model: nothing to restore per sub-model
            and not getattr(config, "sub_configs", None) and not has_sliding_window(config))


def ragged_sdpa_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    layout = _layout.get()
    if (layout is None or query.shape[2] != 1 or query.shape[0] != layout.runs[-1][1]
            or (attention_mask is not None and attention_mask.shape[-1] != key.shape[2])
            or kwargs.get("position_bias") is not None  # a bias over the columns is not cut here
            or torch.compiler.is_compiling()):  # the host-side step count does not run in a graph
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    end = layout.live_end(getattr(module, "layer_idx", None))
    if end is None or end > key.shape[2]:
        end = key.shape[2]
    outputs = []
    for first, stop, start in layout.runs:
        mask = attention_mask[first:stop, ..., start:end] if attention_mask is not None else None
        out, _ = sdpa_attention_forward(module, query[first:stop], key[first:stop, :, start:end],
                                        value[first:stop, :, start:end], mask, **kwargs)
        outputs.append(out)
    return torch.cat(outputs), None


AttentionInterface.register(RAGGED_SDPA, ragged_sdpa_forward)
ALL_MASK_ATTENTION_FUNCTIONS.register(RAGGED_SDPA, sdpa_mask)

