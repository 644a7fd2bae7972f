"""What an engine builds once per request: the encoders under the request's prompt limits, the
backends that generate under its settings (and its grammar), and the scorer of its choices.

An engine keeps a few of these, keyed by the request (frozen, hashable), so a Python worker
that runs one request over many Arrow batches compiles a schema's grammar and encodes the
choices once.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dolly_spark.inference.choices import ChoiceScorer
from dolly_spark.inference.continuous_batching import ContinuousBatching
from dolly_spark.inference.encoder import PromptEncoder, prompt_limit
from dolly_spark.inference.ragged_attention import has_sliding_window
from dolly_spark.inference.static_batching import StaticBatching
from dolly_spark.prompts import answer_end_id, answer_ids
from dolly_spark.request import Request

if TYPE_CHECKING:
    from dolly_spark.inference.constrained import JsonGrammar
    from dolly_spark.inference.engine import InstructionEngine


class PreparedRequest:
    """The per-request parts of an ``InstructionEngine``."""

    def __init__(self, engine: "InstructionEngine", request: Request):
        config = engine.config
        self.request = request
        self.max_prompt_tokens, limit_reason = prompt_limit(request, engine.window)
        if self.max_prompt_tokens < 1 and request.generates:
            raise ValueError(f"no room for a prompt: {limit_reason} leaves {self.max_prompt_tokens} tokens; "
                             "lower max_new_tokens")
        self.encoder = PromptEncoder(engine.tokenizer, engine.format, self.max_prompt_tokens, limit_reason,
                                     request.on_overlong, request.seed)
        # The one token a structured answer ends with (``### End``, the end of turn or EOS).
        self.end_id = (answer_end_id(engine.tokenizer, engine.format, set(engine.stop_ids), engine.eos_ids)
                       if request.choices or request.json_schema is not None else None)
        parts = (engine.model, request, config, engine.stop_ids, engine.pad_id, engine.stats)
        self.static = StaticBatching(*parts, grammar=self._grammar(engine.tokenizer))
        self.continuous = ContinuousBatching(*parts)
        # Falls back to "static" for good once continuous batching cannot serve this request.
        self.strategy = config.strategy
        self.scorer, self.choice_encoder = self._choice_parts(engine)

    def _grammar(self, tokenizer: Any) -> "JsonGrammar | None":
        """``json_schema`` compiled once for this request; None without one."""
        if self.request.json_schema is None:
            return None
        from dolly_spark.inference.constrained import JsonGrammar  # llguidance, only where it is used

        return JsonGrammar(tokenizer, self.request.json_schema, self.end_id)

    def _choice_parts(self, engine: "InstructionEngine") -> tuple[ChoiceScorer | None, PromptEncoder | None]:
        """The scorer of ``choices`` and the encoder of their prompts, whose limit leaves room
        for the longest choice (not ``max_new_tokens``); (None, None) without choices."""
        request = self.request
        if not request.choices:
            return None, None
        if has_sliding_window(engine.model.config):
            # The scorer prefills whole prompts into one cache, which a sliding-window layer
            # would cut to its window.
            raise ValueError("choices need a model without sliding-window attention; this model's config sets "
                             "sliding_window. Generate the label with json_schema and an enum instead")
        choice_ids = [answer_ids(engine.tokenizer, engine.format, choice, self.end_id) for choice in request.choices]
        scorer = ChoiceScorer(engine.model, choice_ids, engine.pad_id, engine.stats)
        limit, reason = prompt_limit(request, engine.window, scorer.longest_choice)
        if limit < 1:
            raise ValueError(f"no room for a prompt: {reason} leaves {limit} tokens; use shorter choices")
        return scorer, PromptEncoder(engine.tokenizer, engine.format, limit, reason, request.on_overlong,
                                     request.seed)
