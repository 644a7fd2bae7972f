"""Results that stay true: which tickets a run must (re)process, and how results MERGE.

Every result row carries the ``request_fingerprint`` of the request that produced it
(``Request.fingerprint``: model name and version, prompt format, instruction and every setting
that changes the answer)
and the ``input_hash`` of the ticket text it answered. A ticket is done when the target holds a
successful answer with the current fingerprint and input hash, or when the current request has
already failed on it ``max_attempts`` times, or once with an error that a retry cannot change
(the result's ``retryable`` is false: a refused input, a greedy answer cut off or empty, which
the same request on the same input meets again). So an edited ticket, a new instruction, a changed
setting or a new model version reprocess exactly the rows they affect, and an unchanged rerun
writes nothing.

An error never replaces an answer: when a ticket that has a successful answer fails again, the
answer stays and the failure is recorded beside it (``last_error``, ``attempts``,
``last_attempt_at``, ``attempt_key``: the fingerprint and input hash of the failed request, and
``last_error_retryable``).
"""
from __future__ import annotations

import logging

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

from dolly_spark.inference.engines import ENGINES
from dolly_spark.spark.udf import ADDED_RESULT_FIELDS

log = logging.getLogger(__name__)

# Columns this module adds to a target table, with their Spark SQL types.
TRACKING_COLUMNS = {
    "request_fingerprint": "STRING",
    "input_hash": "STRING",
    "attempt_key": "STRING",
    "attempts": "INT",
    "last_error": "STRING",
    "last_attempt_at": "TIMESTAMP",
    "last_error_retryable": "BOOLEAN",
}


def input_hash(text: Column) -> Column:
    """The SHA-256 of a ticket's text (a null text hashes like the empty one)."""
    return F.sha2(F.coalesce(text, F.lit("")), 256)


def cannot_pass(error: Column, retryable: Column) -> Column:
    """True for a row error that a retry of the same request on the same input cannot change (its
    engine said so: ``InstructionResult.retryable``); an error recorded before that flag existed
    is retried."""
    return error.isNotNull() & F.coalesce(~retryable, F.lit(False))


def attempt_key(fingerprint: Column, hashed_input: Column) -> Column:
    """One request on one input: what ``attempts`` are counted against."""
    return F.sha2(F.concat_ws("|", fingerprint, hashed_input), 256)


def upgrade_target(spark: SparkSession, target: str) -> list[str]:
    """Add the tracking columns a target table written before them lacks (Delta schema
    evolution: existing rows keep everything and read null there); return the added names."""
    existing = set(spark.read.table(target).columns)
    missing = [name for name in TRACKING_COLUMNS if name not in existing]
    if missing:
        columns = ", ".join(f"`{name}` {TRACKING_COLUMNS[name]}" for name in missing)
        spark.sql(f"ALTER TABLE {target} ADD COLUMNS ({columns})")
    return missing


def pending(tickets: DataFrame, target: DataFrame | None, id_col: str, fingerprint: str,
            max_attempts: int) -> DataFrame:
    """``tickets`` (with ``input_hash``) that still need the current request: no successful
    answer with this fingerprint and input hash, fewer than ``max_attempts`` failures of it, and
    no failure of it that only a change of input or request can mend."""
    if target is None:
        return tickets
    current_key = attempt_key(F.lit(fingerprint), F.col("s.input_hash"))
    answered = ((F.col("t.request_fingerprint") == fingerprint) & (F.col("t.input_hash") == F.col("s.input_hash"))
                & F.col("t.error").isNull())
    given_up = (F.col("t.attempt_key") == current_key) & (
        (F.col("t.attempts") >= max_attempts) | cannot_pass(F.col("t.last_error"), F.col("t.last_error_retryable")))
    done_condition = (F.col(f"s.{id_col}") == F.col(f"t.{id_col}")) & (answered | given_up)
    return tickets.alias("s").join(target.alias("t"), done_condition, "left_anti")


# Why a ticket is pending, in the order they are told apart.
PENDING_REASONS = ("new", "retry", "edited input", "new request")


def with_reasons(pending_tickets: DataFrame, target: DataFrame | None, id_col: str, fingerprint: str) -> DataFrame:
    """``pending_tickets`` (rows of ``pending``) with ``reason``, one of PENDING_REASONS: no row
    in the target (new); the current request failed on this input before (retry); the input
    changed since the target's row (edited input); else the request did (a new model version,
    instruction or setting)."""
    if target is None:
        return pending_tickets.withColumn("reason", F.lit("new"))
    previous = target.select(F.col(id_col).alias("_id"), F.col("input_hash").alias("_hash"),
                             F.col("attempt_key").alias("_key"))
    joined = pending_tickets.join(previous, F.col(id_col) == F.col("_id"), "left")
    reason = (F.when(F.col("_id").isNull(), "new")
              .when(F.col("_key") == attempt_key(F.lit(fingerprint), F.col("input_hash")), "retry")
              .when(F.col("_hash") != F.col("input_hash"), "edited input")
              .otherwise("new request"))
    return joined.select(*pending_tickets.columns, reason.alias("reason"))


