"""A summarize run's durable staging, in Delta tables beside its target.

``<target>__pending`` holds the run's fixed set of tickets, written once from one read of the
source and one of the target, then laid out in chunks: ranges of the id, one Delta partition
each, so reading a chunk reads only its own files. ``<target>__staged`` holds each chunk's
results, appended chunk by chunk, so a chunk is generated once even when its MERGE has to be
retried. Both are dropped when the run ends. Nothing is held in executor memory: a lost
executor makes Spark retry tasks, never lose rows.

Chunks are id ranges, not hash buckets, because the MERGE of a chunk can then name its range:
Delta skips every target file whose id statistics lie outside it (the target is written chunk
by chunk, so its files hold narrow id ranges too).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F

CHUNK_COL = "_chunk"
COPIES_COL = "_copies"
# The chunk of the (at most one) row that gathers every source row with a null id: counted and
# reported, never generated.
NULL_ID_CHUNK = -1


@dataclass(frozen=True)
class Chunk:
    """One chunk of pending tickets: its number, its row count and its id range (inclusive)."""

    number: int
    rows: int
    first_id: Any
    last_id: Any

    def id_range(self, column: Column) -> Column:
        """True for ids of this chunk's range: the predicate that lets Delta skip other files."""
        return column.between(F.lit(self.first_id), F.lit(self.last_id))


@dataclass(frozen=True)
class PendingSet:
    """What a run has to do: its chunks, and what the source held that cannot be processed."""

    table: str
    chunks: list[Chunk]
    null_id_rows: int
    duplicate_id_rows: int

    @property
    def rows(self) -> int:
        return sum(chunk.rows for chunk in self.chunks)


def staging_table(target: str, role: str) -> str:
    """The staging table for ``role`` ("pending" or "staged") of ``target``, in its schema."""
    return f"{target}__{role}"


def one_row_per_id(tickets: DataFrame, id_col: str) -> DataFrame:
    """``tickets`` with one row per id and how many source rows it stands for; every null id in
    one row of its own, marked as such. Of rows that share an id, the greatest (by their other
    columns, in order) is kept: the same row on every run, so an unchanged source stays done."""
    others = [name for name in tickets.columns if name != id_col]
    grouped = tickets.groupBy(id_col).agg(F.max(F.struct(*others)).alias("_kept"), F.count(F.lit(1)).alias(COPIES_COL))
    return grouped.select(id_col, "_kept.*", COPIES_COL,
                          F.when(F.col(id_col).isNull(), NULL_ID_CHUNK).otherwise(0).alias(CHUNK_COL))


def stage_pending(pending: DataFrame, target: str) -> str:
    """Write ``pending`` (rows of ``one_row_per_id``) as the run's pending table, in one Spark job:
    the only read of the source and of the target in a run."""
    return _write(pending, staging_table(target, "pending"), "overwrite", partitioned=True)


def plan_chunks(spark: SparkSession, pending_table: str, id_col: str, chunk_rows: int, max_rows: int = 0) -> PendingSet:
    """Lay the pending table out in id-range chunks of about ``chunk_rows`` rows (at most
    ``max_rows`` rows in all when it is above 0) and describe them. Reads only the pending table:
    its counts, then, when there is more than one chunk, one rewrite by id range."""
    pending = spark.read.table(pending_table)
    counts = pending.agg(
        F.sum(F.when(F.col(CHUNK_COL) >= 0, 1).otherwise(0)).alias("rows"),
        F.sum(F.when(F.col(CHUNK_COL) == NULL_ID_CHUNK, F.col(COPIES_COL)).otherwise(0)).alias("null_ids"),
        F.sum(F.when(F.col(CHUNK_COL) >= 0, F.col(COPIES_COL) - 1).otherwise(0)).alias("duplicates"),
    ).first()
    rows = int(counts["rows"] or 0)
    wanted = min(rows, max_rows) if max_rows > 0 else rows
    chunks = math.ceil(wanted / max(1, chunk_rows))
    if chunks > 1 or wanted < rows:
        keyed = pending.where(F.col(CHUNK_COL) >= 0).drop(CHUNK_COL)
        if wanted < rows:
            keyed = keyed.limit(wanted)
        # A range partitioner samples the ids to cut them into ranges of about equal size; each
        # range becomes a chunk, written as a Delta partition of its own. Delta reads the
        # table's snapshot before it commits the overwrite, so the table can be its own input.
        ranged = keyed.repartitionByRange(max(1, chunks), F.col(id_col)).withColumn(CHUNK_COL, F.spark_partition_id())
        _write(ranged.unionByName(pending.where(F.col(CHUNK_COL) == NULL_ID_CHUNK)), pending_table, "overwrite",
               partitioned=True)
    bounds = spark.read.table(pending_table).where(F.col(CHUNK_COL) >= 0).groupBy(CHUNK_COL).agg(
        F.count(F.lit(1)).alias("rows"), F.min(id_col).alias("first"), F.max(id_col).alias("last"),
    ).orderBy(CHUNK_COL).collect()
    # Range partitions are numbered in id order; one the sampling left empty has no row here.
    plan = [Chunk(row[CHUNK_COL], row["rows"], row["first"], row["last"]) for row in bounds]
    return PendingSet(pending_table, plan, int(counts["null_ids"] or 0), int(counts["duplicates"] or 0))


def read_chunk(spark: SparkSession, pending: PendingSet, chunk: Chunk) -> DataFrame:
    """The pending tickets of ``chunk``: only its partition's files are read."""
    return spark.read.table(pending.table).where(F.col(CHUNK_COL) == chunk.number).drop(CHUNK_COL, COPIES_COL)


def stage_results(spark: SparkSession, results: DataFrame, target: str, chunk: Chunk, first: bool) -> DataFrame:
    """Generate ``results`` into the staged table (replaced by a run's ``first`` chunk, appended
    to after that) as ``chunk``'s own files, and return
    them read back from Delta: the MERGE may read its source more than once and may be retried,
    and must never run the model again."""
    table = staging_table(target, "staged")
    _write(results.withColumn(CHUNK_COL, F.lit(chunk.number)), table, "overwrite" if first else "append",
           partitioned=False)
    return spark.read.table(table).where(F.col(CHUNK_COL) == chunk.number).drop(CHUNK_COL)


def drop_staging(spark: SparkSession, target: str) -> None:
    for role in ("pending", "staged"):
        spark.sql(f"DROP TABLE IF EXISTS {staging_table(target, role)}")


def _write(df: DataFrame, table: str, mode: str, partitioned: bool) -> str:
    writer = df.write.format("delta").mode(mode).option("overwriteSchema", "true")
    if partitioned:
        writer = writer.partitionBy(CHUNK_COL)
    writer.saveAsTable(table)
    return table
