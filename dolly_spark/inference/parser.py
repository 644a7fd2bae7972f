"""Generated tokens to a response and a finish reason."""
from __future__ import annotations

import json
from typing import Any, Callable, Collection, Sequence

from dolly_spark.inference.encoder import EncodedRow
from dolly_spark.inference.results import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, InstructionResult


def cut_at_stop(tokens: Sequence[int], key_stop_ids: Collection[int], eos_ids: Collection[int]) -> tuple[list[int], str, int]:
    """The tokens before the first stop, the finish reason, and how many tokens the model
    generated for the answer (the stop token included; what follows it is a finished row's
    padding, not text)."""
    for position, token in enumerate(tokens):
        if token in key_stop_ids:
            return list(tokens[:position]), FINISH_STOP, position + 1
        if token in eos_ids:
            return list(tokens[:position]), FINISH_EOS, position + 1
    return list(tokens), FINISH_LENGTH, len(tokens)


class ResponseParser:
    """The answer between the prompt's response key and the first stop token; a stop key the
    model spelled out as plain text also ends it."""

    def __init__(self, decode: Callable[[list[int]], str], key_stop_ids: Collection[int],
                 eos_ids: Collection[int], stop_strings: Sequence[str],
                 decode_exact: Callable[[list[int]], str] | None = None):
        """``decode_exact`` turns a JSON answer's tokens into its text character for character
        (``decode`` by default)."""
        self.decode = decode
        self.decode_exact = decode_exact or decode
        self.key_stop_ids = key_stop_ids
        self.eos_ids = eos_ids
        self.stop_strings = stop_strings

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, key_stop_ids: Collection[int], eos_ids: Collection[int],
                      stop_strings: Sequence[str]) -> "ResponseParser":
        return cls(lambda ids: tokenizer.decode(ids, skip_special_tokens=True), key_stop_ids, eos_ids, stop_strings,
                   lambda ids: tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False))

    def parse_json(self, row: EncodedRow, tokens: Sequence[int], max_new_tokens: int,
                   sampled: bool) -> InstructionResult:
        """A schema-constrained answer: its JSON text as ``response`` when it parses; otherwise
        the raw text (None when empty) with an error saying why, e.g. that ``max_new_tokens``
        cut it off, retryable only when ``sampled`` (a greedy answer comes out the same again).
        Stop strings are not looked for: the grammar ended the answer, and a JSON string may
        quote "### End"."""
        kept, finish, completion_tokens = cut_at_stop(tokens, self.key_stop_ids, self.eos_ids)
        text = self.decode_exact(kept).strip()
        error = None
        try:
            json.loads(text)
        except ValueError:
            why = (f"cut off by max_new_tokens={max_new_tokens}; raise max_new_tokens" if finish == FINISH_LENGTH
                   else f"the model ended it ('{finish}') before it was complete")
            error = f"answer is not complete JSON: {why}"
        return InstructionResult(text or None, finish, error, len(row.ids), completion_tokens, row.truncated,
                                 retryable=sampled if error else None)

    def parse(self, row: EncodedRow, tokens: Sequence[int], sampled: bool) -> InstructionResult:
        """A generated answer: the text before the first stop; an empty one is an error,
        retryable only when ``sampled`` (a greedy answer comes out the same again)."""
        kept, finish, completion_tokens = cut_at_stop(tokens, self.key_stop_ids, self.eos_ids)
        text = self.decode(kept)
        for stop in self.stop_strings:
            if stop in text:
                text, finish = text.split(stop, 1)[0], FINISH_STOP
        text = text.strip()
        if not text:
            return InstructionResult(None, finish, error=f"empty response: the model produced no text before '{finish}'",
                                     prompt_tokens=len(row.ids), completion_tokens=completion_tokens,
                                     truncated=row.truncated, retryable=sampled)
        return InstructionResult(text, finish, None, len(row.ids), completion_tokens, row.truncated)
