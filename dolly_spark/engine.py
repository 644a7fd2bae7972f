"""The instruction engine: prompts in, one structured result per row out, batched on the model.

Runs without Spark. ``InstructionEngine.run`` is a short composition of the parts in
``dolly_spark.inference``: the encoder turns each row into prompt ids (guarding lengths), the
planner sorts rows by token length and cuts micro-batches under a token budget, a generator
backend (static or continuous batching) generates each micro-batch, and the parser turns each
row's tokens into a response and a finish reason; results come back in input order.

Structured answers (``GenerationSettings.choices`` and ``json_schema``) reuse that plan: with
``choices`` each row's prompt is scored against every label (``inference.choices``: one prefill,
no decoding loop); with ``json_schema`` the static backend generates under a grammar
(``inference.constrained``) and the parser checks that the answer is complete JSON. With both,
a row is scored and generated, each under its own instruction (see ``prompts``).

Only a row's own problems become error results: bad or over-long input, and a GPU
out-of-memory error on that row alone (a larger micro-batch that runs out of memory is split
and retried). Anything else raises, so the caller (a Spark task) fails and is retried rather
than writing errors for rows that would have succeeded.
"""
from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from dolly_spark.devices import is_out_of_memory, select_device, select_dtype
from dolly_spark.inference.choices import ChoiceScorer, choice_results
from dolly_spark.inference.continuous_batching import ContinuousBatching
from dolly_spark.inference.encoder import EncodedRow, PromptEncoder, context_window, prompt_limit, row_seed
from dolly_spark.inference.parser import ResponseParser
from dolly_spark.inference.planner import choice_batches, micro_batches, prefill_groups
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
from dolly_spark.prompts import (
    PromptFormat,
    answer_end_id,
    answer_ids,
    choice_instruction,
    dolly_key_ids,
    eos_token_ids,
    get_format,
    infer_format_name,
    schema_instruction,
)
from dolly_spark.ragged_attention import has_sliding_window, ragged_attention

