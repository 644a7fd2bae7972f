"""The dry run and the budget caps of the summarize job, on local Spark + Delta with the tiny model:
the estimate counts what the runs that follow do and writes nothing; a capped run leaves exactly
the rest pending, and one told to fail over budget refuses before generating."""
from __future__ import annotations

import dataclasses
import re

import mlflow
import pytest

from dolly_spark.batch import staging
from dolly_spark.batch.estimate import DRY_RUN_JOB, BudgetExceededError
from dolly_spark.batch.summarize import dry_run, run_summarize
from dolly_spark.spark.tables import delta_version
from summarize_helpers import config_for, make_source, one_row_per_ticket


def last_run(job: str):
    (run,) = mlflow.search_runs(search_all_experiments=True, filter_string=f"tags.job = '{job}'", max_results=1,
                                order_by=["attributes.start_time DESC"], output_format="list")
    return run


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
    seconds_per_row = first_run.data.metrics["wall_seconds"] / 2

    # Two and a half tickets' time at the first run's rate: two of the five pending fit.
    capped = dataclasses.replace(config, max_hours=2.5 * seconds_per_row / 3600)
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
    assert estimate.seconds == pytest.approx(5 * seconds_per_row)
    logged = last_run(DRY_RUN_JOB)
    assert logged.data.metrics["prompt_tokens"] == estimate.prompt_tokens
    assert {artifact.path for artifact in mlflow.MlflowClient().list_artifacts(logged.info.run_id)} == {
        "estimate.json", "estimate.txt", "prompt_tokens_histogram.png"}
    assert sum(rows for _, _, rows in estimate.prompt_histogram) == 5

    within = dry_run(spark, capped)
    assert (within.pending_rows, within.rows_this_run) == (5, 2) and within.cap.startswith("max_hours=")
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

    # Another instruction is a new request for every ticket, with no run to take a rate from:
    # with calibration off there is none; with it, two tickets are generated to measure one.
    other = dataclasses.replace(config, instruction="List the problems.", calibrate_rows=0)
    version = delta_version(spark, target)
    unknown = dry_run(spark, other)
    assert unknown.reasons == {"new": 0, "retry": 0, "edited input": 0, "new request": 6}
    assert unknown.seconds is None and unknown.rate_source.startswith("no rate")
    calibrated = dry_run(spark, dataclasses.replace(other, calibrate_rows=2))
    assert calibrated.rate_source.startswith("a calibration run of 2 tickets") and calibrated.seconds > 0
    assert 0 < calibrated.expected_generated_tokens <= calibrated.generated_tokens_bound == 5 * 4
    assert delta_version(spark, target) == version  # the calibration's answers were discarded
