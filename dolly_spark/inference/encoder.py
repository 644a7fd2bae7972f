"""Instruction and input to prompt token ids: the prompt format's segments, a length guard that
truncates the input from its end (or refuses the row), and a per-row sampling seed."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from dolly_spark.inference.results import FINISH_ERROR, InstructionResult
from dolly_spark.prompts import PromptFormat, encode_segments, has_context
from dolly_spark.request import Request

# More characters per token than any natural text averages (English prose is about 4, code
# about 3). An input longer than this many characters per allowed token is clearly over the
# limit, so only that much of it is ever tokenized: a 200,000-character ticket costs what a
# ticket at the limit costs.
MAX_CHARS_PER_TOKEN = 16

@dataclass
class EncodedRow:
    """One row ready to generate: its position in the input, its prompt ids, whether its input
    was cut to fit, and its sampling seed."""

    index: int
    ids: list[int]
    truncated: bool
    seed: int


def refused(error: str, prompt_tokens: int = 0) -> InstructionResult:
    """The result of a row refused before generation (a null or empty input or instruction, a
    prompt over the limit): it follows from the row's input and the request alone, so the same
    request on the same input meets it again and a retry cannot help."""
    return InstructionResult(None, FINISH_ERROR, error=error, prompt_tokens=prompt_tokens, retryable=False)


def row_seed(base_seed: int, key: Any) -> int:
    """A 63-bit seed derived from a row's key, stable across processes and retries."""
    digest = hashlib.sha256(f"{base_seed}:{key}".encode()).hexdigest()
    return int(digest[:15], 16)


def context_window(config: Any, tokenizer: Any) -> int:
    """The longest sequence a model takes, from its config or, failing that, its tokenizer."""
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**7:
        return limit
    raise ValueError("cannot tell the model's context window; set max_position_embeddings in its config")


def has_sliding_window(config: Any) -> bool:
    """A sliding-window layer keeps a rolling buffer whose columns are not absolute positions,
    so the live columns cannot be cut by position there."""
    layer_types = getattr(config, "layer_types", None) or []
    return bool(getattr(config, "sliding_window", None)) or any(kind != "full_attention" for kind in layer_types)


def prompt_limit(request: Request, window: int, choice_tokens: int | None = None) -> tuple[int, str]:
    """The most prompt tokens a row may have, and which limit that is, in words: the lesser of
    ``max_input_tokens`` and the context window less ``max_new_tokens`` (the answer needs room
    there too). With ``choice_tokens`` (the longest choice a row is scored on) the answer is that
    many tokens instead.

    Only the request and the model set it: the engine's token budget decides which rows run
    together, never which are cut or refused (a row over the budget runs alone), so raising the
    budget never changes an answer."""
    if choice_tokens is None:
        new, answer = request.max_new_tokens, f"max_new_tokens={request.max_new_tokens}"
    else:
        new, answer = choice_tokens, f"the longest choice's {choice_tokens} tokens"
    limits = {
        f"max_input_tokens={request.max_input_tokens}": request.max_input_tokens,
        f"the model's context window of {window} minus {answer}": window - new,
    }
    reason = min(limits, key=limits.__getitem__)
    return limits[reason], reason


class PromptEncoder:
    """Encodes rows for one prompt format and tokenizer under a prompt-length limit;
    ``limit_reason`` says in words where the limit comes from, for error messages."""

    def __init__(self, tokenizer: Any, prompt_format: PromptFormat, max_prompt_tokens: int,
                 limit_reason: str, on_overlong: str, seed: int):
        self.tokenizer = tokenizer
        self.format = prompt_format
        self.max_prompt_tokens = max_prompt_tokens
        self.limit_reason = limit_reason
        self.on_overlong = on_overlong
        self.seed = seed
        self.max_context_chars = max_prompt_tokens * MAX_CHARS_PER_TOKEN

    def encode(self, index: int, instruction: Any, context: Any, key: Any,
               require_context: bool = False) -> EncodedRow | InstructionResult:
        """The row's prompt ids, or the error result it gets instead of generation."""
        if require_context and not (isinstance(context, str) and has_context(context)):
            what = "null" if not isinstance(context, str) else "empty"
            return refused(f"input is {what}; nothing to work on")
        if not isinstance(instruction, str) or not instruction.strip():
            what = "null" if instruction is None or not isinstance(instruction, str) else "empty"
            return refused(f"instruction is {what}; nothing to answer")
        context = context if isinstance(context, str) and has_context(context) else None
        clipped = context is not None and len(context) > self.max_context_chars
        ids = self._prompt_ids(instruction, context[: self.max_context_chars] if clipped else context)
        if clipped and len(ids) <= self.max_prompt_tokens:
            # Tokens longer than MAX_CHARS_PER_TOKEN on average (runs of spaces, say): count
            # the whole input rather than guess.
            clipped = False
            ids = self._prompt_ids(instruction, context)
        truncated = False
        if len(ids) > self.max_prompt_tokens:
            if self.on_overlong == "error" or context is None:
                return self._overlong(len(ids), context is not None, counted_all=not clipped)
            length = len(ids)
            ids = self._truncate_context(instruction, context)
            truncated = True
            if ids is None:
                return self._overlong(length, False, counted_all=not clipped)
        seed_key = key if key is not None else f"{instruction}\x00{context}"
        return EncodedRow(index, ids, truncated, row_seed(self.seed, seed_key))

    def _prompt_ids(self, instruction: str, context: str | None) -> list[int]:
        return encode_segments(self.tokenizer, self.format.prompt_segments(instruction, context))

    def _overlong(self, length: int, has_ctx: bool, counted_all: bool = True) -> InstructionResult:
        """The error result of a prompt over the limit; ``counted_all`` is False when only the
        input's first ``max_context_chars`` characters were tokenized (``length`` is then a
        lower bound)."""
        hint = "shorten the input or raise the limit" if has_ctx else "the instruction alone is too long"
        count = f"{length}" if counted_all else f"at least {length}"
        return refused(f"prompt has {count} tokens, over the {self.max_prompt_tokens} that fit "
                       f"({self.limit_reason}); {hint}", prompt_tokens=length)

    def _truncate_context(self, instruction: str, context: str) -> list[int] | None:
        """Cut the context from its end until the prompt fits; None when even no context is too long."""
        # Text past this cut could only fit if its tokens averaged more than MAX_CHARS_PER_TOKEN
        # characters; the cut keeps tokenizing a 200,000-character context cheap.
        context = context[: self.max_context_chars]
        context_ids = self.tokenizer(context, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        keep = min(len(context_ids), self.max_prompt_tokens)
        while keep > 0:
            cut = self.tokenizer.decode(context_ids[:keep])
            ids = self._prompt_ids(instruction, cut)
            if len(ids) <= self.max_prompt_tokens:
                return ids
            keep -= len(ids) - self.max_prompt_tokens
        return None
