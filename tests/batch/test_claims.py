"""Two runs on one target at once: one claims it, the other fails fast naming it; nothing is lost
and nothing duplicated. A dead run's claim is taken over once stale."""
from __future__ import annotations

import dataclasses
import json
import threading
import time
from datetime import timedelta

import pytest

from dolly_spark.batch import claims, staging
from dolly_spark.batch.summarize import run_summarize
from summarize_helpers import config_for, make_source, one_row_per_ticket

pytestmark = pytest.mark.slow


def test_two_runs_claiming_at_the_same_moment_exactly_one_wins(spark):
    outcomes: list = []
    for attempt in range(2):
        barrier = threading.Barrier(2)

        def claim():
            barrier.wait()
            try:
                outcomes.append(claims.acquire(spark, "claimed_at_once", {"run": attempt}, timedelta(hours=1)))
            except Exception as failure:  # noqa: BLE001 - anything but TargetBusyError fails below
                outcomes.append(failure)

        threads = [threading.Thread(target=claim) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
            assert not thread.is_alive(), "a claim attempt hung"
        won = [o for o in outcomes if isinstance(o, claims.Claim)]
        lost = [o for o in outcomes if isinstance(o, claims.TargetBusyError)]
        assert (len(won), len(lost)) == (1, 1), [str(outcome)[:2000] for outcome in outcomes]
        assert "another summarize run is writing target table 'claimed_at_once'" in str(lost[0])
        won[0].release()
        outcomes.clear()
    assert spark.read.table("claimed_at_once__claim").count() == 0


def test_a_second_run_on_a_busy_target_fails_fast_naming_the_first(spark, registered_tiny, monkeypatch):
    name, _ = registered_tiny
    source = make_source(spark, "tickets_concurrent")
    config = config_for(source, "summaries_concurrent", f"models:/{name}@champion", max_attempts=1)
    # The first run holds its claim until the second has tried: whatever the machine's speed,
    # the second run meets a busy target.
    first_holds_claim, second_has_tried = threading.Event(), threading.Event()
    acquire = claims.acquire

    def first_run_acquire(*args, **kwargs):
        claim = acquire(*args, **kwargs)
        if threading.current_thread() is running:
            first_holds_claim.set()
            assert second_has_tried.wait(timeout=300), "the second run never tried"
        return claim

    monkeypatch.setattr(claims, "acquire", first_run_acquire)
    staged_pending: list = []
    stage_pending = staging.stage_pending
    monkeypatch.setattr(staging, "stage_pending", lambda *args: staged_pending.append(args) or stage_pending(*args))
    first: dict = {}
    running = threading.Thread(target=lambda: first.update(report=run_summarize(spark, config)))
    running.start()
    try:
        assert first_holds_claim.wait(timeout=300), "the first run never claimed its target"
        claim = spark.read.table("summaries_concurrent__claim").first()
        with pytest.raises(claims.TargetBusyError) as busy:
            run_summarize(spark, config)
        # Fails fast: before its pending tickets are staged, the only scan of the source (the
        # first run is still waiting inside its claim, so it has staged nothing either).
        assert staged_pending == []
    finally:
        second_has_tried.set()
        running.join(timeout=600)
    assert not running.is_alive(), "the first run did not finish"
    message = str(busy.value)
    assert "another summarize run is writing target table 'summaries_concurrent'" in message
    assert claim["claim_id"] and '"mlflow_run_id"' in claim["owner"]
    assert json.loads(claim["owner"])["mlflow_run_id"] in message
    assert "DELETE FROM summaries_concurrent__claim" in message
    assert first["report"].rows_written == 6
    rows = one_row_per_ticket(spark, "summaries_concurrent")  # asserts one row per ticket
    assert sorted(rows) == ["T-1", "T-2", "T-3", "T-4", "T-5", "T-6"]
    assert spark.read.table("summaries_concurrent__claim").count() == 0  # released: the target is free again


def test_a_dead_runs_stale_claim_is_taken_over(spark, registered_tiny):
    name, _ = registered_tiny
    source = make_source(spark, "tickets_stale_claim")
    spark.sql(f"CREATE TABLE IF NOT EXISTS summaries_stale_claim__claim ({claims.CLAIM_SCHEMA}) USING delta")
    spark.sql("INSERT INTO summaries_stale_claim__claim VALUES ('summaries_stale_claim', 'dead', "
              "'{\"mlflow_run_id\": \"dead-run\"}', current_timestamp() - INTERVAL 3 HOURS, "
              "current_timestamp() - INTERVAL 2 HOURS)")
    config = config_for(source, "summaries_stale_claim", f"models:/{name}@champion", max_attempts=1)
    with pytest.raises(claims.TargetBusyError, match="dead-run"):
        run_summarize(spark, dataclasses.replace(config, claim_timeout_minutes=180))
    assert run_summarize(spark, config).rows_written == 6  # 60 minutes: the 2-hour-old claim is stale
    assert spark.read.table("summaries_stale_claim__claim").count() == 0


def test_a_run_whose_claim_was_taken_over_while_it_stalled_merges_nothing(spark, registered_tiny, monkeypatch):
    """A run that stalls past its claim's timeout finds, before it merges, that another run took
    the claim over: it stops with TargetBusyError and leaves the target, the claim and the
    staging tables (now the other run's) alone."""
    name, _ = registered_tiny
    source = make_source(spark, "tickets_taken_over")
    stale_after = timedelta(seconds=3)
    config = config_for(source, "summaries_taken_over", f"models:/{name}@champion", max_attempts=1,
                        claim_timeout_minutes=stale_after.total_seconds() / 60)
    stage_results = staging.stage_results
    next_run: dict = {}

    def stalled_then_taken_over(*args, **kwargs):
        staged = stage_results(*args, **kwargs)
        time.sleep(stale_after.total_seconds() + 0.5)  # no heartbeat for longer than the timeout
        next_run["claim"] = claims.acquire(spark, "summaries_taken_over", {"run": "the next one"}, stale_after)
        return staged

    monkeypatch.setattr(staging, "stage_results", stalled_then_taken_over)
    with pytest.raises(claims.TargetBusyError, match="claim on target table 'summaries_taken_over' is gone"):
        run_summarize(spark, config)
    assert not spark.catalog.tableExists("summaries_taken_over")  # nothing was merged
    assert spark.read.table("summaries_taken_over__claim").first()["claim_id"] == next_run["claim"].claim_id
    assert spark.catalog.tableExists("summaries_taken_over__staged")
