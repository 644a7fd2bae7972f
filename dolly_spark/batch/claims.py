"""One writing run per target table at a time, by a claim recorded in Delta.

Two summarize runs on one target would stage into the same tables and MERGE the same tickets.
So a run first claims its target: it MERGEs its row into ``<target>__claim``, a table that holds
at most one row (the claim on that target, however the target's name was spelled). Delta's
optimistic concurrency makes that atomic across drivers and machines: when two runs claim at
once, both MERGEs read the (empty) claim table, and whichever commits second fails with a
concurrent-append conflict. The loser reads the claim and fails fast with ``TargetBusyError``,
naming the run that holds it.

A run refreshes its claim's heartbeat as it works and deletes the claim when it ends, however it
ends. A driver killed outright leaves its claim behind; a claim whose heartbeat is older than
``stale_after`` is taken over by the next run. So a claim confirmed (claimed, or its heartbeat
written) less than a quarter of ``stale_after`` ago is still this run's: within that time the
run neither writes a heartbeat nor reads the claim back, which spares a short run four Delta
commits and reads, and leaves a margin of three quarters of ``stale_after`` for the drivers'
clocks to disagree.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import time
import uuid
from dataclasses import dataclass
from datetime import timedelta

from pyspark.sql import SparkSession
from pyspark.sql import functions as F

log = logging.getLogger(__name__)

CLAIM_SCHEMA = "target STRING, claim_id STRING, owner STRING, claimed_at TIMESTAMP, heartbeat_at TIMESTAMP"


class TargetBusyError(RuntimeError):
    """Another run holds the claim on the target table."""


def _conflicts() -> tuple[type[Exception], ...]:
    """Delta's transaction conflicts: another transaction committed first."""
    from delta import exceptions

    return tuple(getattr(exceptions, name) for name in exceptions.__all__)


def claim_table(target: str) -> str:
    """The Delta table that holds the claim on ``target``: ``<target>__claim``."""
    return f"{target}__claim"


@dataclass
class Claim:
    """This run's claim on ``target``; ``owner`` says who holds it, for the other runs' errors."""

    spark: SparkSession
    target: str
    claim_id: str
    owner: dict
    stale_after: timedelta
    # When (time.monotonic) the claim was last known to be this run's, from before the statement
    # that claimed it or wrote its heartbeat: the stored heartbeat is at least that recent.
    confirmed_at: float = float("-inf")

    def recently_confirmed(self) -> bool:
        """True while no other run can have taken the claim over (see the module's docstring)."""
        return time.monotonic() - self.confirmed_at < self.stale_after.total_seconds() / 4

    def heartbeat(self) -> None:
        """Tell other runs this one is alive, unless the claim was recently confirmed. Raises
        TargetBusyError when the claim was taken over (this run stalled past the stale limit):
        two writers must never go on together."""
        if self.recently_confirmed():
            return
        started = time.monotonic()
        try:
            # The UPDATE's commit says whether the row is still this run's: it touched one row.
            touched = self.spark.sql(f"UPDATE {claim_table(self.target)} SET heartbeat_at = current_timestamp() "
                                     f"WHERE claim_id = '{self.claim_id}'").first()["num_affected_rows"]
            if touched == 1:
                self.confirmed_at = started
                return
        except _conflicts() as exc:  # another run's claim attempt committed first: who holds it now?
            log.info("the heartbeat on %s met another run's claim: %s", self.target, str(exc).splitlines()[0])
        if not self.held():
            raise TargetBusyError(f"this run's claim on target table {self.target!r} is gone (it stalled for "
                                  f"over {_words(self.stale_after)}): "
                                  f"{describe_holder(self.spark, self.target, self.stale_after)}")

    def held(self) -> bool:
        """True while the claim is still this run's."""
        if self.recently_confirmed():
            return True
        holder = _holder(self.spark, self.target)
        return holder is not None and holder["claim_id"] == self.claim_id

    def release(self) -> None:
        """Delete this run's claim, so the next run on the target starts at once."""
        from delta.tables import DeltaTable

        DeltaTable.forName(self.spark, claim_table(self.target)).delete(F.col("claim_id") == self.claim_id)


