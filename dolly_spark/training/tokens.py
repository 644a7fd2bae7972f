"""The tokenizer and embeddings made ready for the format a model is fine-tuned in.

``dolly`` adds the Dolly keys as special tokens, resizes the embeddings and starts the new rows
from what the model already knows; ``chat`` adds nothing and keeps the model's own stop.
"""
from __future__ import annotations

from typing import Any

import torch

from dolly_spark.prompts import DOLLY_SPECIAL_TOKENS, END_KEY


def training_format(requested: str, base_format: str) -> str:
    """The format to train in: ``requested``, or for "auto" chat when the base answers in its
    chat template, else dolly."""
    if requested == "auto":
        return "chat" if base_format == "chat" else "dolly"
    if requested not in ("dolly", "chat"):
        raise ValueError(f"prompt_format must be dolly, chat or auto, not {requested!r}")
    return requested


def prepare_tokens(model: Any, tokenizer: Any, prompt_format: str) -> int:
    """Make the tokenizer ready to train in ``prompt_format``; return how many tokens were added
    (the Dolly keys for "dolly"; none for "chat", which keeps the model's own stop)."""
    if prompt_format == "dolly":
        return add_dolly_tokens(model, tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.pad_token_id = tokenizer.pad_token_id
    return 0


def add_dolly_tokens(model: Any, tokenizer: Any) -> int:
    """Add the Dolly keys as special tokens (pad = eos when unset) and resize the embeddings;
    return how many tokens were new. New keys start from what the model already knows (see
    ``_init_new_key_embeddings``)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pieces = {key: tokenizer(key, add_special_tokens=False)["input_ids"] for key in DOLLY_SPECIAL_TOKENS}
    added = tokenizer.add_special_tokens({"additional_special_tokens": list(DOLLY_SPECIAL_TOKENS)},
                                         replace_extra_special_tokens=False)
    if added:
        model.resize_token_embeddings(len(tokenizer))
        _init_new_key_embeddings(model, tokenizer, pieces)
    model.config.pad_token_id = tokenizer.pad_token_id
    return added


@torch.no_grad()
def _init_new_key_embeddings(model: Any, tokenizer: Any, pieces: dict[str, list[int]]) -> None:
    """Each new key's input embedding is the mean of the tokens its text was made of, and
    ``### End`` predicts like the model's EOS: a model that already knows when to stop learns the
    Dolly stop in a few steps instead of from a random row (measured on the demo model, a
    randomly started ``### End`` was never emitted after a short fine-tune)."""
    inputs = model.get_input_embeddings().weight
    outputs = model.get_output_embeddings().weight if model.get_output_embeddings() is not None else None
    tied = outputs is not None and outputs.data_ptr() == inputs.data_ptr()
    eos = tokenizer.eos_token_id
    for key, old_ids in pieces.items():
        new_id = tokenizer.convert_tokens_to_ids(key)
        if not old_ids or new_id in old_ids:
            continue  # the key was already one token
        like_eos = key == END_KEY and eos is not None
        if tied:  # one row is both the input and the prediction
            inputs[new_id] = inputs[eos] if like_eos else inputs[old_ids].mean(dim=0)
            continue
        inputs[new_id] = inputs[old_ids].mean(dim=0)
        if outputs is not None:
            outputs[new_id] = outputs[eos] if like_eos else outputs[old_ids].mean(dim=0)
