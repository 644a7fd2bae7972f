"""The continuous backend: transformers' ``generate_batch`` (paged KV cache, requests joining
and leaving the running batch). Greedy only; the engine falls back to static batching where an
architecture or a transformers version does not support it."""
from __future__ import annotations

import gc
import math

import torch
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from dolly_spark.inference.encoder import EncodedRow
from dolly_spark.inference.backend import Backend, generation_config


def default_page_size() -> int:
    """Tokens per page of the paged cache, at transformers' default: the field is
    ``block_size`` in transformers 5.17 (the GPU image's) and ``page_size`` in later versions,
    so it is read, never passed."""
    defaults = ContinuousBatchingConfig()
    return getattr(defaults, "page_size", None) or defaults.block_size


def cache_for(batch: list[EncodedRow], max_new_tokens: int) -> ContinuousBatchingConfig:
    """A paged cache that holds ``batch`` whole and no more. Left to itself, the cache takes 90 %
    of the free memory of its device, which on a CPU is the machine's RAM (14-20 GB here for a
    tiny model), however small the micro-batch: the engine's token budget bounds it instead."""
    page_size = default_page_size()
    pages = sum(math.ceil((len(row.ids) + max_new_tokens) / page_size) for row in batch)
    return ContinuousBatchingConfig(num_blocks=pages + 1,
                                    max_batch_tokens=sum(len(row.ids) for row in batch))


class ContinuousBatching(Backend):
    def generate(self, batch: list[EncodedRow]) -> list[list[int]]:
        config = generation_config(self.request.max_new_tokens, self.stop_ids, self.pad_id)
        try:
            # no_grad, not inference_mode: the manager runs its loop in a thread of its own, and
            # some transformers versions update there, in place, tensors made in this thread.
            with torch.no_grad():
                # Warm-up captures CUDA graphs; on the CPU it only costs time.
                outputs = self.model.generate_batch(inputs=[row.ids for row in batch], generation_config=config,
                                                    continuous_batching_config=cache_for(batch, config.max_new_tokens),
                                                    progress_bar=False, warmup=self.device.type == "cuda")
        except Exception:
            self.release_memory()
            raise
        ordered = sorted(outputs.values(), key=lambda out: int(str(out.request_id).rsplit("_", 1)[-1]))
        failed = [out.error for out in ordered if out.error is not None]
        if failed or len(ordered) != len(batch):
            self.release_memory()
            # The manager logs and swallows errors per request; surface them so we fall back.
            raise RuntimeError(f"continuous batching failed for {len(failed) or len(batch)} rows: {failed[:1]}")
        tokens = [list(out.generated_tokens) for out in ordered]
        self.stats.micro_batches.append((len(batch), max(len(row.ids) for row in batch)))
        self.stats.prefill_groups += [(1, len(row.ids)) for row in batch]
        self.stats.padded_prompt_tokens += sum(len(row.ids) for row in batch)
        self.stats.generated_slots += sum(len(t) for t in tokens)
        return tokens

    def release_memory(self) -> None:
        """The paged cache sizes itself to the free GPU memory; a failed manager must give it
        back before static batching runs, or that fails for want of memory."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