def acquire(spark: SparkSession, target: str, owner: dict, stale_after: timedelta) -> Claim:
    """Claim ``target`` for this run, or raise TargetBusyError naming the run that holds it.
    ``owner`` (JSON-serializable) describes this run to others: its MLflow run, host, process."""
    from delta.tables import DeltaTable

    table = claim_table(target)
    _create(spark, table)
    claim = Claim(spark, target, uuid.uuid4().hex, {**owner, "host": socket.gethostname(), "pid": os.getpid()},
                  stale_after)
    mine = spark.range(1).select(F.lit(target).alias("target"), F.lit(claim.claim_id).alias("claim_id"),
                                 F.lit(json.dumps(claim.owner, sort_keys=True)).alias("owner"),
                                 F.current_timestamp().alias("claimed_at"), F.current_timestamp().alias("heartbeat_at"))
    # Its holder stopped without releasing it: no heartbeat for longer than stale_after.
    stale = F.col("c.heartbeat_at") < F.current_timestamp() - F.expr(f"INTERVAL {int(stale_after.total_seconds())} SECONDS")
    started = time.monotonic()
    try:
        written = (
            # The table holds at most one row, the claim: any row there is the one to match.
            DeltaTable.forName(spark, table).alias("c")
            .merge(mine.alias("n"), F.lit(True))
            .whenMatchedUpdateAll(condition=stale)
            .whenNotMatchedInsertAll()
            .execute()
        ).first()
        # A committed MERGE that wrote this run's row holds the claim; one that wrote nothing met
        # a live claim of another run.
        if written["num_inserted_rows"] + written["num_updated_rows"] == 1:
            claim.confirmed_at = started
            return claim
    except _conflicts() as exc:
        log.info("claiming %s conflicted with another run's claim: %s", target, str(exc).splitlines()[0])
    if not claim.held():
        raise TargetBusyError(f"another summarize run is writing target table {target!r}: "
                              f"{describe_holder(spark, target, stale_after)}")
    return claim


def _create(spark: SparkSession, table: str) -> None:
    try:
        # Partitioned by claim: a run releases its claim by dropping its partition's file from
        # the log, with no scan or rewrite (about half the time of a DELETE that reads the row).
        # A table created unpartitioned by an earlier version works the same, only slower.
        spark.sql(f"CREATE TABLE IF NOT EXISTS {table} ({CLAIM_SCHEMA}) USING delta PARTITIONED BY (claim_id)")
    except Exception:  # noqa: BLE001 - py4j wraps Delta's and the catalog's exceptions
        # Two runs creating it at once: one of them fails (a protocol change or "already
        # exists"), and the table is there for both.
        if not spark.catalog.tableExists(table):
            raise


def _holder(spark: SparkSession, target: str):
    return spark.read.table(claim_table(target)).first()


def describe_holder(spark: SparkSession, target: str, stale_after: timedelta) -> str:
    """Who holds ``target``'s claim and since when, and what to do about it, in words."""
    holder = _holder(spark, target)
    if holder is None:
        return "no run holds it now; run again"
    owner = json.loads(holder["owner"])
    who = ", ".join(f"{key} {value}" for key, value in owner.items())
    advice = (f"wait for it to finish; if it died, its claim expires {_words(stale_after)} after its last "
              f"heartbeat, or remove it with DELETE FROM {claim_table(target)}")
    return (f"{who} (claimed {holder['claimed_at']:%Y-%m-%d %H:%M:%S}, last heartbeat "
            f"{holder['heartbeat_at']:%Y-%m-%d %H:%M:%S}); {advice}")


def _words(delta: timedelta) -> str:
    minutes = delta.total_seconds() / 60
    return f"{minutes:g} minutes"
