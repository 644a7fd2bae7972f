"""Prompt formats: the single source of truth for how instructions become model text and tokens.

A format renders ``prompt(instruction, context)`` (what generation continues) and
``training_text(instruction, context, response)`` (what fine-tuning learns). It also renders
both as *segments*: template text, in which added special tokens such as ``### End`` are
recognised, and user text (instruction, context, response), which is always tokenized as plain
characters. That is what keeps a ticket that quotes ``### End`` from ending generation early.

Structured answers change only the instruction, in every format: ``choice_instruction`` adds a
line listing the labels a classification scores, ``schema_instruction`` a line naming the JSON
fields a constrained answer must have, so the model sees what it is asked for. They are the only
places those lines are written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Protocol, Sequence

INTRO_BLURB = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
INSTRUCTION_KEY = "### Instruction:"
INPUT_KEY = "Input:"
RESPONSE_KEY = "### Response:"
END_KEY = "### End"
RESPONSE_KEY_NL = f"{RESPONSE_KEY}\n"
# Added to the vocabulary of models trained in the Dolly format; the response key includes its
# newline so that it is a single token.
DOLLY_SPECIAL_TOKENS = (END_KEY, INSTRUCTION_KEY, RESPONSE_KEY_NL)


@dataclass(frozen=True)
class Segment:
    """A piece of prompt text; ``template`` pieces may contain special tokens, user pieces never."""

    text: str
    template: bool


class PromptFormat(Protocol):
    name: str

    def prompt_segments(self, instruction: str, context: str | None = None) -> list[Segment]:
        """The prompt for ``instruction`` (and ``context``, when it has text) as segments: the
        format's own text marked special, the caller's text not, so it is never read as special
        tokens."""
        ...

    def response_segments(self, response: str) -> list[Segment]:
        """The answer as a training target: ``response`` followed by the format's end marker."""
        ...

    def stop_strings(self) -> tuple[str, ...]:
        """The strings that end an answer in this format, beyond the tokenizer's EOS."""
        ...


def has_context(context: str | None) -> bool:
    """An empty or blank context means none, as in databricks-dolly-15k."""
    return bool(context and context.strip())


def render(segments: list[Segment]) -> str:
    """The text of ``segments``, joined."""
    return "".join(segment.text for segment in segments)


class _RenderMixin:
    def prompt(self, instruction: str, context: str | None = None) -> str:
        """The text generation continues from."""
        return render(self.prompt_segments(instruction, context))

    def training_text(self, instruction: str, context: str | None, response: str) -> str:
        """The whole example a model is fine-tuned on: prompt, response and stop."""
        return render(self.prompt_segments(instruction, context) + self.response_segments(response))


class DollyFormat(_RenderMixin, PromptFormat):
    """Byte-exact Dolly v2: intro blurb, instruction, optional Input block, response, ``### End``."""

    name = "dolly"

    def prompt_segments(self, instruction: str, context: str | None = None) -> list[Segment]:
        segments = [Segment(f"{INTRO_BLURB}\n\n", True), Segment(INSTRUCTION_KEY, True),
                    Segment(f"\n{instruction}\n\n", False)]
        if has_context(context):
            segments += [Segment(f"{INPUT_KEY}\n", True), Segment(f"{context}\n\n", False)]
        segments.append(Segment(RESPONSE_KEY_NL, True))
        return segments

    def response_segments(self, response: str) -> list[Segment]:
        return [Segment(f"{response}\n\n", False), Segment(END_KEY, True)]

    def stop_strings(self) -> tuple[str, ...]:
        return (END_KEY, INSTRUCTION_KEY)


class PlainFormat(_RenderMixin, PromptFormat):
    """Instruction and context joined by a blank line, for base models without a template."""

    name = "plain"

    def prompt_segments(self, instruction: str, context: str | None = None) -> list[Segment]:
        text = f"{instruction}\n\n{context}\n\n" if has_context(context) else f"{instruction}\n\n"
        return [Segment(text, False)]

    def response_segments(self, response: str) -> list[Segment]:
        return [Segment(response, False)]

    def stop_strings(self) -> tuple[str, ...]:
        return ()


