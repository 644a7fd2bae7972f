"""Results that stay true, on local Spark + Delta with the tiny model: a ticket is redone exactly
when its text, the instruction, a setting or the model changes; errors never replace answers;
failed tickets are retried up to max_attempts, unless a retry cannot change the error;
old targets are upgraded in place."""
from __future__ import annotations

import pytest

from dolly_spark.batch.summarize import run_summarize
from dolly_spark.spark.tables import delta_version
from conftest import INTERPRETED_EXPRESSIONS
from summarize_helpers import config_for, make_source, one_row_per_ticket

pytestmark = pytest.mark.slow


def classes_compiled(spark) -> int:
    """Classes of generated code the session's JVM has compiled so far (a cache hit compiles none)."""
    return spark._jvm.org.apache.spark.metrics.source.CodegenMetrics.METRIC_COMPILATION_TIME().getCount()


@pytest.fixture
def code_generation(spark):
    """Spark's code generation on for one test, as in the jobs users run (the tests' session
    interprets expressions: see conftest's ``spark``)."""
    for key in INTERPRETED_EXPRESSIONS:
        spark.conf.unset(key)  # Spark's defaults: code generation
    yield
    for key, value in INTERPRETED_EXPRESSIONS.items():
        spark.conf.set(key, value)


def test_edited_ticket_and_changed_instruction_redo_exactly_the_rows_they_affect(spark, registered_tiny,
                                                                                 code_generation):
    name, _ = registered_tiny
    source = make_source(spark, "tickets_fresh")
    config = config_for(source, "summaries_fresh", f"models:/{name}@champion", max_attempts=1)
    compiled_before = classes_compiled(spark)
    run_summarize(spark, config)
    # The session's first run with code generation on: it compiles its queries' code.
    assert classes_compiled(spark) - compiled_before > 30
    before = one_row_per_ticket(spark, "summaries_fresh")
    assert len({row["request_fingerprint"] for row in before.values()}) == 1
    assert len({row["input_hash"] for row in before.values()}) == 6

    # Unchanged rerun: nothing generated, nothing written.
    version = delta_version(spark, "summaries_fresh")
    assert run_summarize(spark, config).rows_pending == 0
    assert delta_version(spark, "summaries_fresh") == version

    # The customer replies: T-2's text grows. Only T-2 is summarized again.
    spark.sql("UPDATE tickets_fresh SET body = concat(body, ' Update: still no refund.') WHERE ticket_id = 'T-2'")
    edited = run_summarize(spark, config)
    assert (edited.rows_pending, edited.rows_written) == (1, 1)
    after = one_row_per_ticket(spark, "summaries_fresh")
    assert after["T-2"]["input_hash"] != before["T-2"]["input_hash"]
    assert after["T-2"]["processed_at"] > before["T-2"]["processed_at"]
    assert all(after[t]["processed_at"] == before[t]["processed_at"] for t in after if t != "T-2")

    # A new instruction: every ticket again, the old instruction's rows replaced.
    reworded = config_for(source, "summaries_fresh", f"models:/{name}@champion", max_attempts=1,
                          instruction="List the customer's problems.")
    compiled_before = classes_compiled(spark)
    report = run_summarize(spark, reworded)
    assert report.rows_pending == 6
    # The session kept the code the edited run's queries compiled (about 120 classes, over Spark's
    # default cache of 100): this run, of the same shape, compiles next to none anew.
    assert classes_compiled(spark) - compiled_before < 30
    rows = one_row_per_ticket(spark, "summaries_fresh")
    assert len(rows) == 6 and len({row["request_fingerprint"] for row in rows.values()}) == 1
    assert rows["T-1"]["request_fingerprint"] != before["T-1"]["request_fingerprint"]
    # (Which settings change the fingerprint, and so redo every row the same way, is
    # tests/test_request.py's test_fingerprint_changes_with_what_changes_an_answer_only.)