def merge_results(spark: SparkSession, staged: DataFrame, target: str, id_col: str,
                  target_range: Column | None = None) -> None:
    """MERGE ``staged`` results (result columns, ``processed_at``, ``request_fingerprint``,
    ``input_hash``, ``attempt_key``) into ``target`` by ``id_col``; errors never replace answers.
    ``target_range``, a predicate on the target's columns (aliased ``t``) that every staged id
    satisfies, lets Delta skip the target files outside it."""
    from delta.tables import DeltaTable

    if not spark.catalog.tableExists(target):
        with_tracking(staged).limit(0).write.format("delta").saveAsTable(target)
    _add_new_result_fields(spark, staged, target)
    attempts = "CASE WHEN t.attempt_key = s.attempt_key AND t.attempts IS NOT NULL THEN t.attempts + 1 ELSE 1 END"
    attempt = {"attempts": attempts, "last_attempt_at": "s.processed_at", "attempt_key": "s.attempt_key"}
    everything = {name: f"s.`{name}`" for name in staged.columns if name not in attempt}
    succeeded = {"last_error": "NULL", "last_error_retryable": "NULL"}
    failed = {"last_error": "s.error", "last_error_retryable": "s.retryable"}
    quoted = lambda assignments: {f"`{name}`": value for name, value in assignments.items()}  # noqa: E731
    same_id = F.col(f"t.`{id_col}`").eqNullSafe(F.col(f"s.`{id_col}`"))
    (
        DeltaTable.forName(spark, target).alias("t")
        .merge(staged.alias("s"), same_id if target_range is None else target_range & same_id)
        # A success replaces whatever was there.
        .whenMatchedUpdate("s.error IS NULL", quoted({**everything, **attempt, **succeeded}))
        # A failure beside a good answer: the answer stays, the failure is recorded.
        .whenMatchedUpdate("t.error IS NULL AND t.response IS NOT NULL", quoted({**attempt, **failed}))
        # A failure where there is no answer to keep.
        .whenMatchedUpdate(set=quoted({**everything, **attempt, **failed}))
        .whenNotMatchedInsert(values=quoted({**everything, **attempt, "attempts": "1", **failed}))
        .execute()
    )


def _add_new_result_fields(spark: SparkSession, staged: DataFrame, target: str) -> None:
    """Add to ``target`` the result fields it was written without (``ADDED_RESULT_FIELDS``), so
    the MERGE can set them; its earlier rows hold null there."""
    have = set(spark.read.table(target).columns)
    added = [field for field in staged.schema.fields if field.name in ADDED_RESULT_FIELDS and field.name not in have]
    if added:
        columns = ", ".join(f"`{field.name}` {field.dataType.simpleString()}" for field in added)
        spark.sql(f"ALTER TABLE {target} ADD COLUMNS ({columns})")
        log.info("target table %s gained the result columns %s", target, [field.name for field in added])


def with_tracking(staged: DataFrame) -> DataFrame:
    """``staged`` with the tracking columns it does not carry itself, typed, for creating a target."""
    extra = [F.lit(None).cast(TRACKING_COLUMNS[name]).alias(name)
             for name in TRACKING_COLUMNS if name not in staged.columns]
    return staged.select("*", *extra)


def chunk_totals(staged: DataFrame, target: DataFrame | None, id_col: str, max_attempts: int) -> dict[str, int]:
    """What a chunk about to be merged holds, in one Spark job: rows, errors, prompt and completion
    tokens, rows answered by each engine (``rows_engine_<name>``); how many rows retry a failed
    request (``retried``), how many of those now succeed (``recovered``), and how many failures
    reach ``max_attempts`` with this one or cannot pass on a retry (``given_up``)."""
    if target is None:
        joined = staged.select("*", F.lit(None).cast("string").alias("prev_key"),
                               F.lit(None).cast("int").alias("prev_attempts"), F.lit(None).cast("string").alias("prev_error"))
    else:
        previous = target.select(id_col, F.col("attempt_key").alias("prev_key"),
                                 F.col("attempts").alias("prev_attempts"), F.col("last_error").alias("prev_error"))
        joined = staged.join(previous, id_col, "left")
    same_request = F.col("prev_key") == F.col("attempt_key")
    retry = same_request & F.col("prev_error").isNotNull()
    attempts_now = F.when(same_request, F.coalesce(F.col("prev_attempts"), F.lit(0)) + 1).otherwise(F.lit(1))
    totals = joined.agg(
        F.count(F.lit(1)).alias("rows"),
        F.count("error").alias("errors"),
        F.sum("prompt_tokens").alias("prompt_tokens"),
        F.sum("completion_tokens").alias("completion_tokens"),
        F.sum(F.when(retry, 1).otherwise(0)).alias("retried"),
        F.sum(F.when(retry & F.col("error").isNull(), 1).otherwise(0)).alias("recovered"),
        F.sum(F.when(F.col("error").isNotNull() & ((attempts_now >= max_attempts) | cannot_pass(F.col("error"), F.col("retryable"))), 1)
              .otherwise(0)).alias("given_up"),
        *[F.sum(F.when(F.col("engine") == name, 1).otherwise(0)).alias(f"rows_engine_{name}") for name in ENGINES],
    ).first()
    return {name: int(totals[name] or 0) for name in totals.asDict()}
