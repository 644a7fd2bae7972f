"""Shared fixtures: one local Spark session with Delta, a temporary MLflow registry per module,
and tiny models built in seconds without network."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

# Test modules live in folders that mirror the package's wings; the helpers shared by all of
# them (this file, project_home, standalone_cluster) are imported by name from here.
sys.path.insert(0, str(Path(__file__).resolve().parent))

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly15k_sample.jsonl"
PACKAGE_TICKETS = Path(__file__).resolve().parents[1] / "dolly_spark" / "data" / "sample_tickets.jsonl"


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests that take more than a few seconds")


@pytest.fixture(scope="session")
def project_home(tmp_path_factory) -> Path:
    """One project home for the whole session: the Spark warehouse, metastore and model cache."""
    home = tmp_path_factory.mktemp("dolly_spark_home")
    os.environ["DOLLY_SPARK_HOME"] = str(home)
    # A Spark conf directory with nothing in it: the session's Spark reads no spark-defaults.conf
    # or log4j2.properties of this machine's, and the package's log configuration applies, as on
    # a machine where `dolly-spark setup-spark` never ran. (Commands in subprocesses run in the
    # user's environment: project_home.job_env drops this.)
    os.environ["SPARK_CONF_DIR"] = str(tmp_path_factory.mktemp("empty_spark_conf"))
    # A user cache of the session's own, shared with the commands it runs: the demo model is
    # converted from its GGUF file once per test run, never taken from an earlier one.
    os.environ["DOLLY_SPARK_USER_CACHE"] = str(tmp_path_factory.mktemp("user_cache"))
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    return home


# Spark's settings (its SQL conf, settable per query) that evaluate expressions without
# generating code (unset, they are Spark's defaults: code generation).
INTERPRETED_EXPRESSIONS = {"spark.sql.codegen.wholeStage": "false", "spark.sql.codegen.factoryMode": "NO_CODEGEN"}


@pytest.fixture(scope="session")
def spark(project_home):
    """The session's Spark with Delta: local[2], UI off, 2 shuffle partitions, UTC, expressions
    interpreted, no adaptive execution. Never stopped between tests.

    Interpreted, not compiled: the tables here hold a few rows, where generating Java source for
    each query and task (Delta's log replay and MERGE included) costs more than running it. A
    warm six-ticket summarize run took 5.9 s against 7.3 s, and the batch and Spark tests 358 s
    against 425 s. The jobs the tests start with `spark-submit` keep Spark's code generation, as
    users run them.

    Adaptive query execution off, for the same reason: it re-plans every query stage of a few
    rows for nothing. The claims, incremental, chunk, summarize and estimate tests took 354 s
    against 384 s with it on, one after the other."""
    from dolly_spark.spark.sessions import get_spark

    session = get_spark(
        app_name="dolly_spark-tests",
        master="local[2]",
        shuffle_partitions=2,
        ui=False,
        extra_conf={"spark.sql.session.timeZone": "UTC", "spark.default.parallelism": "2",
                    "spark.sql.adaptive.enabled": "false", **INTERPRETED_EXPRESSIONS},
    )
    yield session
    session.stop()


@pytest.fixture(scope="module")
def mlflow_registry(tmp_path_factory, project_home):
    """A fresh MLflow tracking server and model registry (SQLite) for one test module."""
    import mlflow

    directory = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{directory / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("tests", artifact_location=(directory / "artifacts").as_uri())
    mlflow.set_experiment(experiment_id=experiment)
    yield uri
    mlflow.end_run()


def no_jobs_ran(spark, action):
    """Run ``action``, which must raise ValueError, under a fresh job group; return (the error,
    whether no Spark job ran)."""
    group = f"fail-fast-{id(action)}"
    spark.sparkContext.setJobGroup(group, "fail-fast check")
    try:
        with pytest.raises(ValueError) as raised:
            action()
    finally:
        spark.sparkContext.setLocalProperty("spark.jobGroup.id", None)
    return raised.value, not spark.sparkContext.statusTracker().getJobIdsForGroup(group)


def checked_schema_answer(answer: dict, max_new_tokens: int) -> dict | None:
    """The parsed document of a schema answer (a result as a dict, its ``parsed`` one too), after
    checking it: a parsed answer has no error and is its text's JSON; one that is not parsed was
    cut off by ``max_new_tokens``, keeps its raw text and has an error naming that limit (None)."""
    if answer["parsed"] is None:
        assert answer["finish_reason"] == "length" and answer["response"], answer
        assert "not complete JSON" in answer["error"] and f"max_new_tokens={max_new_tokens}" in answer["error"], answer
        return None
    assert answer["error"] is None and answer["parsed"] == json.loads(answer["response"]), answer
    return answer["parsed"]


def shared_sample() -> Path:
    """The dolly-15k sample beside the repository (``../shared/data``). Tests that tokenise,
    train or score on it fail without it rather than quietly use other data."""
    if not SHARED_DATA.exists():
        pytest.fail(f"{SHARED_DATA} is missing: the tests read the dolly-15k sample from ../shared/data beside "
                    "the repository (see its README)", pytrace=False)
    return SHARED_DATA


def tokenizer_corpus() -> list[str]:
    texts = []
    for source in (shared_sample(), PACKAGE_TICKETS):
        for line in source.read_text(encoding="utf-8").splitlines():
            texts.extend(str(value) for value in json.loads(line).values())
    return texts


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny GPT-NeoX checkpoint with a tokenizer trained on the spot (Dolly tokens added)."""
    from dolly_spark.testing.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_model"), tokenizer_corpus())


@pytest.fixture(scope="session")
def tiny_model(tiny_model_dir):
    """(model, tokenizer) loaded from the tiny checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval(), AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def tiny_llama(tiny_model):
    """(model, tokenizer): a random two-layer Llama with grouped-query attention (the demo model's
    architecture), sharing the tiny tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tokenizer = tiny_model
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, intermediate_size=128, max_position_embeddings=512,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config).eval(), tokenizer


