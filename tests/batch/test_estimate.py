"""The dry run and the budget caps of the summarize job, on local Spark + Delta with the tiny model:
the estimate counts what the runs that follow do and writes nothing; a capped run leaves exactly
the rest pending, and one told to fail over budget refuses before generating. Its rates come from
the MLflow run that the engine now running answered, whatever its task slots."""
from __future__ import annotations

import dataclasses
import re

import mlflow
import pytest

from dolly_spark.batch import staging
from dolly_spark.batch.estimate import DRY_RUN_JOB, BudgetExceededError
from dolly_spark.batch.rates import RUN_JOB, history_rate
from dolly_spark.batch.summarize import dry_run, run_summarize
from dolly_spark.request import ModelSpec, build_request
from dolly_spark.spark.tables import delta_version
from summarize_helpers import config_for, make_source, one_row_per_ticket


def last_run(job: str):
    (run,) = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.job = '{job}'", max_results=1,
                                order_by=["attributes.start_time DESC"], output_format="list")
    return run


MODEL = ModelSpec("registry", "models:/support_dolly/3", "support_dolly", "3", "chat")


def _log_run(request, engines_used: str, slots: int, slot_seconds: float, fixed: float, slot_kind="CPU-core") -> str:
    """A finished summarize run as ``run_summarize`` logs it, with the figures given."""
    with mlflow.start_run(run_name=RUN_JOB) as run:
        mlflow.set_tags({"job": RUN_JOB, "engines_used": engines_used, "slot_kind": slot_kind,
                         "executor_kind": f"{slots} CPU task slots"})
        mlflow.log_params({"engine": "auto", "request_fingerprint": request.fingerprint()})
        mlflow.log_metrics({"rows_written": 10, "generated_tokens": 40, "task_slots": slots, "fixed_seconds": fixed,
                            "generate_slot_seconds": slot_seconds, "wall_seconds": fixed + slot_seconds / slots})
    return run.info.run_id


def test_history_is_the_run_the_engine_answered_on_any_slot_count(mlflow_registry):
    request = build_request(MODEL, "Summarize for the rate history.", require_input=True, max_new_tokens=8)
    answered_by_hf = _log_run(request, "hf", slots=2, slot_seconds=50.0, fixed=12.0)
    _log_run(request, "vllm", slots=8, slot_seconds=5.0, fixed=40.0)  # later, by vLLM, asked for as "auto" too
    _log_run(request, "hf", slots=2, slot_seconds=1.0, fixed=1.0, slot_kind="GPU")

    rate = history_rate(request, "hf", "CPU-core")
    assert rate is not None and rate.source.startswith(f"MLflow run {answered_by_hf} ")
    # Its own rate per slot and fixed seconds, for a cluster of any size.
    assert (rate.slot_seconds_per_row, rate.fixed_seconds, rate.engine) == (5.0, 12.0, "hf")
    assert rate.seconds(10, 4) == 12.0 + 12.5
    assert history_rate(request, "vllm", "CPU-core").slot_seconds_per_row == 0.5
    assert history_rate(request, "auto", "CPU-core") is None
    assert history_rate(build_request(MODEL, "Another instruction.", require_input=True), "hf", "CPU-core") is None


