"""Tiny models for tests and benchmarks, built locally in seconds without network.

A GPT-NeoX causal LM (the Dolly / pythia architecture) with random weights and a byte-level
BPE tokenizer trained on the spot, with the Dolly special tokens added and pad = eos. Without
the Dolly keys it stands for a chat model instead: ChatML turn tokens, a chat template, and a
generation config that ends on the end-of-turn token as well as on EOS.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from dolly_spark.prompts import DOLLY_SPECIAL_TOKENS, INTRO_BLURB

EOS_TOKEN = "<|endoftext|>"
# A minimal ChatML-style template, so the "chat" prompt format can be exercised on a tiny model.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


CHAT_TURN_TOKENS = ["<|im_start|>", "<|im_end|>"]


def train_tiny_tokenizer(corpus: Iterable[str], vocab_size: int = 512, dolly_keys: bool = True):
    """A byte-level BPE tokenizer trained on ``corpus``, with the chat turn tokens and (unless
    ``dolly_keys`` is False) the Dolly special tokens added."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(list(corpus) + [INTRO_BLURB], trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
    keys = list(DOLLY_SPECIAL_TOKENS) if dolly_keys else []
    tokenizer.add_special_tokens({"additional_special_tokens": keys + CHAT_TURN_TOKENS})
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tiny_model(tokenizer, seed: int = 0, hidden_size: int = 64, layers: int = 2, context_window: int = 512,
                     heads: int = 2):
    """A randomly initialised GPT-NeoX sized to ``tokenizer``'s vocabulary, with ``heads``
    attention heads: 2 by default, of 32 dimensions each, the least vLLM's CPU attention takes."""
    import torch
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(seed)
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=hidden_size * 4,
        max_position_embeddings=context_window,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    model = GPTNeoXForCausalLM(config).eval()
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def save_tiny_model(directory: Path, corpus: Iterable[str], seed: int = 0, dolly_keys: bool = True,
                    heads: int = 2) -> Path:
    """Build a tiny model and tokenizer and save them as a checkpoint in ``directory``; without
    ``dolly_keys``, a chat model that also stops at its end-of-turn token."""
    tokenizer = train_tiny_tokenizer(corpus, dolly_keys=dolly_keys)
    model = build_tiny_model(tokenizer, seed=seed, heads=heads)
    if not dolly_keys:
        model.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
