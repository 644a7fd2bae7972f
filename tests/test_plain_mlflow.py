"""A registered model used without this package: plain ``mlflow.pyfunc`` gives the answers
``apply_instruction`` gives, and the environment MLflow records can be rebuilt from PyPI."""
from __future__ import annotations

import pytest
from pyspark.sql import functions as F

from dolly_spark import apply_instruction
from dolly_spark.engine import InstructionEngine
from dolly_spark.prompts import encode_segments, get_format
from dolly_spark.registry import _requirement, log_and_register
from dolly_spark.testing import TINY_CHAT_TEMPLATE, build_tiny_model

INSTRUCTIONS = [
    "What is Delta Lake?",
    "Summarize the ticket: the thermostat shows error E42 every morning.",
    "Name a river {in braces} and say why.",
    "  Refund please.  ",
]
MAX_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def chat_model(tiny_model):
    """(model, tokenizer): a fresh tiny model on the tiny tokenizer, whose template is ChatML-like."""
    _, tokenizer = tiny_model
    assert tokenizer.chat_template == TINY_CHAT_TEMPLATE
    return build_tiny_model(tokenizer, seed=3), tokenizer


@pytest.fixture(scope="module")
def registered_chat(mlflow_registry, chat_model):
    model, tokenizer = chat_model
    version = log_and_register(model, tokenizer, "tiny_chat", "chat", max_new_tokens=MAX_NEW_TOKENS)
    return f"models:/tiny_chat/{version}"


def test_chat_prompt_template_renders_the_engine_prompt(registered_chat, chat_model):
    import mlflow

    _, tokenizer = chat_model
    template = mlflow.models.get_model_info(registered_chat).metadata["prompt_template"]
    engine_format = get_format("chat", tokenizer)
    for text in INSTRUCTIONS:
        assert template.format(prompt=text) == engine_format.prompt(text)
    # The pipeline tokenizes the filled template as one string; the engine tokenizes template
    # and user text apart. Both must give the same ids.
    for text in INSTRUCTIONS:
        filled = tokenizer(template.format(prompt=text), add_special_tokens=False)["input_ids"]
        assert filled == encode_segments(tokenizer, engine_format.prompt_segments(text))


def test_plain_pyfunc_answers_equal_apply_instruction(spark, registered_chat):
    import mlflow

    model = mlflow.pyfunc.load_model(registered_chat)
    # Tokenized as the engine does: the chat template writes any BOS itself.
    assert model.model_config["add_special_tokens"] is False
    plain = model.predict(INSTRUCTIONS, params={"max_new_tokens": MAX_NEW_TOKENS})

    df = spark.createDataFrame([(i, text) for i, text in enumerate(INSTRUCTIONS)], "id INT, instruction STRING")
    rows = apply_instruction(df, F.col("instruction"), model_uri=registered_chat,
                             max_new_tokens=MAX_NEW_TOKENS).orderBy("id").collect()
    engine = [row["response"]["response"] for row in rows]

    assert all(row["response"]["error"] is None for row in rows)
    # Different prompts give different answers: equal lists below mean the prompts matched.
    assert len(set(engine)) == len(INSTRUCTIONS)
    # Both sides strip surrounding whitespace (the engine's parser and MLflow's output cleanup);
    # nothing else is normalised.
    assert list(plain) == engine


def test_registered_stop_tokens_are_the_engines(registered_chat, chat_model):
    import mlflow

    model, tokenizer = chat_model
    registered = mlflow.pyfunc.load_model(registered_chat).model_config["eos_token_id"]
    assert registered == InstructionEngine(model, tokenizer, "chat").stop_ids


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("installed", "line"),
    [("2.5.1+cu121", "torch==2.5.1"), ("2.5.1", "torch==2.5.1"), ("2.6.0.dev20241112+cpu", "torch==2.6.0.dev20241112"),
     ("1.0.0rc1+local.build.7", "torch==1.0.0rc1")],
)
def test_requirement_drops_the_local_version_part(installed, line):
    assert _requirement("torch", installed) == line


def test_registered_requirements_carry_no_local_versions(registered_chat):
    import mlflow

    # The file spark_udf(env_manager="virtualenv") and model serving install from.
    requirements = mlflow.pyfunc.get_model_dependencies(registered_chat)
    lines = [line.strip() for line in open(requirements, encoding="utf-8") if line.strip()]
    pinned = {line.split("==")[0] for line in lines}
    assert {"transformers", "torch", "accelerate", "tokenizers"} <= pinned
    assert not [line for line in lines if "+" in line]
