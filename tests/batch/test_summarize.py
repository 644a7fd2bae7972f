"""The summarize job end to end on local Spark + Delta with the tiny model in a temporary registry."""
from __future__ import annotations

import dataclasses
import re

import pytest
from mlflow.tracking import MlflowClient

from conftest import no_jobs_ran
from dolly_spark.job_config import load_config
from dolly_spark.batch import summarize
from dolly_spark.batch.summarize import SummarizeConfig, run_summarize
from dolly_spark.spark.tables import delta_version

from summarize_helpers import config_for, make_source, one_row_per_ticket


@pytest.mark.slow
def test_job_end_to_end_then_a_rerun_under_other_engine_settings_does_nothing(spark, registered_tiny, monkeypatch):
    name, version = registered_tiny
    source = make_source(spark, "tickets_e2e")
    real_lookup, lookups = MlflowClient.get_model_version_by_alias, []

    def counted_lookup(client, *args, **kwargs):
        lookups.append(args)
        return real_lookup(client, *args, **kwargs)

    monkeypatch.setattr(MlflowClient, "get_model_version_by_alias", counted_lookup)
    # One attempt: the ticket without text (T-3) is given up at once, so the rerun has nothing to do.
    config = config_for(source, "summaries_e2e", f"models:/{name}@champion", chunk_rows=3, max_attempts=1)

    first = run_summarize(spark, config)
    assert first.chunks == 2
    assert lookups == [(name, "champion")]  # once for the run, not once per chunk
    rows = one_row_per_ticket(spark, "summaries_e2e")
    assert sorted(rows) == ["T-1", "T-2", "T-3", "T-4", "T-5", "T-6"]
    assert (first.rows_pending, first.rows_written, first.errors, first.skipped_null_ids) == (6, 6, 1, 1)
    assert (first.retried, first.recovered, first.given_up) == (0, 0, 1)
    assert rows["T-3"]["error"] and rows["T-3"]["finish_reason"] == "error"
    assert all(rows[t]["response"] for t in ("T-1", "T-2", "T-4", "T-5", "T-6"))
    assert {row["model_version"] for row in rows.values()} == {version}
    assert all(row["processed_at"] is not None for row in rows.values())
    assert first.generated_tokens == sum(row["completion_tokens"] for row in rows.values()) > 0

    # How rows are run is not what they answer: another token budget or engine reprocesses nothing.
    table_version = delta_version(spark, "summaries_e2e")
    second = run_summarize(spark, dataclasses.replace(config, token_budget=2048, engine="hf"))
    assert (second.rows_pending, second.rows_written, second.generated_tokens) == (0, 0, 0)
    assert delta_version(spark, "summaries_e2e") == table_version

    runs = MlflowClient().search_runs([_experiment_id()], order_by=["attribute.start_time ASC"])
    job_runs = [r for r in runs if r.data.tags.get("job") == "summarize_tickets"]
    metrics = job_runs[-2].data.metrics
    assert metrics["rows_read"] == 6 and metrics["rows_written"] == 6 and metrics["errors"] == 1
    assert metrics["generated_tokens"] == first.generated_tokens and metrics["tokens_per_second"] > 0
    assert metrics["wall_seconds"] > 0 and job_runs[-2].data.params["model_version"] == version
    assert (metrics["rows_engine_hf"], metrics["rows_engine_vllm"]) == (6, 0)
    assert job_runs[-2].data.tags["engines_used"] == "hf" and {row["engine"] for row in rows.values()} == {"hf"}
    assert job_runs[-1].data.metrics["rows_written"] == 0


def _experiment_id() -> str:
    import mlflow

    return mlflow.get_experiment_by_name("tests").experiment_id


@pytest.mark.slow
def test_crash_mid_run_then_rerun_leaves_one_row_per_ticket(spark, registered_tiny, monkeypatch):
    name, _ = registered_tiny
    source = make_source(spark, "tickets_crash")
    # One attempt, so a ticket that landed with an error (T-3 has no text) is not retried.
    config = config_for(source, "summaries_crash", f"models:/{name}@champion", chunk_rows=3, max_attempts=1)
    real_merge, merges = summarize.merge_results, []

    def merge_then_crash(*args, **kwargs):
        if merges:
            raise RuntimeError("executor lost (injected)")
        merges.append(args)
        real_merge(*args, **kwargs)

    monkeypatch.setattr(summarize, "merge_results", merge_then_crash)
    with pytest.raises(RuntimeError, match="injected"):
        run_summarize(spark, config)
    survived = one_row_per_ticket(spark, "summaries_crash")
    assert 0 < len(survived) < 6  # the first chunk landed, the rest did not
    # The failed run cleaned up after itself: no staging tables, no claim left to go stale.
    assert not any(spark.catalog.tableExists(f"summaries_crash__{role}") for role in ("pending", "staged"))
    assert spark.read.table("summaries_crash__claim").count() == 0

    monkeypatch.setattr(summarize, "merge_results", real_merge)
    rerun = run_summarize(spark, config)
    assert rerun.rows_pending == 6 - len(survived)
    rows = one_row_per_ticket(spark, "summaries_crash")
    assert sorted(rows) == ["T-1", "T-2", "T-3", "T-4", "T-5", "T-6"]
    assert all(rows[t]["processed_at"] == survived[t]["processed_at"] for t in survived)  # not redone


