"""Instruction and input to prompt token ids: the prompt format's segments, a length guard that
truncates the input from its end (or refuses the row), and a per-row sampling seed."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from dolly_spark.inference.results import FINISH_ERROR, InstructionResult
from dolly_spark.prompts import PromptFormat, encode_segments, has_context


@dataclass
class EncodedRow:
    """One row ready to generate: its position in the input, its prompt ids, whether its input
    was cut to fit, and its sampling seed."""

    index: int
    ids: list[int]
    truncated: bool
    seed: int


def row_seed(base_seed: int, key: Any) -> int:
    """A 63-bit seed derived from a row's key, stable across processes and retries."""
    digest = hashlib.sha256(f"{base_seed}:{key}".encode()).hexdigest()
    return int(digest[:15], 16)


def context_window(model: Any, tokenizer: Any) -> int:
    """The longest sequence the model takes, from its config or, failing that, its tokenizer."""
    config = model.config
    for attribute in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**7:
        return limit
    raise ValueError("cannot tell the model's context window; set max_position_embeddings in its config")


class PromptEncoder:
    """Encodes rows for one prompt format and tokenizer under a prompt-length limit."""

    def __init__(self, tokenizer: Any, prompt_format: PromptFormat, max_prompt_tokens: int,
                 max_new_tokens: int, on_overlong: str, seed: int):
        self.tokenizer = tokenizer
        self.format = prompt_format
        self.max_prompt_tokens = max_prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.on_overlong = on_overlong
        self.seed = seed

    def encode(self, index: int, instruction: Any, context: Any, key: Any,
               require_context: bool = False) -> EncodedRow | InstructionResult:
        """The row's prompt ids, or the error result it gets instead of generation."""
        if require_context and not (isinstance(context, str) and has_context(context)):
            what = "null" if not isinstance(context, str) else "empty"
            return InstructionResult(None, FINISH_ERROR, error=f"input is {what}; nothing to work on")
        if not isinstance(instruction, str) or not instruction.strip():
            what = "null" if instruction is None or not isinstance(instruction, str) else "empty"
            return InstructionResult(None, FINISH_ERROR, error=f"instruction is {what}; nothing to answer")
        context = context if isinstance(context, str) and has_context(context) else None
        ids = encode_segments(self.tokenizer, self.format.prompt_segments(instruction, context))
        truncated = False
        if len(ids) > self.max_prompt_tokens:
            if self.on_overlong == "error" or context is None:
                return self._overlong(len(ids), context is not None)
            length = len(ids)
            ids = self._truncate_context(instruction, context)
            truncated = True
            if ids is None:
                return self._overlong(length, False)
        seed_key = key if key is not None else f"{instruction}\x00{context}"
        return EncodedRow(index, ids, truncated, row_seed(self.seed, seed_key))

    def _overlong(self, length: int, has_ctx: bool) -> InstructionResult:
        hint = "shorten the input or raise the limit" if has_ctx else "the instruction alone is too long"
        return InstructionResult(
            None, FINISH_ERROR, prompt_tokens=length,
            error=(f"prompt has {length} tokens, over the {self.max_prompt_tokens} that fit "
                   f"(context window minus max_new_tokens={self.max_new_tokens}); {hint}"),
        )

    def _truncate_context(self, instruction: str, context: str) -> list[int] | None:
        """Cut the context from its end until the prompt fits; None when even no context is too long."""
        # A token spans at least one character in practice, so this pre-cut never drops text
        # that could fit and keeps tokenizing a 200,000-character context cheap.
        context = context[: self.max_prompt_tokens * 16]
        context_ids = self.tokenizer(context, add_special_tokens=False, split_special_tokens=True)["input_ids"]
        keep = min(len(context_ids), self.max_prompt_tokens)
        while keep > 0:
            cut = self.tokenizer.decode(context_ids[:keep])
            ids = encode_segments(self.tokenizer, self.format.prompt_segments(instruction, cut))
            if len(ids) <= self.max_prompt_tokens:
                return ids
            keep -= len(ids) - self.max_prompt_tokens
        return None
