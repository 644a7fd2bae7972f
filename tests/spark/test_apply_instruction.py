"""apply_instruction on local Spark with the tiny model in a temporary MLflow registry."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
from pyspark.sql import functions as F

from conftest import no_jobs_ran
from project_home import with_short_lived_jvm

from dolly_spark import apply_instruction
from dolly_spark.inference.engine import InstructionEngine
from dolly_spark.inference.engines import EngineConfig, Rows
from dolly_spark.lifecycle.loader import checkpoint_paths, fetch_model_files
from dolly_spark.lifecycle.registry import ModelNotFoundError, resolve_model
from dolly_spark.request import Request
from dolly_spark.spark.udf import instruction_udf

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
    engine = InstructionEngine.from_pretrained(model_path, tokenizer_path, "dolly")
    engine_results = engine.run(Rows([INSTRUCTION] * len(TICKETS), [body for _, body in TICKETS]),
                                Request(max_new_tokens=10, require_input=True))
    assert len(spark_results) == len(engine_results) == len(TICKETS)
    for spark_result, engine_result in zip(spark_results, engine_results):
        fields = vars(engine_result)
        # A free-text struct leaves out the structured answers' fields, which the engine leaves None.
        assert set(fields) - set(spark_result) == {"label", "label_probability", "choice_probabilities"}
        assert {k: spark_result[k] for k in fields if k in spark_result} == {
            k: v for k, v in fields.items() if k in spark_result}
        assert engine_result.label is None and engine_result.choice_probabilities is None


def test_per_row_instructions_from_a_column(spark, registered_tiny):
    name, version = registered_tiny
    df = spark.createDataFrame([("Name a river.",), (None,)], "question STRING")
    rows = apply_instruction(df, F.col("question"), model_uri=f"models:/{name}/{version}", max_new_tokens=4).collect()
    assert rows[0]["response"]["finish_reason"] != "error"
    assert rows[1]["response"]["finish_reason"] == "error"


def test_alias_moved_after_the_call_changes_nothing(spark, tickets, registered_tiny, tiny_model_dir):
    from dolly_spark.lifecycle.registry import CHAMPION, log_and_register, set_alias
    from dolly_spark.testing.tiny_models import build_tiny_model
    from transformers import AutoTokenizer

    name, version = registered_tiny
    out = apply_instruction(tickets, INSTRUCTION, input_col="body", model_uri=f"models:/{name}@champion",
                            max_new_tokens=4)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    newer = log_and_register(build_tiny_model(tokenizer, seed=1), tokenizer, name, "dolly", alias=CHAMPION)
    try:
        assert newer != version
        assert {row["response"]["model_version"] for row in out.collect()} == {version}
        moved = apply_instruction(tickets, INSTRUCTION, input_col="body", model_uri=f"models:/{name}@champion",
                                  max_new_tokens=4)
        assert {row["response"]["model_version"] for row in moved.collect()} == {newer}
    finally:  # the module's other tests use the champion registered_tiny registered, in any order
        set_alias(name, CHAMPION, version)


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
        (lambda: apply_instruction(tickets, INSTRUCTION, input_col="body", model_uri=f"models:/{name}/1",
                                   max_input_tokens=0), "max_input_tokens must be at least 1"),
    ]
    for action, message in cases:
        error, clean = no_jobs_ran(spark, action)
        assert re.search(message, str(error)), str(error)
        assert clean, f"a Spark job ran before failing: {error}"
    assert isinstance(no_jobs_ran(spark, cases[0][0])[0], ModelNotFoundError)


@pytest.fixture(scope="module")
def broken_checkpoint(tmp_path_factory, tiny_model_dir) -> Path:
    """A checkpoint that loads but cannot generate: its tokenizer (the tiny one) has ids far past
    the model's 16-token vocabulary, so every forward raises IndexError. A broken model, not a
    row's problem, and an exception that is not out-of-memory."""
    from transformers import AutoTokenizer, GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert tokenizer.eos_token_id < 16
    config = GPTNeoXConfig(vocab_size=16, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id)
    directory = tmp_path_factory.mktemp("broken_checkpoint")
    GPTNeoXForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_a_failed_generation_drops_the_processs_model(project_home, broken_checkpoint):
    from dolly_spark.lifecycle import loader as models

    spec = resolve_model(str(broken_checkpoint), "dolly")
    request, config = Request(spec, INSTRUCTION, max_new_tokens=4), EngineConfig()
    loaded = models.load_engine(spec, config)
    batches = iter([(pd.Series([INSTRUCTION]), pd.Series(["Refund please."]), pd.Series([None], dtype=object))])
    with pytest.raises(IndexError, match="index out of range"):  # the embedding's, past its 16 ids
        list(instruction_udf(request, config).func(batches))  # the UDF's body, as a Python worker runs it
    assert models.load_engine(spec, config) is not loaded  # reloaded, not the engine that failed