if TYPE_CHECKING:
    from dolly_spark.inference.constrained import JsonGrammar

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
        window = context_window(model, tokenizer)
        self.max_prompt_tokens, limit_reason = prompt_limit(settings, window)
        if self.max_prompt_tokens < 1 and settings.generates:
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
        # The one token a structured answer ends with (``### End``, the end of turn or EOS).
        self.end_id = (answer_end_id(tokenizer, self.format, set(self.stop_ids), self.eos_ids)
                       if settings.choices or settings.json_schema is not None else None)
        self.static = StaticBatching(model, settings, self.stop_ids, self.pad_id, self.stats,
                                     grammar=self._grammar(tokenizer))
        self.continuous = ContinuousBatching(model, settings, self.stop_ids, self.pad_id, self.stats)
        self.scorer, self.choice_encoder = self._choice_parts(tokenizer, window)

    def _grammar(self, tokenizer: Any) -> "JsonGrammar | None":
        """``json_schema`` compiled once for this engine; None without one."""
        if self.settings.json_schema is None:
            return None
        from dolly_spark.inference.constrained import JsonGrammar  # llguidance, only where it is used

        return JsonGrammar(tokenizer, self.settings.json_schema, self.end_id)

    def _choice_parts(self, tokenizer: Any, window: int) -> tuple[ChoiceScorer | None, PromptEncoder | None]:
        """The scorer of ``choices`` and the encoder of their prompts, whose limit leaves room
        for the longest choice (not ``max_new_tokens``); (None, None) without choices."""
        settings = self.settings
        if not settings.choices:
            return None, None
        if has_sliding_window(self.model.config):
            # The scorer prefills whole prompts into one cache, which a sliding-window layer
            # would cut to its window.
            raise ValueError("choices need a model without sliding-window attention; this model's config sets "
                             "sliding_window. Generate the label with json_schema and an enum instead")
        choice_ids = [answer_ids(tokenizer, self.format, choice, self.end_id) for choice in settings.choices]
        scorer = ChoiceScorer(self.model, choice_ids, self.pad_id, self.stats)
        limit, reason = prompt_limit(settings, window, scorer.longest_choice)
        if limit < 1:
            raise ValueError(f"no room for a prompt: {reason} leaves {limit} tokens; "
                             "raise token_budget or use shorter or fewer choices")
        return scorer, PromptEncoder(tokenizer, self.format, limit, reason, settings.on_overlong, settings.seed)

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
        without an ``Input:`` block. With ``choices`` each result carries a label and the
        choices' probabilities; with ``json_schema`` its response is JSON text (see
        ``InstructionResult``).
        """
        count = len(instructions)
        contexts = list(contexts) if contexts is not None else [None] * count
        if len(contexts) != count or (keys is not None and len(keys) != count):
            raise ValueError("instructions, contexts and keys must have the same length")
        keys = list(keys) if keys is not None else [None] * count
        started = time.perf_counter()
        labels = self._classify(instructions, contexts, keys, require_context) if self.scorer else None
        answers = self._answer(instructions, contexts, keys, require_context) if self.settings.generates else None
        if labels is None or answers is None:
            results = labels if answers is None else answers
        else:
            results = [_with_label(answer, label) for answer, label in zip(answers, labels)]
        seconds = time.perf_counter() - started
        self.stats.generate_seconds += seconds
        self.stats.rows += count
        generated = sum(r.completion_tokens for r in results)
        failed = sum(r.finish_reason == FINISH_ERROR for r in results)
        log.info("%d rows (%d answered with an error): %d tokens generated in %.1fs", count, failed, generated, seconds)
        return results

    def _answer(self, instructions: Sequence[Any], contexts: list[Any], keys: list[Any],
                require_context: bool) -> list[InstructionResult]:
        """Every row generated (under the schema's instruction with ``json_schema``)."""
        schema = self.settings.json_schema
        rewrite = (lambda text: schema_instruction(text, schema)) if schema is not None else None
        results, encoded = self._encode(self.encoder, rewrite, instructions, contexts, keys, require_context)
        for batch in self.micro_batches(encoded):
            for row, result in zip(batch, self._run_or_split(batch, self._generate_batch)):
                results[row.index] = result
        return results  # type: ignore[return-value]

    def _classify(self, instructions: Sequence[Any], contexts: list[Any], keys: list[Any],
                  require_context: bool) -> list[InstructionResult]:
        """Every row scored against ``choices`` under the choice instruction."""
        choices = self.settings.choices
        results, encoded = self._encode(self.choice_encoder, lambda text: choice_instruction(text, choices),
                                        instructions, contexts, keys, require_context)
        for batch in self.choice_batches(encoded):
            for row, result in zip(batch, self._run_or_split(batch, self._score_batch)):
                results[row.index] = result
        return results  # type: ignore[return-value]

    @staticmethod
    def _encode(encoder: PromptEncoder, rewrite: Callable[[str], str] | None, instructions: Sequence[Any],
                contexts: list[Any], keys: list[Any], require_context: bool,
                ) -> tuple[list[InstructionResult | None], list[EncodedRow]]:
        """The error results of rows refused before the model runs, and the other rows encoded;
        ``rewrite`` extends each real instruction (a null or blank one is refused as it is)."""
        results: list[InstructionResult | None] = [None] * len(instructions)
        encoded: list[EncodedRow] = []
        for index, instruction in enumerate(instructions):
            if rewrite is not None and isinstance(instruction, str) and instruction.strip():
                instruction = rewrite(instruction)
            outcome = encoder.encode(index, instruction, contexts[index], keys[index], require_context)
            if isinstance(outcome, InstructionResult):
                results[index] = outcome
            else:
                encoded.append(outcome)
        return results, encoded

    def micro_batches(self, rows: list[EncodedRow]) -> list[list[EncodedRow]]:
        """Rows sorted longest first and cut so rows × (longest prompt + max_new_tokens) stays
        within the token budget; a single row over the budget goes alone."""
        settings = self.settings
        plan = micro_batches([len(row.ids) for row in rows], settings.token_budget, settings.max_new_tokens,
                             settings.max_batch_rows)
        return [[rows[i] for i in batch] for batch in plan]

    def choice_batches(self, rows: list[EncodedRow]) -> list[list[EncodedRow]]:
        """Rows sorted longest first and cut so rows × choices × (longest prompt + longest
        choice) stays within the token budget: each row's cache is copied once per choice."""
        settings = self.settings
        plan = choice_batches([len(row.ids) for row in rows], settings.token_budget, len(settings.choices),
                              self.scorer.longest_choice, settings.max_batch_rows)
        return [[rows[i] for i in batch] for batch in plan]

    def prefill_groups(self, batch: list[EncodedRow]) -> list[list[EncodedRow]]:
        """A micro-batch (longest first) cut into runs whose rows are at least
        ``min_length_ratio`` as long as the run's first."""
        plan = prefill_groups([len(row.ids) for row in batch], self.settings.min_length_ratio)
        return [[batch[p] for p in group] for group in plan]

    # ----------------------------------------------------------------------------------------
    def _run_or_split(self, batch: list[EncodedRow],
                      work: Callable[[list[EncodedRow]], list[InstructionResult]]) -> list[InstructionResult]:
        """``work`` (generating or scoring) on a micro-batch; on GPU out-of-memory split it in
        halves and retry, so only a row that runs out of memory on its own gets an error. Any
        other exception propagates."""
        try:
            results = work(batch)
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
        return self._run_or_split(batch[:half], work) + self._run_or_split(batch[half:], work)

    def _generate_batch(self, batch: list[EncodedRow]) -> list[InstructionResult]:
        tokens = self._generate(batch)
        if self.settings.json_schema is not None:
            return [self.parser.parse_json(row, row_tokens, self.settings.max_new_tokens)
                    for row, row_tokens in zip(batch, tokens)]
        return [self.parser.parse(row, row_tokens) for row, row_tokens in zip(batch, tokens)]

    def _score_batch(self, batch: list[EncodedRow]) -> list[InstructionResult]:
        return choice_results(batch, self.scorer.log_probs(batch), self.settings.choices)

    def _generate(self, batch: list[EncodedRow]) -> list[list[int]]:
        # Continuous batching is greedy-only here: the row-seeded sampler and the per-row
        # repetition control need the static backend's padded layout.
        if self._strategy == "continuous" and (self.settings.sampling or self.settings.controls_repetition
                                               or self.static.grammar is not None):
            log.warning("strategy 'continuous' runs greedy decoding without repetition control or a json_schema "
                        "only; using static batching (temperature=%s, repetition_penalty=%s, "
                        "no_repeat_ngram_size=%s, json_schema set: %s)", self.settings.temperature,
                        self.settings.repetition_penalty, self.settings.no_repeat_ngram_size,
                        self.static.grammar is not None)
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


def _with_label(answer: InstructionResult, label: InstructionResult) -> InstructionResult:
    """A row's generated answer with its scored label: the label's fields added, both prompts
    counted, and either part's error kept (a row refused for its input says so once)."""
    errors = [answer.error] if answer.error else []
    if label.error and label.error != answer.error:
        errors.append(f"choices: {label.error}")
    return replace(answer, error="; ".join(errors) or None, prompt_tokens=answer.prompt_tokens + label.prompt_tokens,
                   truncated=answer.truncated or label.truncated, label=label.label,
                   label_probability=label.label_probability, choice_probabilities=label.choice_probabilities)
