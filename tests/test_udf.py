"""apply_instruction on local Spark with the tiny model in a temporary MLflow registry."""
from __future__ import annotations

import re

import pytest
from pyspark.sql import functions as F

from conftest import no_jobs_ran

from dolly_spark import apply_instruction
from dolly_spark.engine import GenerationSettings, InstructionEngine
from dolly_spark.models import LOAD_LEDGER, checkpoint_paths, fetch_model_files, version_cache_dir
from dolly_spark.registry import ModelNotFoundError, resolve_model

TICKETS = [
    ("t1", "My HearthLink thermostat shows error E42 every morning and the house is freezing."),
    ("t2", None),
    ("t3", ""),
    ("t4", "Refund please."),
    ("t5", "The PayDesk invoice charged me twice for March. " * 15),
    ("t6", "Login loops back to the start page after I enter the code."),
]
INSTRUCTION = "Summarize the ticket in one sentence."


@pytest.fixture(scope="module")
def tickets(spark):
    return spark.createDataFrame(TICKETS, "ticket_id STRING, body STRING").withColumn("priority", F.lit(3))


def test_one_result_per_row_with_errors_for_bad_rows(spark, tickets, registered_tiny):
    name, version = registered_tiny
    out = apply_instruction(tickets, INSTRUCTION, input_col="body", key_col="ticket_id",
                            model_uri=f"models:/{name}@champion", max_new_tokens=8)
    rows = {row["ticket_id"]: row for row in out.collect()}
    assert out.columns == ["ticket_id", "body", "priority", "response"]
    assert sorted(rows) == [t for t, _ in TICKETS]
    assert all(rows[t]["body"] == body and rows[t]["priority"] == 3 for t, body in TICKETS)
    assert "null" in rows["t2"]["response"]["error"] and "empty" in rows["t3"]["response"]["error"]
    for ticket in ("t2", "t3"):
        assert rows[ticket]["response"]["finish_reason"] == "error"
    for ticket in ("t1", "t4", "t5", "t6"):
        result = rows[ticket]["response"]
        assert result["finish_reason"] in ("stop", "eos", "length") and result["prompt_tokens"] > 0
        assert (result["model_name"], result["model_version"]) == (name, version)


def test_spark_results_equal_engine_results(spark, tickets, registered_tiny, tmp_path):
    name, version = registered_tiny
    out = apply_instruction(tickets, INSTRUCTION, input_col="body", model_uri=f"models:/{name}/{version}",
                            max_new_tokens=10).orderBy("ticket_id")
    spark_results = [row["response"].asDict() for row in out.collect()]

    model_path, tokenizer_path = checkpoint_paths(fetch_model_files(resolve_model(f"models:/{name}/{version}"), str(tmp_path)))
    engine = InstructionEngine.from_pretrained(model_path, "dolly", GenerationSettings(max_new_tokens=10),
                                               tokenizer_path=tokenizer_path)
    engine_results = engine.run([INSTRUCTION] * len(TICKETS), [body for _, body in TICKETS], require_context=True)
    for spark_result, engine_result in zip(spark_results, engine_results):
        assert {k: spark_result[k] for k in vars(engine_result)} == vars(engine_result)


def test_per_row_instructions_from_a_column(spark, registered_tiny):
    name, version = registered_tiny
    df = spark.createDataFrame([("Name a river.",), (None,)], "question STRING")
    rows = apply_instruction(df, F.col("question"), model_uri=f"models:/{name}/{version}", max_new_tokens=4).collect()
    assert rows[0]["response"]["finish_reason"] != "error"
    assert rows[1]["response"]["finish_reason"] == "error"