# Its own process, whose stderr holds every Python worker's (they print each load there): two
# cores and task retries allowed (local[2,2]); the session fixture's local[2] gives each task a
# single attempt, and Spark reads local mode's retries from the master.
RETRY_JOB = textwrap.dedent("""
    import json, sys
    from pyspark.sql import SparkSession, functions as F
    from dolly_spark import apply_instruction

    healthy, broken = sys.argv[1:3]
    spark = SparkSession.builder.master("local[2,2]").config("spark.ui.enabled", "false").getOrCreate()
    many = spark.range(64).repartition(8).select(F.concat(F.lit("ticket "), F.col("id").cast("string")).alias("body"))
    out = apply_instruction(many, "Summarize.", input_col="body", model_uri=healthy, prompt_format="dolly",
                            max_new_tokens=2)
    report = {"partitions": out.rdd.getNumPartitions(),
              "answered": out.where(F.col("response.finish_reason") != "error").count()}
    print("HEALTHY DONE", file=sys.stderr, flush=True)
    tickets = spark.createDataFrame([("t1", "My thermostat resets."), ("t2", "Refund please.")],
                                    "id STRING, body STRING")
    out = apply_instruction(tickets.coalesce(1), "Summarize.", input_col="body", model_uri=broken,
                            prompt_format="dolly", max_new_tokens=4)
    spark.sparkContext.setJobGroup("retried", "a broken model")
    try:
        report["rows"] = [row["response"].asDict() for row in out.collect()]
    except Exception as exc:
        report["error"] = str(exc)
    tracker = spark.sparkContext.statusTracker()
    jobs = [tracker.getJobInfo(job) for job in tracker.getJobIdsForGroup("retried")]
    report["jobs"] = [job.status for job in jobs]
    report["failed_task_attempts"] = sum(tracker.getStageInfo(stage).numFailedTasks
                                         for job in jobs for stage in job.stageIds)
    spark.stop()
    print("REPORT " + json.dumps(report))
""")


def loads(stderr: str, model_dir: Path) -> set[tuple[str, str]]:
    """(pid, that process's load number) of each load of the checkpoint in ``model_dir``; a log
    line repeated is one load."""
    return set(re.findall(rf"^dolly_spark: loaded {re.escape(model_dir.name)} version .* \(host .*, pid (\d+), "
                          r"load (\d+) of this process\)$", stderr, re.M))


@pytest.mark.slow
def test_each_python_worker_loads_once_and_a_broken_model_fails_the_task_which_spark_retries(
        tiny_model_dir, broken_checkpoint, tmp_path):
    repo = str(Path(__file__).resolve().parents[2])
    env = with_short_lived_jvm({**os.environ, "DOLLY_SPARK_HOME": str(tmp_path), "PYSPARK_PYTHON": sys.executable,
                                "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))})
    job = subprocess.run([sys.executable, "-c", RETRY_JOB, str(tiny_model_dir), str(broken_checkpoint)], env=env,
                         cwd=tmp_path, capture_output=True, text=True, timeout=300)
    lines = [line for line in job.stdout.splitlines() if line.startswith("REPORT ")]
    assert lines, job.stderr[-3000:]
    report = json.loads(lines[-1].removeprefix("REPORT "))
    healthy_part, broken_part = job.stderr.split("HEALTHY DONE")
    # 8 tasks on local[2]: at most two Python workers, and no worker loaded twice.
    assert report["partitions"] == 8 and report["answered"] == 64
    healthy_loads = loads(healthy_part, tiny_model_dir)
    assert 1 <= len(healthy_loads) <= 2 and all(number == "1" for _, number in healthy_loads), healthy_loads
    assert "rows" not in report, f"the broken model produced rows instead of failing: {report['rows']}"
    assert "IndexError: index out of range" in report["error"], report["error"][-2000:]
    assert report["jobs"] == ["FAILED"]
    assert report["failed_task_attempts"] == 2  # the task failed, was retried, and failed again
    assert len(loads(broken_part, broken_checkpoint)) == 2  # each attempt loaded the model afresh


@pytest.mark.slow
def test_the_vllm_engine_answers_each_row_as_the_hf_engine(spark, tickets, project_home):
    """engine="vllm" through Spark on the demo model (Llama, which vLLM runs with its own model
    code: a GPT-NeoX would rewire transformers' classes in the session's reused Python workers):
    the same greedy answers and errors as engine="hf", each row naming its engine."""
    from dolly_spark.batch.demo import demo_checkpoint

    settings = dict(input_col="body", key_col="ticket_id", model_uri=str(demo_checkpoint()), max_new_tokens=12,
                    dtype="float32")
    one_task = tickets.coalesce(1)  # one Python worker loads vLLM
    answers = {}
    for engine in ("hf", "vllm"):
        rows = apply_instruction(one_task, INSTRUCTION, engine=engine, **settings).collect()
        answers[engine] = {row["ticket_id"]: row["response"].asDict() for row in rows}
    assert {result["engine"] for result in answers["vllm"].values()} == {"vllm"}
    assert {result["engine"] for result in answers["hf"].values()} == {"hf"}
    for ticket, _ in TICKETS:
        ours, theirs = dict(answers["vllm"][ticket]), dict(answers["hf"][ticket])
        ours.pop("engine"), theirs.pop("engine")
        assert ours == theirs, ticket
    assert sum(result["completion_tokens"] for result in answers["vllm"].values()) > 0
    assert answers["vllm"]["t2"]["finish_reason"] == "error"