def test_an_error_never_replaces_an_answer_and_a_fixed_input_recovers(spark, registered_tiny, tiny_model_dir):
    from transformers import AutoTokenizer

    from dolly_spark.lifecycle.registry import log_and_register
    from dolly_spark.testing.tiny_models import build_tiny_model

    name, _ = registered_tiny
    source = make_source(spark, "tickets_errors")
    run_summarize(spark, config_for(source, "summaries_errors", f"models:/{name}@champion", max_attempts=2))
    good = one_row_per_ticket(spark, "summaries_errors")
    assert good["T-1"]["response"] and good["T-3"]["error"]

    # A version whose context window cannot hold the instruction: every row fails under it.
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    narrow = log_and_register(build_tiny_model(tokenizer, seed=7, context_window=48), tokenizer, name, "dolly")
    failing = config_for(source, "summaries_errors", f"models:/{name}/{narrow}", max_attempts=2)
    first = run_summarize(spark, failing)
    # Prompts over the model's window: the same request on the same input fails the same way.
    assert (first.rows_pending, first.errors, first.given_up) == (6, 6, 6)
    rows = one_row_per_ticket(spark, "summaries_errors")
    for ticket in ("T-1", "T-2", "T-4", "T-5", "T-6"):
        kept, now = good[ticket], rows[ticket]
        assert now["response"] == kept["response"] and now["error"] is None  # the answer stays
        assert now["model_version"] == kept["model_version"] and now["processed_at"] == kept["processed_at"]
        assert "too long" in now["last_error"] and now["attempts"] == 1 and now["last_attempt_at"] is not None
    assert rows["T-3"]["error"] and rows["T-3"]["model_version"] == narrow  # nothing to keep: the error is the row

    # Recorded once, not retried: an unchanged rerun writes nothing.
    version = delta_version(spark, "summaries_errors")
    assert run_summarize(spark, failing).rows_pending == 0
    assert delta_version(spark, "summaries_errors") == version

    # Back on the working version, T-3 gets text: it is answered, and the others' kept answers
    # are current again without being regenerated.
    spark.sql("UPDATE tickets_errors SET body = 'My earbuds will not pair.' WHERE ticket_id = 'T-3'")
    fixed = run_summarize(spark, config_for(source, "summaries_errors", f"models:/{name}@champion", max_attempts=2))
    rows = one_row_per_ticket(spark, "summaries_errors")
    assert fixed.rows_pending == 1 and rows["T-3"]["error"] is None and rows["T-3"]["response"]
    assert rows["T-3"]["last_error"] is None


def test_errors_a_retry_cannot_change_are_recorded_once_and_others_retried_up_to_max_attempts(spark,
                                                                                            registered_tiny):
    name, _ = registered_tiny
    source = make_source(spark, "tickets_retry")
    # Two new tokens cannot hold the JSON object: every greedy answer is cut off, and comes out
    # the same on every retry. T-3 has no text.
    config = config_for(source, "summaries_retry", f"models:/{name}@champion", max_attempts=2,
                        schema="order_id STRING", max_new_tokens=2)
    first = run_summarize(spark, config)
    assert (first.rows_pending, first.errors, first.retried, first.given_up) == (6, 6, 0, 6)
    rows = one_row_per_ticket(spark, "summaries_retry")
    assert rows["T-3"]["last_error"].startswith("input is null")
    assert all(rows[t]["last_error"].startswith("answer is not complete JSON") for t in rows if t != "T-3")
    assert {row["last_error_retryable"] for row in rows.values()} == {False}
    version = delta_version(spark, "summaries_retry")
    assert run_summarize(spark, config).rows_pending == 0
    assert delta_version(spark, "summaries_retry") == version

    # Failures a retry may change (an out-of-memory row, a sampled answer) are what is left where
    # their engine flagged them so: those are retried until max_attempts.
    spark.sql("UPDATE summaries_retry SET last_error_retryable = true WHERE ticket_id != 'T-3'")
    second = run_summarize(spark, config)
    assert (second.rows_pending, second.retried, second.recovered, second.given_up) == (5, 5, 0, 5)
    assert run_summarize(spark, config).rows_pending == 0


def test_a_target_written_before_fingerprints_is_upgraded_in_place(spark, registered_tiny):
    name, _ = registered_tiny
    source = make_source(spark, "tickets_upgrade")
    config = config_for(source, "summaries_upgrade", f"models:/{name}@champion", max_attempts=1)
    run_summarize(spark, config)
    old_columns = [c for c in spark.read.table("summaries_upgrade").columns
                   if c not in ("request_fingerprint", "input_hash", "attempt_key", "attempts", "last_error",
                                "last_attempt_at", "last_error_retryable", "retryable")]
    spark.read.table("summaries_upgrade").select(*old_columns).write.format("delta").mode("overwrite") \
        .option("overwriteSchema", "true").saveAsTable("summaries_upgrade")

    report = run_summarize(spark, config)
    assert report.rows_pending == 6  # no fingerprints yet: summarized once more
    rows = one_row_per_ticket(spark, "summaries_upgrade")
    assert len(rows) == 6 and all(row["request_fingerprint"] for row in rows.values())
    assert run_summarize(spark, config).rows_pending == 0
