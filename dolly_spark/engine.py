"""The instruction engine: prompts in, one structured result per row out, batched on the model.

Runs without Spark. ``InstructionEngine.run`` is a short composition of the parts in
``dolly_spark.inference``: the encoder turns each row into prompt ids (guarding lengths), the
planner sorts rows by token length and cuts micro-batches under a token budget, a generator
backend (static or continuous batching) generates each micro-batch, and the parser turns each
row's tokens into a response and a finish reason; results come back in input order.

Only a row's own problems become error results: bad or over-long input, and a GPU
out-of-memory error on that row alone (a larger micro-batch that runs out of memory is split
and retried). Anything else raises, so the caller (a Spark task) fails and is retried rather
than writing errors for rows that would have succeeded.
"""
from __future__ import annotations

import logging
import time
from typing import Any, Sequence

import torch

from dolly_spark.devices import is_out_of_memory, select_device, select_dtype
from dolly_spark.inference.continuous_batching import ContinuousBatching
from dolly_spark.inference.encoder import EncodedRow, PromptEncoder, context_window, prompt_limit, row_seed
from dolly_spark.inference.parser import ResponseParser
from dolly_spark.inference.planner import micro_batches, prefill_groups
from dolly_spark.inference.results import (
    FINISH_EOS,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    STRATEGIES,
    EngineStats,
    GenerationSettings,
    InstructionResult,
)
from dolly_spark.inference.static_batching import StaticBatching
from dolly_spark.prompts import PromptFormat, dolly_key_ids, eos_token_ids, get_format, infer_format_name
from dolly_spark.ragged_attention import ragged_attention

__all__ = [
    "FINISH_EOS", "FINISH_ERROR", "FINISH_LENGTH", "FINISH_STOP", "STRATEGIES", "EngineStats",
    "GenerationSettings", "InstructionEngine", "InstructionResult", "context_window", "row_seed",
]

log = logging.getLogger(__name__)

# The name the benchmarks' replay of the engine's plan knows rows by.
_Prepared = EncodedRow


