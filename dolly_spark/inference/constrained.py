"""JSON-schema constrained generation: a logits processor that lets each row write only what
the schema allows, then only the answer's end token.

The grammar is llguidance's (a maintained constrained-decoding library, Rust with no Python
dependencies, that reads a fast Hugging Face tokenizer as is): ``answer_grammar``, the schema's
JSON followed by the answer's end token, which the "vllm" engine hands to vLLM's guidance
backend as it is, so both engines end an answer on the same token. The schema is compiled once
per engine (``JsonGrammar``); each row of a micro-batch gets its own matcher, copied from the
compiled one, that follows the row's tokens. The JSON is compact (no free whitespace between
tokens), so a weak model cannot spend its ``max_new_tokens`` on spaces.
"""
from __future__ import annotations

import json
from typing import Any

import llguidance.hf
import torch
from llguidance import LLExecutor, LLMatcher
from llguidance.torch import allocate_token_bitmask, fill_next_token_bitmask_par
from transformers import LogitsProcessor


def answer_grammar(json_schema: str, end_id: int) -> str:
    """A structured answer as an llguidance Lark grammar: compact JSON under ``json_schema``,
    then the token ``end_id`` (``### End`` for Dolly, the end of turn for chat), and nothing else."""
    schema = json.loads(json_schema)
    if isinstance(schema, dict):
        schema = {**schema, "x-guidance": {"whitespace_flexible": False}}
    return f"start: answer <[{end_id}]>\nanswer: %json {json.dumps(schema)}\n"


class JsonGrammar:
    """``json_schema`` compiled for ``tokenizer`` (a fast tokenizer), with ``end_id`` as the only
    token that may end an answer, and only once the JSON is complete. Raises ValueError when
    the schema cannot be compiled or the tokenizer is not a fast one."""

    def __init__(self, tokenizer: Any, json_schema: str, end_id: int):
        try:
            ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, eos_token=end_id)
        except ValueError as exc:
            raise ValueError(f"json_schema needs a fast (Rust) tokenizer; {type(tokenizer).__name__}: {exc}") from None
        # Compact separators and no whitespace runs: the answer is e.g. {"a":1,"b":"x"}.
        try:
            grammar = llguidance.grammar_from("grammar", answer_grammar(json_schema, end_id))
        except ValueError as exc:  # not JSON at all
            raise ValueError(f"json_schema cannot be used to constrain answers: {exc}") from None
        failed, messages = LLMatcher.validate_grammar_with_warnings(grammar, ll_tokenizer)
        if failed:
            raise ValueError(f"json_schema cannot be used to constrain answers: {messages[0]}")
        self.template = LLMatcher(ll_tokenizer, grammar, log_level=0)
        if self.template.is_error():
            raise ValueError(f"json_schema cannot be used to constrain answers: {self.template.get_error()}")
        self.vocab_size = ll_tokenizer.vocab_size
        self.end_id = end_id
        # Masks of a micro-batch's rows are computed in parallel threads (the GIL released).
        self.executor = LLExecutor()

    def constraint(self, rows: int, prompt_width: int) -> "JsonConstraint":
        """A fresh logits processor for a micro-batch of ``rows`` whose generated tokens start at
        column ``prompt_width`` of ``input_ids``."""
        return JsonConstraint(self, rows, prompt_width)


class JsonConstraint(LogitsProcessor):
    """Masks, per row, every token the row's matcher does not allow next. A row that has ended
    is left unmasked: generate only pads it, and an all-masked row would break sampling."""

    def __init__(self, grammar: JsonGrammar, rows: int, prompt_width: int):
        self.grammar = grammar
        self.matchers = [grammar.template.deep_copy() for _ in range(rows)]
        self.ended = [False] * rows
        self.prompt_width = prompt_width
        self.consumed = 0
        self.bitmask = allocate_token_bitmask(rows, grammar.vocab_size)
        self.bit = torch.arange(32, dtype=torch.int32)
        bit = 1 << (grammar.end_id % 32)
        self.end_bit = bit - (1 << 32) if bit >= 1 << 31 else bit  # as a signed 32-bit word

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        new = input_ids[:, self.prompt_width + self.consumed:]
        if new.shape[1]:
            self._follow(new.tolist())
        rows = [row for row, ended in enumerate(self.ended) if not ended]
        if not rows:
            return scores
        fill_next_token_bitmask_par(self.grammar.executor, [(self.matchers[row], row) for row in rows], self.bitmask)
        for row, matcher in enumerate(self.matchers):
            if self.ended[row]:
                self.bitmask[row] = -1  # every bit: the row is only padded now
            elif matcher.is_error():
                # Cannot happen with tokens taken from the mask; end the row rather than go on
                # unconstrained, and its parse says the answer is not complete JSON.
                self.bitmask[row] = 0
                self.bitmask[row, self.grammar.end_id // 32] = self.end_bit
        # Unpacked where the scores are: the packed mask is a 32nd of the bytes to copy.
        packed = self.bitmask.to(scores.device)
        allowed = ((packed.unsqueeze(-1) >> self.bit.to(scores.device)) & 1).view(len(self.ended), -1).bool()
        width = scores.shape[-1]
        # The model's vocabulary may be padded beyond the tokenizer's: those ids are never allowed.
        allowed = allowed[:, :width] if allowed.shape[1] >= width else torch.nn.functional.pad(
            allowed, (0, width - allowed.shape[1]))
        return scores.masked_fill(~allowed, float("-inf"))

    def _follow(self, steps: list[list[int]]) -> None:
        for row, tokens in enumerate(steps):
            for token in tokens:
                if self.ended[row]:
                    break
                self.matchers[row].consume_token(token)
                self.ended[row] = token == self.grammar.end_id
        self.consumed += len(steps[0])
