"""A summarize run's durable staging, in Delta tables beside its target.

``<target>__pending`` holds the run's fixed set of tickets, written once from one read of the
source and one of the target, then laid out in chunks: ranges of the id, one Delta partition
each, so reading a chunk reads only its own files. ``<target>__staged`` holds the results of
the chunk being merged, so a chunk is generated once even when its MERGE has to be retried.
Both are dropped when the run ends, however it ends. Nothing is held in executor memory: a lost
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
from pyspark.sql.types import ByteType, DateType, DecimalType, IntegerType, LongType, ShortType, StringType

CHUNK_COL = "_chunk"
COPIES_COL = "_copies"
# The chunk of the (at most one) row that gathers every source row with a null id: counted and
# reported, never generated.
NULL_ID_CHUNK = -1


# Id types whose values come back from Spark to Python and go back as literals unchanged. A
# timestamp would pass through the Python process's local time zone, and a range built from it
# could miss a row: chunks of such ids MERGE without a range (Delta then reads every file).
RANGE_TYPES = (StringType, ByteType, ShortType, IntegerType, LongType, DateType, DecimalType)


@dataclass(frozen=True)
class Chunk:
    """One chunk of pending tickets: its number, its row count and its id range (inclusive;
    None when the id's type cannot carry one, see RANGE_TYPES)."""

    number: int
    rows: int
    first_id: Any = None
    last_id: Any = None

    def id_range(self, column: Column) -> Column | None:
        """True for ids of this chunk's range: the predicate that lets Delta skip other files."""
        if self.first_id is None:
            return None
        return column.between(F.lit(self.first_id), F.lit(self.last_id))


@dataclass(frozen=True)
class PendingSet:
    """What a run has to do: its chunks, and what the source held that cannot be processed."""

    table: str
    chunks: list[Chunk]
    null_id_rows: int
    duplicate_id_rows: int
    left_rows: int = 0  # pending tickets over the run's cap, left for the next run

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


def plan_chunks(spark: SparkSession, pending_table: str, id_col: str, chunk_rows: int,
                max_rows: int | None = None) -> PendingSet:
    """Lay the pending table out in id-range chunks of about ``chunk_rows`` rows (at most
    ``max_rows`` rows in all unless it is None: those of lowest id) and describe them. Reads only the pending table:
    once for its counts and id ranges, and, when there is more than one chunk, once more to
    rewrite it by id range and once to read the new ranges."""
    pending = spark.read.table(pending_table)
    layout = _layout(pending, id_col)
    null_ids = sum(part["copies"] for part in layout if part[CHUNK_COL] == NULL_ID_CHUNK)
    keyed = [part for part in layout if part[CHUNK_COL] >= 0]
    rows = sum(part["rows"] for part in keyed)
    duplicates = sum(part["copies"] - part["rows"] for part in keyed)
    wanted = rows if max_rows is None else min(rows, max_rows)
    chunks = math.ceil(wanted / max(1, chunk_rows))
    if chunks > 1 or wanted < rows:
        taken = pending.where(F.col(CHUNK_COL) >= 0).drop(CHUNK_COL)
        if wanted < rows:
            taken = first_rows(taken, id_col, wanted)
        # A range partitioner samples the ids to cut them into ranges of about equal size; each
        # range becomes a chunk, written as a Delta partition of its own. Delta reads the
        # table's snapshot before it commits the overwrite, so the table can be its own input.
        ranged = taken.repartitionByRange(max(1, chunks), F.col(id_col)).withColumn(CHUNK_COL, F.spark_partition_id())
        _write(ranged.unionByName(pending.where(F.col(CHUNK_COL) == NULL_ID_CHUNK)), pending_table, "overwrite",
               partitioned=True)
        keyed = [part for part in _layout(spark.read.table(pending_table), id_col) if part[CHUNK_COL] >= 0]
    ranged_ids = isinstance(pending.schema[id_col].dataType, RANGE_TYPES)
    # Range partitions are numbered in id order; one the sampling left empty has no row here.
    plan = [Chunk(part[CHUNK_COL], part["rows"], *((part["first"], part["last"]) if ranged_ids else ()))
            for part in keyed]
    return PendingSet(pending_table, plan, null_ids, duplicates, rows - wanted)


def first_rows(tickets: DataFrame, id_col: str, count: int) -> DataFrame:
    """The ``count`` tickets of lowest id: the ones a capped run takes, the same every time, so
    a dry run counts exactly the rows the run will take."""
    return tickets.orderBy(id_col).limit(count)


def _layout(pending: DataFrame, id_col: str) -> list:
    """Per stored chunk of ``pending`` (in order): rows, source rows they stand for, first and
    last id."""
    return pending.groupBy(CHUNK_COL).agg(
        F.count(F.lit(1)).alias("rows"), F.sum(COPIES_COL).alias("copies"),
        F.min(id_col).alias("first"), F.max(id_col).alias("last"),
    ).orderBy(CHUNK_COL).collect()


def read_chunk(spark: SparkSession, pending: PendingSet, chunk: Chunk) -> DataFrame:
    """The pending tickets of ``chunk``: only its partition's files are read."""
    return spark.read.table(pending.table).where(F.col(CHUNK_COL) == chunk.number).drop(CHUNK_COL, COPIES_COL)


def stage_results(spark: SparkSession, results: DataFrame, target: str) -> DataFrame:
    """Generate ``results`` into the staged table, replacing the previous chunk's, and return
    them read back from Delta: the MERGE may read its source more than once and may be retried,
    and must never run the model again."""
    table = _write(results, staging_table(target, "staged"), "overwrite", partitioned=False)
    return spark.read.table(table)


def drop_staging(spark: SparkSession, target: str) -> None:
    """Drop the run's staging tables of ``target`` (pending and staged), if they exist."""
    for role in ("pending", "staged"):
        spark.sql(f"DROP TABLE IF EXISTS {staging_table(target, role)}")


def _write(df: DataFrame, table: str, mode: str, partitioned: bool) -> str:
    writer = df.write.format("delta").mode(mode).option("overwriteSchema", "true")
    if partitioned:
        writer = writer.partitionBy(CHUNK_COL)
    writer.saveAsTable(table)
    return table
