"""What every engine does before and after its model runs, with no weights: rows to prompt ids
under the request's limits (refusing or truncating the same rows whichever engine runs), the
ids of a request's choices, and tokens back to responses and finish reasons.

A ``RowEncoder`` is built from a model's tokenizer and configuration alone
(``RowEncoder.from_pretrained`` reads no weights), so a dry run counts prompt tokens with it, and
the "vllm" engine encodes and parses exactly as the "hf" engine does without loading a second
model. Each request's encoding parts are built once (``RequestEncoding``) and kept for a few
requests: a worker runs one request over many Arrow batches.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import replace
from types import SimpleNamespace
from typing import Any, Callable

from dolly_spark.inference.encoder import (EncodedRow, PromptEncoder, context_window, has_sliding_window,
                                          prompt_limit)
from dolly_spark.inference.engines import Rows
from dolly_spark.inference.parser import ResponseParser
from dolly_spark.inference.results import FINISH_PENDING, InstructionResult
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
from dolly_spark.request import Request

# Requests whose parts are kept: a worker runs one request at a time, and a choice encoding or a
# compiled grammar is worth keeping between its Arrow batches.
REQUESTS_KEPT = 4


class RequestEncoding:
    """One request's encoders: ``prompts`` for generated rows (under the schema's instruction
    with ``json_schema``), ``choice_prompts`` and ``choice_ids`` for scored rows (None without
    choices), and ``end_id``, the token a structured answer ends with."""

    def __init__(self, rows: "RowEncoder", request: Request):
        self.request = request
        self.max_prompt_tokens, limit_reason = prompt_limit(request, rows.window)
        if self.max_prompt_tokens < 1 and request.generates:
            raise ValueError(f"no room for a prompt: {limit_reason} leaves {self.max_prompt_tokens} tokens; "
                             "lower max_new_tokens")
        self.prompts = PromptEncoder(rows.tokenizer, rows.format, self.max_prompt_tokens, limit_reason,
                                     request.on_overlong, request.seed)
        # The one token a structured answer ends with (``### End``, the end of turn or EOS).
        self.end_id = (answer_end_id(rows.tokenizer, rows.format, set(rows.stop_ids), rows.eos_ids)
                       if request.choices or request.json_schema is not None else None)
        self.choice_ids: list[list[int]] | None = None
        self.choice_prompts: PromptEncoder | None = None
        if request.choices:
            self._encode_choices(rows)

    def _encode_choices(self, rows: "RowEncoder") -> None:
        """The choices' answer ids, and the encoder of their prompts, whose limit leaves room for
        the longest choice (not ``max_new_tokens``)."""
        if has_sliding_window(rows.model_config):
            # The scorer prefills whole prompts into one cache, which a sliding-window layer
            # would cut to its window.
            raise ValueError("choices need a model without sliding-window attention; this model's config sets "
                             "sliding_window. Generate the label with json_schema and an enum instead")
        request = self.request
        self.choice_ids = [answer_ids(rows.tokenizer, rows.format, choice, self.end_id) for choice in request.choices]
        limit, reason = prompt_limit(request, rows.window, self.longest_choice)
        if limit < 1:
            raise ValueError(f"no room for a prompt: {reason} leaves {limit} tokens; use shorter choices")
        self.choice_prompts = PromptEncoder(rows.tokenizer, rows.format, limit, reason, request.on_overlong,
                                            request.seed)

    @property
    def longest_choice(self) -> int:
        return max(len(ids) for ids in self.choice_ids or [[]])


class RowEncoder:
    """Rows to prompt ids, and generated tokens back to results, for one tokenizer, prompt format
    and model configuration."""

    def __init__(self, tokenizer: Any, model_config: Any, generation_config: Any = None,
                 prompt_format: str | PromptFormat | None = None):
        self.tokenizer = tokenizer
        self.model_config = model_config
        if prompt_format is None or prompt_format == "auto":
            prompt_format = infer_format_name(tokenizer)
        self.format = get_format(prompt_format, tokenizer) if isinstance(prompt_format, str) else prompt_format
        self.window = context_window(model_config, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.key_stop_ids = dolly_key_ids(tokenizer) if self.format.name == "dolly" else set()
        self.eos_ids = eos_token_ids(SimpleNamespace(generation_config=generation_config), tokenizer)
        self.parser = ResponseParser.for_tokenizer(tokenizer, self.key_stop_ids, self.eos_ids,
                                                   self.format.stop_strings())
        self._requests: OrderedDict[Request, RequestEncoding] = OrderedDict()

    @classmethod
    def for_model(cls, model: Any, tokenizer: Any, prompt_format: str | PromptFormat | None = None) -> "RowEncoder":
        """The encoder of a loaded transformers model."""
        return cls(tokenizer, model.config, getattr(model, "generation_config", None), prompt_format)

    @classmethod
    def from_pretrained(cls, path: str, tokenizer_path: str | None = None,
                        prompt_format: str | PromptFormat | None = None) -> "RowEncoder":
        """The encoder of a checkpoint (a directory or a hub id), from its tokenizer, its model
        config and its generation config (whose end-of-sequence ids bound structured answers);
        no weights are read."""
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path or path)
        try:
            generation_config = GenerationConfig.from_pretrained(path)
        except OSError:  # no generation_config.json: the model config's ids stand
            generation_config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(path))
        return cls(tokenizer, AutoConfig.from_pretrained(path), generation_config, prompt_format)

    @property
    def stop_ids(self) -> list[int]:
        return sorted(self.eos_ids | self.key_stop_ids)

    def prepare(self, request: Request) -> RequestEncoding:
        """``request``'s encoders, built on its first call. Raises a ValueError when the request
        cannot run on this model (no room for a prompt, choices on a sliding-window model)."""
        return kept_for_request(self._requests, request, lambda: RequestEncoding(self, request))

    def encode_rows(self, encoder: PromptEncoder, rewrite: Callable[[str], str] | None, request: Request,
                    instructions: list[Any], contexts: list[Any], keys: list[Any],
                    ) -> tuple[list[InstructionResult | None], list[EncodedRow]]:
        """The error results of rows refused before the model runs, and the other rows encoded;
        ``rewrite`` extends each real instruction (a null or blank one is refused as it is)."""
        results: list[InstructionResult | None] = [None] * len(instructions)
        encoded: list[EncodedRow] = []
        for index, instruction in enumerate(instructions):
            if rewrite is not None and isinstance(instruction, str) and instruction.strip():
                instruction = rewrite(instruction)
            outcome = encoder.encode(index, instruction, contexts[index], keys[index], request.require_input)
            if isinstance(outcome, InstructionResult):
                results[index] = outcome
            else:
                encoded.append(outcome)
        return results, encoded

    def encode_answers(self, request: Request, columns: tuple[list, list, list]):
        """``encode_rows`` for the rows a request generates."""
        return self.encode_rows(self.prepare(request).prompts, schema_rewrite(request), request, *columns)

    def encode_choices(self, request: Request, columns: tuple[list, list, list]):
        """``encode_rows`` for the rows a request scores against its choices."""
        return self.encode_rows(self.prepare(request).choice_prompts, choice_rewrite(request), request, *columns)

    def encode_only(self, rows: Rows, request: Request) -> list[InstructionResult]:
        """What an engine's ``run`` would give each row before the model runs: the error result
        of a row it refuses (null, empty or over-long input), and for the others a result with
        only ``prompt_tokens`` and ``truncated`` set (finish reason "pending"). The counts are
        the ones ``run``'s results carry, so a dry run's token total is the real run's."""
        columns = row_columns(rows)
        labels = _encoded_results(*self.encode_choices(request, columns)) if request.choices else None
        answers = _encoded_results(*self.encode_answers(request, columns)) if request.generates else None
        return combined(labels, answers)