@pytest.mark.slow
def test_new_model_version_reprocesses_every_ticket(spark, registered_tiny, tiny_model_dir):
    from transformers import AutoTokenizer

    from dolly_spark.lifecycle.registry import log_and_register
    from dolly_spark.testing.tiny_models import build_tiny_model

    name, _ = registered_tiny
    source = make_source(spark, "tickets_versions")
    run_summarize(spark, config_for(source, "summaries_versions", f"models:/{name}@champion"))
    # As a target written before results named their engine: without that column.
    written = spark.read.table("summaries_versions").drop("engine")
    written.write.format("delta").mode("overwrite").option("overwriteSchema", "true").saveAsTable("summaries_versions")
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    newer = log_and_register(build_tiny_model(tokenizer, seed=5), tokenizer, name, "dolly")

    report = run_summarize(spark, config_for(source, "summaries_versions", f"models:/{name}/{newer}"))
    assert report.rows_pending == 6 and report.model_version == newer
    rows = one_row_per_ticket(spark, "summaries_versions")
    assert len(rows) == 6 and {row["model_version"] for row in rows.values()} == {newer}
    # The target gained the column at this run's MERGE; "auto" ran the "hf" engine on this CPU.
    assert {row["engine"] for row in rows.values()} == {"hf"} and report.rows_by_engine == {"hf": 6, "vllm": 0}


def test_bad_configuration_fails_before_any_spark_job(spark, registered_tiny):
    name, _ = registered_tiny
    source = make_source(spark, "tickets_bad_config")
    cases = [
        (config_for("no_such_tickets", "out_bad", f"models:/{name}@champion"), "source table 'no_such_tickets' does not exist"),
        (config_for(source, "out_bad", "models:/nope@champion"), "no registered model 'nope'"),
        (config_for(source, "out_bad", f"models:/{name}@champion", text_col="text"), "text column 'text' is not a column"),
        (config_for(source, "out_bad", f"models:/{name}@champion", id_col="id"), "id column 'id' is not a column"),
    ]
    for config, message in cases:
        error, clean = no_jobs_ran(spark, lambda: run_summarize(spark, config))
        assert re.search(message, str(error)), str(error)
        assert clean, f"a Spark job ran before failing: {error}"


def test_wrong_target_table_is_named(spark, registered_tiny):
    name, _ = registered_tiny
    source = make_source(spark, "tickets_wrong_target")
    spark.range(2).write.format("delta").mode("overwrite").saveAsTable("not_a_summary_table")
    with pytest.raises(ValueError, match="target table 'not_a_summary_table' exists but lacks columns"):
        run_summarize(spark, config_for(source, "not_a_summary_table", f"models:/{name}@champion"))


def test_max_input_tokens_comes_from_the_yaml_and_the_flag():
    from pathlib import Path

    conf = str(Path(__file__).resolve().parents[2] / "conf" / "summarize_tickets.yaml")
    assert load_config(SummarizeConfig, ["--config", conf], "summarize", "").max_input_tokens == 4096
    flagged = load_config(SummarizeConfig, ["--config", conf, "--max-input-tokens", "512"], "summarize", "")
    assert flagged.max_input_tokens == 512


def test_a_switch_alone_turns_it_on_and_a_value_sets_it():
    parse = lambda *flags: load_config(SummarizeConfig, list(flags), "summarize", "")  # noqa: E731
    assert parse().dry_run is False
    assert parse("--dry-run").dry_run is True
    assert parse("--dry-run", "--max-hours", "2").max_hours == 2.0
    assert parse("--dry-run", "false").dry_run is False
    assert parse("--fail-over-budget", "--dry-run").fail_over_budget is True


@pytest.mark.slow
def test_max_input_tokens_truncates_long_tickets(spark, registered_tiny):
    name, _ = registered_tiny
    source = make_source(spark, "tickets_capped")
    # The default instruction's prompt is over 100 tokens before any ticket text; T-4's is over 300.
    run_summarize(spark, config_for(source, "summaries_capped", f"models:/{name}@champion", max_input_tokens=200))
    rows = one_row_per_ticket(spark, "summaries_capped")
    assert rows["T-4"]["truncated"] and 150 < rows["T-4"]["prompt_tokens"] <= 200, rows["T-4"]
    assert not rows["T-1"]["truncated"] and rows["T-1"]["prompt_tokens"] > 0, rows["T-1"]