class ChatFormat(_RenderMixin, PromptFormat):
    """The tokenizer's own chat template; instruction and context form one user message."""

    name = "chat"
    # Rendered in place of the user message, then cut out again, so the template's own text
    # (with its special tokens) and the user's text are told apart exactly.
    _PLACEHOLDER = "\u2063DOLLY_SPARK_USER_MESSAGE\u2063"

    def __init__(self, tokenizer: Any):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "prompt format 'chat' needs a tokenizer with a chat template; this tokenizer has "
                "none. Use prompt_format='dolly' or 'plain'."
            )
        self.tokenizer = tokenizer

    @staticmethod
    def user_message(instruction: str, context: str | None) -> str:
        """The user turn's text: the instruction, then the context when it has text."""
        return f"{instruction}\n\n{context}" if has_context(context) else instruction

    def _template_around_user(self, add_generation_prompt: bool, response: str | None = None):
        messages = [{"role": "user", "content": self._PLACEHOLDER}]
        if response is not None:
            messages.append({"role": "assistant", "content": response})
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        before, after = text.split(self._PLACEHOLDER)
        return before, after

    def prompt_segments(self, instruction: str, context: str | None = None) -> list[Segment]:
        before, after = self._template_around_user(add_generation_prompt=True)
        return [Segment(before, True), Segment(self.user_message(instruction, context), False),
                Segment(after, True)]

    def response_segments(self, response: str) -> list[Segment]:
        _, prompt_after = self._template_around_user(add_generation_prompt=True)
        _, full_after = self._template_around_user(add_generation_prompt=False, response="\x00")
        # The assistant turn as the template writes it, minus the generation prompt.
        turn = full_after[len(prompt_after):] if full_after.startswith(prompt_after) else full_after
        head, tail = turn.split("\x00")
        return [Segment(head, True), Segment(response, False), Segment(tail, True)]

    def stop_strings(self) -> tuple[str, ...]:
        return ()


def choice_instruction(instruction: str, choices: Sequence[str]) -> str:
    """The instruction a ``choices`` row is scored under: the caller's, then a line listing the
    labels, e.g. "Classify the ticket.\nAnswer with exactly one of: billing, shipping, other."."""
    return f"{instruction}\nAnswer with exactly one of: {', '.join(choices)}."


def schema_instruction(instruction: str, json_schema: str | Mapping[str, Any]) -> str:
    """The instruction a ``json_schema`` row is generated under: the caller's, then a line naming
    the object's fields and their types, e.g. "Extract the order.\nAnswer with a JSON object
    with these fields: order_id (string), refund_requested (boolean), amount (number), mood
    (angry, calm or happy)."; a schema without properties is quoted whole instead."""
    schema = json.loads(json_schema) if isinstance(json_schema, str) else dict(json_schema)
    properties = schema.get("properties")
    if not isinstance(properties, dict) or not properties:
        return f"{instruction}\nAnswer with JSON that matches this schema: {json.dumps(schema, separators=(',', ':'))}"
    fields = ", ".join(f"{name} ({_describe_type(spec)})" for name, spec in properties.items())
    return f"{instruction}\nAnswer with a JSON object with these fields: {fields}."


def _describe_type(spec: Any) -> str:
    """A field in a few words: its enum values, or its type ("list of ..." for arrays, a string
    format such as "date" by its name, "or null" when it may be null), then its description."""
    if not isinstance(spec, dict):
        return "any"
    if isinstance(spec.get("enum"), list) and spec["enum"]:
        values = [value if isinstance(value, str) else json.dumps(value) for value in spec["enum"]]
        text = values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"
    elif "const" in spec:
        text = json.dumps(spec["const"])
    else:
        kinds = spec.get("type")
        kinds = [kinds] if isinstance(kinds, str) else list(kinds or [])
        named = [kind for kind in kinds if kind != "null"]
        if named == ["array"] and isinstance(spec.get("items"), dict):
            items = spec["items"]  # a null item is not worth a word in the prompt
            text = f"list of {_describe_type({**items, 'type': _non_null(items.get('type'))})}"
        elif named == ["string"] and spec.get("format"):
            text = spec["format"]
        else:
            text = " or ".join(named) or "any"
        if "null" in kinds:
            text += " or null"
    return f"{text}: {spec['description']}" if spec.get("description") else text


