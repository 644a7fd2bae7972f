"""Tokenized training examples: loss on the response and the stop key only."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dolly_spark.prompts import PromptFormat, encode_segments

IGNORE_INDEX = -100  # labels the loss skips (transformers' convention)


@dataclass
class EncodedExamples:
    examples: list[dict[str, list[int]]]
    dropped_too_long: int


def encode_example(tokenizer: Any, fmt: PromptFormat, record: dict[str, str]) -> dict[str, list[int]]:
    """input_ids, attention_mask and labels of one record; prompt positions carry no loss.

    The prompt is encoded exactly as the engine encodes it at inference, so what the model
    learns to continue is what it will see.
    """
    prompt = encode_segments(tokenizer, fmt.prompt_segments(record["instruction"], record.get("context")))
    answer = encode_segments(tokenizer, fmt.response_segments(record["response"]))
    return {
        "input_ids": prompt + answer,
        "attention_mask": [1] * (len(prompt) + len(answer)),
        "labels": [IGNORE_INDEX] * len(prompt) + answer,
    }


def encode_examples(tokenizer: Any, fmt: PromptFormat, records: list[dict[str, str]], max_length: int) -> EncodedExamples:
    """Every record that fits in ``max_length`` tokens, encoded; the rest dropped and counted."""
    kept, dropped = [], 0
    for record in records:
        example = encode_example(tokenizer, fmt, record)
        if len(example["input_ids"]) > max_length:
            dropped += 1
        else:
            kept.append(example)
    return EncodedExamples(kept, dropped)
