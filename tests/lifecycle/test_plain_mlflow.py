"""A registered model used without this package: plain ``mlflow.pyfunc`` gives the answers
``apply_instruction`` gives, and the environment MLflow records can be rebuilt from PyPI."""
from __future__ import annotations

import pytest
from pyspark.sql import functions as F

from dolly_spark import apply_instruction
from dolly_spark.inference.engine import InstructionEngine
from dolly_spark.prompts import encode_segments, get_format
from dolly_spark.lifecycle.registry import _requirement, log_and_register
from dolly_spark.testing.tiny_models import TINY_CHAT_TEMPLATE, build_tiny_model

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


@pytest.fixture(scope="module")
def registered_chat_without_repeats(mlflow_registry, chat_model):
    """The same model registered with repetition control as its default."""
    model, tokenizer = chat_model
    version = log_and_register(model, tokenizer, "tiny_chat_no_repeats", "chat", max_new_tokens=MAX_NEW_TOKENS,
                               repetition_penalty=1.3, no_repeat_ngram_size=2)
    return f"models:/tiny_chat_no_repeats/{version}"


def answers_of(spark, model_uri: str, max_new_tokens: int = MAX_NEW_TOKENS, **settings) -> list[str]:
    """apply_instruction's answers to INSTRUCTIONS, in order; every row must have one."""
    df = spark.createDataFrame([(i, text) for i, text in enumerate(INSTRUCTIONS)], "id INT, instruction STRING")
    rows = apply_instruction(df, F.col("instruction"), model_uri=model_uri,
                             max_new_tokens=max_new_tokens, **settings).orderBy("id").collect()
    assert all(row["response"]["error"] is None for row in rows)
    return [row["response"]["response"] for row in rows]


def test_plain_pyfunc_answers_equal_apply_instruction(spark, registered_chat):
    import mlflow

    model = mlflow.pyfunc.load_model(registered_chat)
    # Tokenized as the engine does: the chat template writes any BOS itself.
    assert model.model_config["add_special_tokens"] is False
    plain = model.predict(INSTRUCTIONS, params={"max_new_tokens": MAX_NEW_TOKENS})
    # The pipeline runs in fp32; so must the engine, whatever this CPU's default is.
    engine = answers_of(spark, registered_chat, dtype="float32")

    # Different prompts give different answers: equal lists below mean the prompts matched.
    assert len(set(engine)) == len(INSTRUCTIONS)
    # Both sides strip surrounding whitespace (the engine's parser and MLflow's output cleanup);
    # nothing else is normalised.
    assert list(plain) == engine


def test_registered_repetition_control_is_apply_instructions_default_only(registered_chat_without_repeats):
    import mlflow

    from dolly_spark.lifecycle.registry import resolve_model
    from dolly_spark.request import build_request

    info = mlflow.models.get_model_info(registered_chat_without_repeats)
    assert info.metadata["generation_defaults"] == {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}
    # transformers' options of the same names would also count the prompt: not for the pipeline.
    config = mlflow.pyfunc.load_model(registered_chat_without_repeats).model_config
    assert "repetition_penalty" not in config and "no_repeat_ngram_size" not in config
    spec = resolve_model(registered_chat_without_repeats)
    unset = build_request(spec)
    assert (unset.repetition_penalty, unset.no_repeat_ngram_size) == (1.3, 2)
    chosen = build_request(spec, no_repeat_ngram_size=0)
    assert (chosen.repetition_penalty, chosen.no_repeat_ngram_size) == (1.3, 0)


@pytest.mark.slow
def test_registered_repetition_control_reaches_apply_instruction_and_the_job(spark, registered_chat,
                                                                             registered_chat_without_repeats):
    from dolly_spark.batch.summarize import SummarizeConfig, run_summarize

    # 24 tokens: long enough for this model to repeat itself where nothing stops it.
    registered = answers_of(spark, registered_chat_without_repeats, max_new_tokens=24)
    assert registered == answers_of(spark, registered_chat, max_new_tokens=24, repetition_penalty=1.3,
                                    no_repeat_ngram_size=2)
    assert registered != answers_of(spark, registered_chat, max_new_tokens=24), "repetition control changed nothing"

    # The job's fingerprint holds the registered settings: asking for them explicitly reprocesses
    # nothing; turning one off reprocesses every ticket.
    spark.createDataFrame([(f"T-{i}", text) for i, text in enumerate(INSTRUCTIONS)], "ticket_id STRING, body STRING") \
        .write.format("delta").mode("overwrite").saveAsTable("no_repeats_tickets")

    def run(**settings):
        config = SummarizeConfig(source_table="no_repeats_tickets", target_table="no_repeats_summaries",
                                 model_uri=registered_chat_without_repeats, max_new_tokens=MAX_NEW_TOKENS,
                                 partitions=1, experiment="tests", **settings)
        return run_summarize(spark, config).rows_written

    assert run() == len(INSTRUCTIONS)
    assert run(repetition_penalty=1.3, no_repeat_ngram_size=2) == 0
    assert run(no_repeat_ngram_size=0) == len(INSTRUCTIONS)


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
