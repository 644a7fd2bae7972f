"""The instruction engine: prompts in, one structured result per row out, batched on the model.

Runs without Spark. ``InstructionEngine.run`` is a short composition of the parts in
``dolly_spark.inference``: the row encoder (``row_encoder``, shared with every engine) turns
each row into prompt ids (guarding lengths), the
planner sorts rows by token length and cuts micro-batches under a token budget, a generator
backend (static or continuous batching) generates each micro-batch, and the parser turns each
row's tokens into a response and a finish reason; results come back in input order.

The engine is built once per model and configuration (``EngineConfig``: how rows are run);
each call brings its ``Request`` (what they answer), whose parts the engine prepares once
(``inference.prepared``). Structured answers (the request's ``choices`` and ``json_schema``)
reuse that plan: with
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
from collections import OrderedDict
from typing import Any, Callable

import torch

from dolly_spark.inference.choices import choice_results
from dolly_spark.inference.devices import is_out_of_memory, select_device, select_dtype
from dolly_spark.inference.encoder import EncodedRow
from dolly_spark.inference.engines import EngineConfig, Rows
from dolly_spark.inference.parser import ResponseParser
from dolly_spark.inference.planner import choice_batches, micro_batches
from dolly_spark.inference.prepared import PreparedRequest
from dolly_spark.inference.ragged_attention import ragged_attention
from dolly_spark.inference.results import FINISH_ERROR, EngineStats, InstructionResult
from dolly_spark.inference.row_encoder import RowEncoder, combined, kept_for_request, row_columns
from dolly_spark.prompts import PromptFormat
from dolly_spark.request import Request

log = logging.getLogger(__name__)



class InstructionEngine:
    """The "hf" engine: instructions (with optional inputs) through a transformers causal LM in
    token-budgeted micro-batches."""

    name = "hf"

    def __init__(self, model: Any, tokenizer: Any, prompt_format: str | PromptFormat | None = None,
                 config: EngineConfig | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.config = config or EngineConfig()
        self.rows = RowEncoder.for_model(model, tokenizer, prompt_format)
        # The row encoder's, read here by the backends, the benchmarks and the tests.
        self.format, self.window, self.pad_id = self.rows.format, self.rows.window, self.rows.pad_id
        self.key_stop_ids, self.eos_ids, self.parser = self.rows.key_stop_ids, self.rows.eos_ids, self.rows.parser
        self.device = next(model.parameters()).device
        self.stats = EngineStats()
        self._prepared: OrderedDict[Request, PreparedRequest] = OrderedDict()

    @classmethod
    def from_pretrained(cls, path: str, tokenizer_path: str | None = None,
                        prompt_format: str | PromptFormat | None = None, config: EngineConfig | None = None,
                        gpu_index: int | None = None) -> "InstructionEngine":
        """Load a checkpoint (a local directory or a hub id) onto the best device available, in
        ``config.dtype`` or the device's default (see ``devices.select_dtype``)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        config = config or EngineConfig()
        device = select_device(gpu_index)
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=select_dtype(device, config.dtype)).to(device)
        return cls(model, tokenizer, prompt_format, config)

    def with_config(self, config: EngineConfig) -> "InstructionEngine":
        """An engine on this one's model and tokenizer, under another configuration."""
        return type(self)(self.model, self.tokenizer, self.format, config)

    @property
    def stop_ids(self) -> list[int]:
        return self.rows.stop_ids

    def prepare(self, request: Request) -> PreparedRequest:
        """The parts this engine runs ``request`` with, built on its first call. Raises a
        ValueError when the request cannot run here (no room for a prompt, choices on a
        sliding-window model)."""
        return kept_for_request(self._prepared, request, lambda: PreparedRequest(self, request))

    # ----------------------------------------------------------------------------------------
    def run(self, rows: Rows, request: Request) -> list[InstructionResult]:
        """One result per row, in input order. Never raises for bad rows; raises what generation
        raises for anything that is not one row's problem (see the module docstring).

        With ``request.require_input`` a row whose input is null or blank gets an error result.
        With ``choices`` each result carries a label and the choices' probabilities; with
        ``json_schema`` its response is JSON text (see ``InstructionResult``).
        """
        return run_rows(self, rows, request)

    def _answer(self, prepared: PreparedRequest, instructions: list[Any], contexts: list[Any],
                keys: list[Any]) -> list[InstructionResult]:
        """Every row generated (under the schema's instruction with ``json_schema``)."""
        results, encoded = self.rows.encode_answers(prepared.request, (instructions, contexts, keys))
        for batch in self.micro_batches(encoded, prepared.request):
            generate = lambda rows: self._generate_batch(prepared, rows)  # noqa: E731
            for row, result in zip(batch, self._run_or_split(batch, generate)):
                results[row.index] = result
        return results  # type: ignore[return-value]

    def _classify(self, prepared: PreparedRequest, instructions: list[Any], contexts: list[Any],
                  keys: list[Any]) -> list[InstructionResult]:
        """Every row scored against ``choices`` under the choice instruction."""
        choices = prepared.request.choices
        results, encoded = self.rows.encode_choices(prepared.request, (instructions, contexts, keys))
        plan = choice_batches([len(row.ids) for row in encoded], self.config.token_budget, len(choices),
                              prepared.scorer.longest_choice, self.config.max_batch_rows)
        for batch in [[encoded[i] for i in rows] for rows in plan]:
            score = lambda rows: choice_results(rows, prepared.scorer.log_probs(rows), choices)  # noqa: E731
            for row, result in zip(batch, self._run_or_split(batch, score)):
                results[row.index] = result
        return results  # type: ignore[return-value]

    def micro_batches(self, rows: list[EncodedRow], request: Request) -> list[list[EncodedRow]]:
        """Rows sorted longest first and cut so rows × (longest prompt + max_new_tokens) stays
        within the token budget; a single row over the budget goes alone."""
        plan = micro_batches([len(row.ids) for row in rows], self.config.token_budget, request.max_new_tokens,
                             self.config.max_batch_rows)
        return [[rows[i] for i in batch] for batch in plan]

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
                                      truncated=batch[0].truncated, retryable=True)]
        log.warning("micro-batch of %d rows ran out of memory (%s); splitting and retrying", len(batch), error)
        half = len(batch) // 2
        return self._run_or_split(batch[:half], work) + self._run_or_split(batch[half:], work)

    def _generate_batch(self, prepared: PreparedRequest, batch: list[EncodedRow]) -> list[InstructionResult]:
        tokens = self._generate(prepared, batch)
        request = prepared.request
        return [parse_answer(self.parser, request, row, row_tokens) for row, row_tokens in zip(batch, tokens)]

    def _generate(self, prepared: PreparedRequest, batch: list[EncodedRow]) -> list[list[int]]:
        request = prepared.request
        # Continuous batching is greedy-only here: the row-seeded sampler and the per-row
        # repetition control need the static backend's padded layout.
        if prepared.strategy == "continuous" and (request.sampling or request.controls_repetition
                                                  or prepared.static.grammar is not None):
            log.warning("strategy 'continuous' runs greedy decoding without repetition control or a json_schema "
                        "only; using static batching (temperature=%s, repetition_penalty=%s, "
                        "no_repeat_ngram_size=%s, json_schema set: %s)", request.temperature,
                        request.repetition_penalty, request.no_repeat_ngram_size,
                        prepared.static.grammar is not None)
            prepared.strategy = "static"
        if prepared.strategy == "continuous":
            try:
                return prepared.continuous.generate(batch)
            except Exception as exc:  # noqa: BLE001 - unsupported architectures fall back
                if is_out_of_memory(exc):
                    raise
                log.warning("continuous batching failed (%s); falling back to static batching", exc)
                prepared.strategy = "static"
        # Looked up here, not bound at construction, so the attention policy stays the engine's.
        return prepared.static.generate(batch, ragged_attention)


