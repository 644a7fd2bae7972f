"""Tokenized training examples: the loss falls on the answer and its stop only."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Collection

from dolly_spark.prompts import PromptFormat, encode_segments

IGNORE_INDEX = -100  # labels the loss skips (transformers' convention)


@dataclass
class EncodedExamples:
    examples: list[dict[str, list[int]]]
    dropped_too_long: int


def encode_example(tokenizer: Any, fmt: PromptFormat, record: dict[str, str],
                   stop_ids: Collection[int] = ()) -> dict[str, list[int]]:
    """input_ids, attention_mask and labels of one record; prompt positions carry no loss.

    The prompt is encoded exactly as the engine encodes it at inference, so what the model
    learns to continue is what it will see. The labels cover the answer up to and including the
    first of ``stop_ids`` after it (``### End``, or a chat template's end-of-turn token): the
    stop is what the model must learn, and what a template writes after it (a newline) is not.
    """
    prompt = encode_segments(tokenizer, fmt.prompt_segments(record["instruction"], record.get("context")))
    answer = encode_segments(tokenizer, fmt.response_segments(record["response"]))
    # The answer's own text is tokenized with special tokens split, so the first stop id in it
    # is the template's.
    learned = next((position + 1 for position, token in enumerate(answer) if token in stop_ids), len(answer))
    return {
        "input_ids": prompt + answer,
        "attention_mask": [1] * (len(prompt) + len(answer)),
        "labels": [IGNORE_INDEX] * len(prompt) + answer[:learned] + [IGNORE_INDEX] * (len(answer) - learned),
    }


def encode_examples(tokenizer: Any, fmt: PromptFormat, records: list[dict[str, str]], max_length: int,
                    stop_ids: Collection[int] = ()) -> EncodedExamples:
    """Every record that fits in ``max_length`` tokens, encoded; the rest dropped and counted."""
    kept, dropped = [], 0
    for record in records:
        example = encode_example(tokenizer, fmt, record, stop_ids)
        if len(example["input_ids"]) > max_length:
            dropped += 1
        else:
            kept.append(example)
    return EncodedExamples(kept, dropped)