def kept_for_request(kept: OrderedDict, request: Request, build: Callable[[], Any]) -> Any:
    """``kept[request]``, built by ``build`` on its first call; ``kept`` holds the last
    ``REQUESTS_KEPT`` requests' parts (a worker runs one request over many Arrow batches)."""
    value = kept.get(request)
    if value is None:
        value = kept[request] = build()
        while len(kept) > REQUESTS_KEPT:
            kept.popitem(last=False)
    kept.move_to_end(request)
    return value


def row_columns(rows: Rows) -> tuple[list[Any], list[Any], list[Any]]:
    """(instructions, contexts, keys) of ``rows`` as lists of one length (None where not given)."""
    instructions = list(rows.instructions)
    count = len(instructions)
    contexts = list(rows.contexts) if rows.contexts is not None else [None] * count
    if len(contexts) != count or (rows.keys is not None and len(rows.keys) != count):
        raise ValueError("instructions, contexts and keys must have the same length")
    keys = list(rows.keys) if rows.keys is not None else [None] * count
    return instructions, contexts, keys


def schema_rewrite(request: Request) -> Callable[[str], str] | None:
    """How a generated row's instruction is extended: with the schema's, under ``json_schema``."""
    schema = request.json_schema
    return (lambda text: schema_instruction(text, schema)) if schema is not None else None


def choice_rewrite(request: Request) -> Callable[[str], str]:
    """A scored row's instruction, extended with the list of ``choices``."""
    return lambda text: choice_instruction(text, request.choices)


def combined(labels: list[InstructionResult] | None, answers: list[InstructionResult] | None) -> list[InstructionResult]:
    """One result per row from the scored labels, the generated answers, or both."""
    if labels is None or answers is None:
        return labels if answers is None else answers  # type: ignore[return-value]
    return [_with_label(answer, label) for answer, label in zip(answers, labels)]


def _encoded_results(results: list[InstructionResult | None], encoded: list[EncodedRow]) -> list[InstructionResult]:
    """``encode_rows``' outcome as one result per row: the refused rows' errors, and for each
    encoded row its prompt length and truncation."""
    for row in encoded:
        results[row.index] = InstructionResult(None, FINISH_PENDING, prompt_tokens=len(row.ids), truncated=row.truncated)
    return results  # type: ignore[return-value]


def _with_label(answer: InstructionResult, label: InstructionResult) -> InstructionResult:
    """A row's generated answer with its scored label: the label's fields added, both prompts
    counted, and either part's error kept (a row refused for its input says so once)."""
    failed = [part for part in (answer, label) if part.error]
    errors = [answer.error] if answer.error else []
    if label.error and label.error != answer.error:
        errors.append(f"choices: {label.error}")
    # A retry helps only where every failed part may pass on it.
    retryable = all(part.retryable for part in failed) if failed else None
    return replace(answer, error="; ".join(errors) or None, retryable=retryable,
                   prompt_tokens=answer.prompt_tokens + label.prompt_tokens,
                   truncated=answer.truncated or label.truncated, label=label.label,
                   label_probability=label.label_probability, choice_probabilities=label.choice_probabilities)