def run_rows(engine: Any, rows: Rows, request: Request) -> list[InstructionResult]:
    """What an engine's ``run`` is, given its ``prepare``, ``_classify`` and ``_answer`` (each
    engine scores and generates its own way): labels, answers or both, one result per row in
    input order, timed and counted into ``engine.stats``."""
    prepared = engine.prepare(request)
    columns = row_columns(rows)
    started = time.perf_counter()
    labels = engine._classify(prepared, *columns) if request.choices else None
    answers = engine._answer(prepared, *columns) if request.generates else None
    results = combined(labels, answers)
    seconds = time.perf_counter() - started
    engine.stats.generate_seconds += seconds
    engine.stats.rows += len(results)
    failed = sum(r.finish_reason == FINISH_ERROR for r in results)
    log.info("%s engine: %d rows (%d answered with an error): %d tokens generated in %.1fs", engine.name,
             len(results), failed, sum(r.completion_tokens for r in results), seconds)
    return results


def parse_answer(parser: ResponseParser, request: Request, row: EncodedRow, tokens: list[int]) -> InstructionResult:
    """A generated row's result from its tokens: JSON checked under ``json_schema``."""
    if request.json_schema is not None:
        return parser.parse_json(row, tokens, request.max_new_tokens, request.sampling)
    return parser.parse(row, tokens, request.sampling)