class InstructionEngine:
    """Runs instructions (with optional contexts) through a causal LM in token-budgeted batches."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prompt_format: str | PromptFormat | None = None,
        settings: GenerationSettings | None = None,
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.settings = settings = settings or GenerationSettings()
        if prompt_format is None or prompt_format == "auto":
            prompt_format = infer_format_name(tokenizer)
        self.format = get_format(prompt_format, tokenizer) if isinstance(prompt_format, str) else prompt_format
        self.device = next(model.parameters()).device
        self.max_prompt_tokens, limit_reason = prompt_limit(settings, context_window(model, tokenizer))
        if self.max_prompt_tokens < 1:
            raise ValueError(f"no room for a prompt: {limit_reason} leaves {self.max_prompt_tokens} tokens; "
                             "lower max_new_tokens")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.key_stop_ids = dolly_key_ids(tokenizer) if self.format.name == "dolly" else set()
        self.eos_ids = eos_token_ids(model, tokenizer)
        self.stats = EngineStats()
        self._strategy = settings.strategy
        self.encoder = PromptEncoder(tokenizer, self.format, self.max_prompt_tokens, limit_reason,
                                     settings.on_overlong, settings.seed)
        self.parser = ResponseParser.for_tokenizer(tokenizer, self.key_stop_ids, self.eos_ids,
                                                   self.format.stop_strings())
        self.static = StaticBatching(model, settings, self.stop_ids, self.pad_id, self.stats)
        self.continuous = ContinuousBatching(model, settings, self.stop_ids, self.pad_id, self.stats)

    @classmethod
    def from_pretrained(
        cls,
        path: str,
        prompt_format: str | PromptFormat | None = None,
        settings: GenerationSettings | None = None,
        gpu_index: int | None = None,
        tokenizer_path: str | None = None,
        dtype: str | None = None,
    ) -> "InstructionEngine":
        """Load a checkpoint (a local directory or a hub id) onto the best device available, in
        ``dtype`` or the device's default (see ``devices.select_dtype``)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = select_device(gpu_index)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=select_dtype(device, dtype)).to(device)
        return cls(model, tokenizer, prompt_format, settings)

    @property
    def stop_ids(self) -> list[int]:
        return sorted(self.eos_ids | self.key_stop_ids)

    # ----------------------------------------------------------------------------------------
    def run(
        self,
        instructions: Sequence[str | None],
        contexts: Sequence[str | None] | None = None,
        keys: Sequence[Any] | None = None,
        require_context: bool = False,
    ) -> list[InstructionResult]:
        """One result per instruction, in input order. Never raises for bad rows; raises what
        generation raises for anything that is not one row's problem (see the module docstring).

        With ``require_context`` a row whose context is null or blank gets an error result
        (the caller named an input column and the row has no input) instead of a prompt
        without an ``Input:`` block.
        """
        count = len(instructions)
        contexts = list(contexts) if contexts is not None else [None] * count
        if len(contexts) != count or (keys is not None and len(keys) != count):
            raise ValueError("instructions, contexts and keys must have the same length")
        results: list[InstructionResult | None] = [None] * count
        encoded: list[EncodedRow] = []
        for index in range(count):
            outcome = self.encoder.encode(index, instructions[index], contexts[index],
                                          keys[index] if keys is not None else None, require_context)
            if isinstance(outcome, InstructionResult):
                results[index] = outcome
            else:
                encoded.append(outcome)

        started = time.perf_counter()
        batches = self.micro_batches(encoded)
        for batch in batches:
            for row, result in zip(batch, self._generate_or_split(batch)):
                results[row.index] = result
        seconds = time.perf_counter() - started
        self.stats.generate_seconds += seconds
        self.stats.rows += count
        generated = sum(r.completion_tokens for r in results if r is not None)
        log.info("%d rows (%d generated, %d answered with an error before generation) in %d micro-batches: "
                 "%d tokens in %.1fs", count, len(encoded), count - len(encoded), len(batches), generated, seconds)
        return results  # type: ignore[return-value]

    def micro_batches(self, rows: list[EncodedRow]) -> list[list[EncodedRow]]:
        """Rows sorted longest first and cut so rows × (longest prompt + max_new_tokens) stays
        within the token budget; a single row over the budget goes alone."""
        settings = self.settings
        plan = micro_batches([len(row.ids) for row in rows], settings.token_budget, settings.max_new_tokens,
                             settings.max_batch_rows)
        return [[rows[i] for i in batch] for batch in plan]

    def prefill_groups(self, batch: list[EncodedRow]) -> list[list[EncodedRow]]:
        """A micro-batch (longest first) cut into runs whose rows are at least
        ``min_length_ratio`` as long as the run's first."""
        plan = prefill_groups([len(row.ids) for row in batch], self.settings.min_length_ratio)
        return [[batch[p] for p in group] for group in plan]

    # ----------------------------------------------------------------------------------------
    def _generate_or_split(self, batch: list[EncodedRow]) -> list[InstructionResult]:
        """Generate a micro-batch; on GPU out-of-memory split it in halves and retry, so only a
        row that runs out of memory on its own gets an error. Any other exception propagates."""
        try:
            results = [self.parser.parse(row, tokens) for row, tokens in zip(batch, self._generate(batch))]
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            # Only the text is kept: the exception's traceback holds the failed batch's frames
            # and so its tensors, which must be freed before the halves run. Hence the retry
            # below, after this block, where Python has released the exception.
            error = f"{type(exc).__name__}: {exc}"
            del exc
        else:
            self.stats.prompt_tokens += sum(r.prompt_tokens for r in results)
            self.stats.completion_tokens += sum(r.completion_tokens for r in results)
            return results
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if len(batch) == 1:
            log.warning("row %d ran out of memory on its own: %s", batch[0].index, error)
            return [InstructionResult(None, FINISH_ERROR, error=error, prompt_tokens=len(batch[0].ids),
                                      truncated=batch[0].truncated)]
        log.warning("micro-batch of %d rows ran out of memory (%s); splitting and retrying", len(batch), error)
        half = len(batch) // 2
        return self._generate_or_split(batch[:half]) + self._generate_or_split(batch[half:])

    def _generate(self, batch: list[EncodedRow]) -> list[list[int]]:
        # Continuous batching is greedy-only here: the row-seeded sampler and the per-row
        # repetition control need the static backend's padded layout.
        if self._strategy == "continuous" and (self.settings.sampling or self.settings.controls_repetition):
            log.warning("strategy 'continuous' runs greedy decoding without repetition control only; "
                        "using static batching (temperature=%s, repetition_penalty=%s, no_repeat_ngram_size=%s)",
                        self.settings.temperature, self.settings.repetition_penalty, self.settings.no_repeat_ngram_size)
            self._strategy = "static"
        if self._strategy == "continuous":
            try:
                return self.continuous.generate(batch)
            except Exception as exc:  # noqa: BLE001 - unsupported architectures fall back
                if is_out_of_memory(exc):
                    raise
                log.warning("continuous batching failed (%s); falling back to static batching", exc)
                self._strategy = "static"
        # Looked up here, not bound at construction, so the attention policy stays the engine's.
        return self.static.generate(batch, ragged_attention)