def _non_null(kinds: Any) -> Any:
    if isinstance(kinds, list):
        named = [kind for kind in kinds if kind != "null"]
        return named[0] if len(named) == 1 else named
    return kinds


FORMAT_NAMES = ("dolly", "chat", "plain")


def get_format(name: str, tokenizer: Any = None) -> PromptFormat:
    """The prompt format called ``name`` ("dolly", "chat" or "plain").

    "chat" renders through ``tokenizer``'s chat template, so it needs the tokenizer.
    """
    if name == "dolly":
        return DollyFormat()
    if name == "plain":
        return PlainFormat()
    if name == "chat":
        if tokenizer is None:
            raise ValueError("prompt format 'chat' needs the model's tokenizer: get_format('chat', tokenizer)")
        return ChatFormat(tokenizer)
    raise ValueError(f"unknown prompt format {name!r}; choose one of {', '.join(FORMAT_NAMES)}.")


def infer_format_name(tokenizer: Any) -> str:
    """The format a model was most likely built for: Dolly keys in its vocabulary, else its chat
    template, else plain text."""
    vocab = tokenizer.get_vocab()
    if all(token in vocab for token in DOLLY_SPECIAL_TOKENS):
        return "dolly"
    if getattr(tokenizer, "chat_template", None):
        return "chat"
    return "plain"


def encode_segments(tokenizer: Any, segments: list[Segment]) -> list[int]:
    """Token ids of ``segments``: special tokens recognised in template text only."""
    ids: list[int] = []
    for segment in segments:
        if segment.text:
            ids += tokenizer(
                segment.text, add_special_tokens=False, split_special_tokens=not segment.template
            )["input_ids"]
    return ids


def dolly_key_ids(tokenizer: Any) -> set[int]:
    """Ids of the Dolly keys in ``tokenizer``'s vocabulary: ``### End`` ends an answer, and a model
    that starts a new ``### Instruction:`` or ``### Response:`` has finished one too."""
    ids = set()
    for key in DOLLY_SPECIAL_TOKENS:
        token_id = tokenizer.convert_tokens_to_ids(key)
        if isinstance(token_id, int) and token_id >= 0 and token_id != tokenizer.unk_token_id:
            ids.add(token_id)
    return ids


def eos_token_ids(model: Any, tokenizer: Any) -> set[int]:
    """The end-of-sequence ids of the model's generation config and of its tokenizer."""
    ids = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


def stop_token_ids(model: Any, tokenizer: Any, format_name: str) -> list[int]:
    """Every token generation stops on: EOS, and for the Dolly format the Dolly keys."""
    keys = dolly_key_ids(tokenizer) if format_name == "dolly" else set()
    return sorted(eos_token_ids(model, tokenizer) | keys)


def answer_end_id(tokenizer: Any, prompt_format: PromptFormat, stop_ids: set[int] | frozenset[int],
                  eos_ids: set[int] | frozenset[int]) -> int:
    """The one token that ends an answer in ``prompt_format``: the first stop token the format
    writes after a response (``### End`` for Dolly, the chat template's end of turn when it is a
    stop token), else the tokenizer's EOS when generation stops on it, else the lowest EOS id."""
    for token in encode_segments(tokenizer, prompt_format.response_segments("x")):
        if token in stop_ids:
            return token
    if tokenizer.eos_token_id in eos_ids:
        return tokenizer.eos_token_id
    if eos_ids:
        return min(eos_ids)
    raise ValueError("the model has no end-of-sequence token; choices and json_schema need one to end an answer")


def answer_ids(tokenizer: Any, prompt_format: PromptFormat, text: str, end_id: int) -> list[int]:
    """The tokens a model writes for the answer ``text`` in ``prompt_format``, through
    ``end_id`` (see ``answer_end_id``): for Dolly ``text``, the blank line and ``### End``; for
    chat ``text`` and the end of turn; for plain ``text`` and EOS."""
    ids = encode_segments(tokenizer, prompt_format.response_segments(text))
    if end_id in ids:
        return ids[:ids.index(end_id) + 1]
    return ids + [end_id]
