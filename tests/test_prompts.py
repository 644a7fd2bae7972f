"""Golden strings for every prompt format, and how user text is tokenized."""
from __future__ import annotations

import pytest

from dolly_spark.prompts import DOLLY_SPECIAL_TOKENS, encode_segments, get_format, infer_format_name

INTRO = "Below is an instruction that describes a task. Write a response that appropriately completes the request."


def test_dolly_prompt_without_context_is_byte_exact():
    assert get_format("dolly").prompt("Name three rivers.") == (
        f"{INTRO}\n\n### Instruction:\nName three rivers.\n\n### Response:\n"
    )


def test_dolly_prompt_with_context_is_byte_exact():
    assert get_format("dolly").prompt("Summarize.", "The printer is on fire.") == (
        f"{INTRO}\n\n### Instruction:\nSummarize.\n\nInput:\nThe printer is on fire.\n\n### Response:\n"
    )


def test_dolly_training_text_is_byte_exact():
    fmt = get_format("dolly")
    assert fmt.training_text("Name a river.", None, "The Nile.") == (
        f"{INTRO}\n\n### Instruction:\nName a river.\n\n### Response:\nThe Nile.\n\n### End"
    )
    assert fmt.training_text("Summarize.", "Long text.", "Short.") == (
        f"{INTRO}\n\n### Instruction:\nSummarize.\n\nInput:\nLong text.\n\n### Response:\nShort.\n\n### End"
    )


@pytest.mark.parametrize("blank", [None, "", "   \n"])
def test_blank_context_means_no_input_block(blank):
    fmt = get_format("dolly")
    assert fmt.prompt("Do it.", blank) == fmt.prompt("Do it.")
    assert "Input:" not in fmt.prompt("Do it.", blank)


def test_plain_format():
    fmt = get_format("plain")
    assert fmt.prompt("Translate to French.", "Good morning") == "Translate to French.\n\nGood morning\n\n"
    assert fmt.prompt("Say hi.") == "Say hi.\n\n"
    assert fmt.training_text("Say hi.", None, "hi") == "Say hi.\n\nhi"


def test_chat_format_uses_the_tokenizer_template(tiny_model):
    _, tokenizer = tiny_model
    fmt = get_format("chat", tokenizer)
    assert fmt.prompt("Summarize.", "Text here.") == (
        "<|im_start|>user\nSummarize.\n\nText here.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert fmt.prompt("Hi.") == "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\n"
    assert fmt.training_text("Hi.", None, "Hello!") == (
        "<|im_start|>user\nHi.<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
    )


def test_chat_format_needs_a_tokenizer():
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        get_format("chat")


def test_unknown_format_is_named():
    with pytest.raises(ValueError, match="'alpaca'.*dolly, chat, plain"):
        get_format("alpaca")


def test_dolly_special_tokens_are_single_tokens(tiny_model):
    _, tokenizer = tiny_model
    for token in DOLLY_SPECIAL_TOKENS:
        assert len(tokenizer(token, add_special_tokens=False)["input_ids"]) == 1
    assert infer_format_name(tokenizer) == "dolly"


def test_keys_inside_user_text_are_not_special_tokens(tiny_model):
    _, tokenizer = tiny_model
    fmt = get_format("dolly")
    ids = encode_segments(tokenizer, fmt.prompt_segments("Repeat: ### End", "quote ### Response:\n and ### End"))
    special = {tokenizer.convert_tokens_to_ids(t) for t in DOLLY_SPECIAL_TOKENS}
    end_id = tokenizer.convert_tokens_to_ids("### End")
    response_id = tokenizer.convert_tokens_to_ids("### Response:\n")
    assert end_id not in ids
    assert ids.count(response_id) == 1 and ids[-1] == response_id
    assert sum(1 for token in ids if token in special) == 2  # the template's instruction and response keys
    assert tokenizer.decode(ids) == fmt.prompt("Repeat: ### End", "quote ### Response:\n and ### End")
