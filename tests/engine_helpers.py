"""An engine with one request bound, as engine tests drive it: keyword settings split into the
request (what rows answer) and the engine configuration (how they run), then
``run(instructions, contexts, keys)`` through the engine's public seam."""
from __future__ import annotations

from dataclasses import fields
from typing import Any

from dolly_spark.inference.engine import InstructionEngine
from dolly_spark.inference.engines import EngineConfig, Rows
from dolly_spark.request import Request

CONFIG_FIELDS = {field.name for field in fields(EngineConfig)}


def split_settings(**settings: Any) -> tuple[Request, EngineConfig]:
    """(the Request of ``settings``' answer fields, the EngineConfig of their engine fields)."""
    config = {name: value for name, value in settings.items() if name in CONFIG_FIELDS}
    answer = {name: value for name, value in settings.items() if name not in CONFIG_FIELDS}
    return Request(**answer), EngineConfig(**config)


class BoundEngine:
    """``engine`` running ``request``; its attributes, and those of the request's prepared parts
    (``static``, ``scorer``, ``encoder``, ``end_id``, ``max_prompt_tokens``, ``strategy``), read
    through."""

    def __init__(self, engine: InstructionEngine, request: Request):
        self.engine, self.request = engine, request

    def run(self, instructions, contexts=None, keys=None):
        return self.engine.run(Rows(instructions, contexts, keys), self.request)

    @property
    def prepared(self):
        return self.engine.prepare(self.request)

    def __getattr__(self, name: str):
        prepared = self.engine.prepare(self.request)
        return getattr(prepared, name) if hasattr(prepared, name) else getattr(self.engine, name)


def bound_engine(model: Any, tokenizer: Any, prompt_format: str | None = "dolly", **settings: Any) -> BoundEngine:
    request, config = split_settings(**settings)
    return BoundEngine(InstructionEngine(model, tokenizer, prompt_format, config), request)