@pytest.mark.slow
def test_dry_runs_count_what_the_runs_that_follow_do_and_caps_leave_the_rest_pending(spark, registered_tiny):
    name, _ = registered_tiny
    source, target = make_source(spark, "tickets_dry"), "summaries_dry"
    # Its own instruction: no other test's run of this request is in MLflow to take a rate from.
    # T-4's prompt (about 300 tokens) is over max_input_tokens, the others' (about 105) are not.
    config = config_for(source, target, f"models:/{name}@champion", instruction="Summarize for the estimate.",
                        max_input_tokens=200, max_new_tokens=4)
    first = run_summarize(spark, dataclasses.replace(config, max_rows=2))
    assert (first.rows_pending, first.rows_left) == (2, 4)
    assert sorted(one_row_per_ticket(spark, target)) == ["T-1", "T-2"]  # the lowest ids
    spark.sql(f"UPDATE {source} SET body = 'I was charged twice in March.' WHERE ticket_id = 'T-2'")
    version = delta_version(spark, target)
    first_run = last_run("summarize_tickets")
    metrics = first_run.data.metrics
    # Its time, apart: generating (the model loaded before, by a job that generates nothing),
    # and what a run costs whatever its size.
    assert metrics["load_seconds"] > 0 and metrics["generate_seconds"] > 0 and metrics["calibration_seconds"] == 0
    assert metrics["fixed_seconds"] + metrics["generate_seconds"] == pytest.approx(metrics["wall_seconds"])
    assert metrics["generate_slot_seconds"] == pytest.approx(2 * metrics["generate_seconds"])  # on 2 slots
    slot_seconds_per_row, fixed = metrics["generate_slot_seconds"] / 2, metrics["fixed_seconds"]

    # Two and a half tickets' time on 2 slots at the first run's rate: two of the five pending
    # fit. Asked of "hf" by name, it is the run "auto" left, which hf answered.
    capped = dataclasses.replace(config, engine="hf", max_hours=(fixed + 2.5 * slot_seconds_per_row / 2) / 3600)
    with pytest.raises(BudgetExceededError, match=r"5 tickets of tickets_dry are pending .* over the cap of 2 ") as refused:
        run_summarize(spark, dataclasses.replace(capped, fail_over_budget=True))
    assert re.search(r"^pending tickets +5 \(4 new, 1 edited input\)$", str(refused.value), re.M), refused.value

    estimate = dry_run(spark, config)
    assert delta_version(spark, target) == version
    assert not spark.catalog.tableExists(staging.staging_table(target, "pending"))
    assert estimate.pending_rows == estimate.rows_this_run == 5
    assert estimate.reasons == {"new": 4, "retry": 0, "edited input": 1, "new request": 0}
    assert (estimate.skipped_null_ids, estimate.refused_rows, estimate.truncated_rows) == (1, 1, 1)  # T-3, T-4
    assert estimate.generated_tokens_bound == 4 * 4
    # The first run's rate: the refused run wrote nothing, so it has none.
    assert estimate.rate_source.startswith(f"MLflow run {first_run.info.run_id}")
    assert estimate.engine == "hf"  # what "auto" runs here, on CPU executors
    assert estimate.seconds == pytest.approx(fixed + 5 * slot_seconds_per_row / 2)
    logged = last_run(DRY_RUN_JOB)
    assert logged.data.metrics["prompt_tokens"] == estimate.prompt_tokens
    assert {artifact.path for artifact in mlflow.MlflowClient().list_artifacts(logged.info.run_id)} == {
        "estimate.json", "estimate.txt", "prompt_tokens_histogram.png"}
    assert sum(rows for _, _, rows in estimate.prompt_histogram) == 5

    within = dry_run(spark, capped)
    assert (within.pending_rows, within.rows_this_run) == (5, 2) and within.cap.startswith("max_hours=")
    assert within.rate_source.startswith(f"MLflow run {first_run.info.run_id}")
    taken = run_summarize(spark, capped)
    assert (taken.rows_pending, taken.rows_left, taken.prompt_tokens) == (2, 3, within.prompt_tokens)
    assert sorted(one_row_per_ticket(spark, target)) == ["T-1", "T-2", "T-3"]
    rest = run_summarize(spark, config)
    assert (rest.rows_pending, rest.rows_left) == (3, 0)
    # What the dry run counted is what the two runs after it read and wrote.
    assert taken.prompt_tokens + rest.prompt_tokens == estimate.prompt_tokens
    rows = one_row_per_ticket(spark, target)
    assert sorted(rows) == ["T-1", "T-2", "T-3", "T-4", "T-5", "T-6"]
    assert estimate.prompt_tokens == sum(row["prompt_tokens"] for key, row in rows.items() if key != "T-1")
    # Nothing pending, on a quiet day: zero, with no rate to take (none of "hf" by name is
    # needed), for the dry run and for the run.
    quiet = dataclasses.replace(config, engine="hf", max_hours=1, calibrate_rows=0)
    nothing = dry_run(spark, quiet)
    assert (nothing.pending_rows, nothing.rows_this_run, nothing.seconds, nothing.cap) == (0, 0, 0, "")
    assert run_summarize(spark, quiet).rows_pending == 0

    # Another instruction is a new request for every ticket, with no run to take a rate from:
    # with calibration off there is none; with it, two tickets are generated to measure one.
    other = dataclasses.replace(config, instruction="List the problems.", calibrate_rows=0)
    version = delta_version(spark, target)
    unknown = dry_run(spark, other)
    assert unknown.reasons == {"new": 0, "retry": 0, "edited input": 0, "new request": 6}
    assert unknown.seconds is None and unknown.rate_source.startswith("no rate")
    calibrated = dry_run(spark, dataclasses.replace(other, calibrate_rows=2))
    assert calibrated.rate_source.startswith("a calibration of 2 tickets (1 per task on 2 CPU-core slots)")
    assert calibrated.seconds > 0 and calibrated.engine == "hf"
    assert 0 < calibrated.expected_generated_tokens <= calibrated.generated_tokens_bound == 5 * 4
    assert delta_version(spark, target) == version  # the calibration's answers were discarded