@pytest.fixture(scope="session")
def seeded_home(tmp_path_factory, tiny_model_dir) -> Path:
    """One project home as `make demo` leaves it, with the tiny model as support_dolly version 1
    (champion), shared by the tests that run the README's commands in subprocesses. Each writes
    its own tables, or says which it expects to find."""
    from project_home import seed_home

    return seed_home(tmp_path_factory.mktemp("seeded") / "home", tiny_model_dir)


@pytest.fixture(scope="module")
def registered_tiny(mlflow_registry, tiny_model):
    """The tiny model registered as version 1 of "tiny_dolly" with alias champion."""
    from dolly_spark.lifecycle.registry import CHAMPION, log_and_register

    model, tokenizer = tiny_model
    version = log_and_register(model, tokenizer, "tiny_dolly", "dolly", alias=CHAMPION, max_new_tokens=16)
    return "tiny_dolly", version


# Examples a tiny model is taught by heart, so tests can check exact answers and stop reasons.
TAUGHT = {
    "stop": ("Name the blue fruit.", None, "blueberry pie", "end"),
    "eos": ("Say the secret word.", None, "open sesame", "eos"),
    "long": ("Count for me.", None, "one two three four five six seven eight nine ten eleven twelve", "end"),
    "quoted": ("Repeat the code.", "The template says ### End and ### Response:\n here.", "code red", "end"),
}


@pytest.fixture(scope="session")
def taught_model(tiny_model_dir):
    """A tiny model trained by heart on TAUGHT (a plain loop, seconds on the CPU): each answer
    ends with the ``### End`` key or with EOS, as its entry says."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dolly_spark.prompts import encode_segments, get_format

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    fmt = get_format("dolly")
    sequences = []
    for instruction, context, response, ending in TAUGHT.values():
        ids = encode_segments(tokenizer, fmt.prompt_segments(instruction, context))
        ids += tokenizer(f"{response}\n\n", add_special_tokens=False)["input_ids"]
        ids.append(tokenizer.convert_tokens_to_ids("### End") if ending == "end" else tokenizer.eos_token_id)
        sequences.append(torch.tensor([ids]))
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        for ids in sequences:
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return model.eval(), tokenizer