def test_model_loads_once_per_python_worker(spark, registered_tiny, tiny_model):
    from dolly_spark.registry import log_and_register

    name, _ = registered_tiny
    # A version no worker has seen yet, so every worker that runs a task has to load it.
    version = log_and_register(*tiny_model, name, "dolly")
    spec = resolve_model(f"models:/{name}/{version}")
    ledger = version_cache_dir(spec) / LOAD_LEDGER
    before = ledger.read_text().splitlines() if ledger.exists() else []
    df = spark.range(64).repartition(8).select(F.concat(F.lit("ticket "), F.col("id").cast("string")).alias("body"))
    out = apply_instruction(df, INSTRUCTION, input_col="body", model_uri=spec.uri, max_new_tokens=2)
    assert out.rdd.getNumPartitions() == 8
    assert out.where(F.col("response.finish_reason") != "error").count() == 64
    new_loads = ledger.read_text().splitlines()[len(before):]
    pids = [re.search(r"pid=(\d+)", line).group(1) for line in new_loads]
    assert 1 <= len(new_loads) <= 2  # local[2]: at most two Python workers
    assert len(set(pids)) == len(pids)  # no worker loaded twice


def test_alias_moved_after_the_call_changes_nothing(spark, tickets, registered_tiny, tiny_model_dir):
    from dolly_spark.registry import CHAMPION, log_and_register
    from dolly_spark.testing import build_tiny_model
    from transformers import AutoTokenizer

    name, version = registered_tiny
    out = apply_instruction(tickets, INSTRUCTION, input_col="body", model_uri=f"models:/{name}@champion",
                            max_new_tokens=4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    newer = log_and_register(build_tiny_model(tokenizer, seed=1), tokenizer, name, "dolly", alias=CHAMPION)
    assert newer != version
    assert {row["response"]["model_version"] for row in out.collect()} == {version}
    moved = apply_instruction(tickets, INSTRUCTION, input_col="body", model_uri=f"models:/{name}@champion",
                              max_new_tokens=4)
    assert {row["response"]["model_version"] for row in moved.collect()} == {newer}


def test_local_checkpoint_path_works_without_registry(spark, tickets, tiny_model_dir):
    rows = apply_instruction(tickets, INSTRUCTION, input_col="body", model_uri=str(tiny_model_dir),
                             max_new_tokens=4).collect()
    assert len(rows) == len(TICKETS)
    assert {row["response"]["model_name"] for row in rows} == {tiny_model_dir.name}


def test_registered_model_loads_in_plain_mlflow_pyfunc(registered_tiny):
    import mlflow

    name, version = registered_tiny
    model = mlflow.pyfunc.load_model(f"models:/{name}/{version}")
    predictions = model.predict(["What is Delta Lake?", "Name a river."], params={"max_new_tokens": 6})
    assert len(predictions) == 2 and all(isinstance(text, str) and text for text in predictions)


def test_fail_fast_before_any_spark_job(spark, tickets, registered_tiny):
    name, _ = registered_tiny
    cases = [
        (lambda: apply_instruction(tickets, INSTRUCTION, input_col="body", model_uri="models:/no_such_model@champion"),
         "no registered model 'no_such_model'"),
        (lambda: apply_instruction(tickets, INSTRUCTION, input_col="body", model_uri=f"models:/{name}@gold"),
         "aliases: \\['champion'\\]"),
        (lambda: apply_instruction(tickets, INSTRUCTION, input_col="text", model_uri=f"models:/{name}/1"),
         "input column 'text' is not a column"),
        (lambda: apply_instruction(tickets, INSTRUCTION, input_col="priority", model_uri=f"models:/{name}/1"),
         "input column 'priority' .* has type int"),
        (lambda: apply_instruction(tickets, F.col("priority"), model_uri=f"models:/{name}/1"),
         "instruction column has type int"),
        (lambda: apply_instruction(tickets, INSTRUCTION, model_uri="/no/such/checkpoint"), "does not exist"),
    ]
    for action, message in cases:
        error, clean = no_jobs_ran(spark, action)
        assert re.search(message, str(error)), str(error)
        assert clean, f"a Spark job ran before failing: {error}"
    assert isinstance(no_jobs_ran(spark, cases[0][0])[0], ModelNotFoundError)
