"""What the "hf" engine builds once per request: the request's encoding (``row_encoder``), the
backends that generate under its settings (and its grammar), and the scorer of its choices.

An engine keeps a few of these, keyed by the request (frozen, hashable), so a Python worker
that runs one request over many Arrow batches compiles a schema's grammar and encodes the
choices once.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from dolly_spark.inference.choices import ChoiceScorer
from dolly_spark.inference.continuous_batching import ContinuousBatching
from dolly_spark.inference.static_batching import StaticBatching
from dolly_spark.request import Request

if TYPE_CHECKING:
    from dolly_spark.inference.constrained import JsonGrammar
    from dolly_spark.inference.engine import InstructionEngine


class PreparedRequest:
    """The per-request parts of an ``InstructionEngine``: ``encoding``'s encoders (``encoder``,
    ``choice_encoder``, ``end_id``, ``max_prompt_tokens``), the ``static`` and ``continuous``
    backends, and the ``scorer`` of the choices (None without them)."""

    def __init__(self, engine: "InstructionEngine", request: Request):
        self.request = request
        self.encoding = engine.rows.prepare(request)
        self.encoder, self.choice_encoder = self.encoding.prompts, self.encoding.choice_prompts
        self.end_id, self.max_prompt_tokens = self.encoding.end_id, self.encoding.max_prompt_tokens
        parts = (engine.model, request, engine.config, engine.stop_ids, engine.pad_id, engine.stats)
        self.static = StaticBatching(*parts, grammar=self._grammar(engine.tokenizer))
        self.continuous = ContinuousBatching(*parts)
        # Falls back to "static" for good once continuous batching cannot serve this request.
        self.strategy = engine.config.strategy
        self.scorer = (ChoiceScorer(engine.model, self.encoding.choice_ids, engine.pad_id, engine.stats)
                       if request.choices else None)

    def _grammar(self, tokenizer: Any) -> "JsonGrammar | None":
        """``json_schema`` compiled once for this request; None without one."""
        if self.request.json_schema is None:
            return None
        from dolly_spark.inference.constrained import JsonGrammar  # llguidance, only where it is used

        return JsonGrammar(tokenizer, self.request.json_schema, self.end_id)
