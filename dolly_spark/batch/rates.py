"""The measured rate a summarize run's time is estimated with, and the row cap of ``max_hours``.

A rate is per task slot (a GPU, or an executor core on CPU executors): the seconds one slot
spends on a row, generating in batches, apart from a run's fixed seconds (model loads, selecting
and staging the pending tickets, the MERGEs). A run on more slots divides the generating time,
not the fixed one, so a cluster that grew or shrank still finds its history.

It comes from the last real run of the same request (its fingerprint) answered by the engine
that will run now (the run's ``engines_used``, never "auto") on the same kind of slot, or else
from a calibration that loads the model and generates one full micro-batch per task slot.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass

import mlflow
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dolly_spark.batch import staging
from dolly_spark.inference.engines import AUTO, EngineConfig
from dolly_spark.request import Request
from dolly_spark.spark.apply import apply_request
from dolly_spark.spark.sessions import generation_parallelism, has_gpu_executors

log = logging.getLogger(__name__)

# The job tag of a real run: the only runs whose rates an estimate uses.
RUN_JOB = "summarize_tickets"


@dataclass
class Rate:
    """Seconds one task slot spends per row, completion tokens per row, the fixed seconds a run
    adds whatever its size, where they were measured, the engine that answered there, and the
    seconds spent generating to measure it (a calibration's; 0 from history)."""

    slot_seconds_per_row: float
    completion_tokens_per_row: float
    source: str
    fixed_seconds: float = 0.0
    engine: str = ""
    calibration_seconds: float = 0.0

    def seconds(self, rows: int, slots: int) -> float:
        """The time of ``rows`` on ``slots`` task slots (never more slots than rows at work)."""
        if rows <= 0:
            return 0.0
        return self.fixed_seconds + rows * self.slot_seconds_per_row / max(1, min(slots, rows))

    def rows_within(self, seconds: float, slots: int) -> int:
        """The most rows that ``slots`` task slots finish in ``seconds``, fixed seconds included."""
        return max(0, math.floor((seconds - self.fixed_seconds) * max(1, slots) / self.slot_seconds_per_row))


def slot_kind(spark: SparkSession) -> str:
    """What one task slot is here: "GPU" on GPU executors, else "CPU-core"."""
    return "GPU" if has_gpu_executors(spark) else "CPU-core"


def working_slots(spark: SparkSession, config) -> int:
    """The task slots a run of ``config`` generates on at once: Spark's (see
    ``generation_parallelism``), fewer when ``config.partitions`` asks for fewer tasks."""
    slots = generation_parallelism(spark)
    return min(config.partitions, slots) if config.partitions > 0 else slots


def engine_that_runs(spark: SparkSession, engine: EngineConfig) -> str:
    """The engine rows will be answered by: the one named, or what "auto" resolves to on an
    executor (whose GPUs and packages the driver may not share), asked in one small task that
    loads no model."""
    if engine.engine != AUTO:
        return engine.engine

    @F.udf("string")
    def resolved(_):
        from dolly_spark.inference.engines import resolve_engine

        return resolve_engine(AUTO)

    return spark.range(1).select(resolved("id")).first()[0]


def history_rate(request: Request, engine_name: str, kind: str) -> Rate | None:
    """The rate of the last real run of this request that ``engine_name`` answered alone, on
    task slots of ``kind``, that wrote rows and measured its generating time; None when none."""
    # Every experiment: the fingerprint names the request wherever its runs were logged (a
    # notebook's runs go to the notebook's experiment, a job's to its configured one).
    runs = mlflow.search_runs(
        search_all_experiments=True, max_results=1, order_by=["attributes.start_time DESC"], output_format="list",
        filter_string=(f"tags.job = '{RUN_JOB}' AND tags.slot_kind = '{kind}' AND tags.engines_used = '{engine_name}' "
                       f"AND params.request_fingerprint = '{request.fingerprint()}' AND metrics.rows_written > 0 "
                       "AND metrics.generate_slot_seconds > 0"))
    if not runs:
        return None
    metrics = runs[0].data.metrics
    rows = metrics["rows_written"]
    per_row = metrics["generate_slot_seconds"] / rows
    return Rate(per_row, metrics["generated_tokens"] / rows,
                f"MLflow run {runs[0].info.run_id} ({int(rows)} tickets by {engine_name} on "
                f"{int(metrics['task_slots'])} {kind} slots: {per_row:.3g} slot-seconds per ticket, plus "
                f"{metrics['fixed_seconds']:.1f}s of model loads, staging and MERGEs)",
                fixed_seconds=metrics["fixed_seconds"], engine=engine_name)


def load_models(spark: SparkSession, request: Request, engine: EngineConfig, config, slots: int) -> tuple[float, str]:
    """Load the model in the Python worker of each of ``slots`` task slots, generating nothing:
    one task per slot with one row whose input is null, which every engine refuses after
    loading. Returns the seconds it took and the engine that loaded (after any fallback)."""
    rows = spark.range(0, slots, 1, slots).select(F.col("id").cast("string").alias(config.id_col),
                                                  F.lit(None).cast("string").alias(config.text_col))
    started = time.perf_counter()
    answered = apply_request(rows, request, engine, input_col=config.text_col, key_col=config.id_col,
                             output_col="_result", arrow_batch_size=config.arrow_batch_size)
    engines = sorted({row[0] for row in answered.select("_result.engine").collect()})
    return time.perf_counter() - started, ",".join(engines)


def micro_batch_rows(engine: EngineConfig, config) -> int:
    """The most rows a task's engine runs together: ``max_batch_rows``, within one Arrow batch."""
    return min(engine.max_batch_rows, config.arrow_batch_size)


def calibration_rows(slots: int, engine: EngineConfig, config) -> int:
    """The rows of a calibration: a full micro-batch per task slot, at most
    ``config.calibrate_rows``, so that it measures a run's batched throughput, not one row at a
    time."""
    return min(config.calibrate_rows, slots * micro_batch_rows(engine, config))


def calibrate(spark: SparkSession, tickets: DataFrame, config, request: Request, engine: EngineConfig) -> Rate | None:
    """Load the model on every task slot (its fixed cost), then generate the first pending
    ``tickets`` in full micro-batches, one task per slot, and discard the answers; None when
    nothing is pending or ``config.calibrate_rows`` is 0."""
    slots = working_slots(spark, config)
    rows = calibration_rows(slots, engine, config)
    if rows <= 0:
        return None
    sample = staging.first_rows(tickets, config.id_col, rows).cache()
    count = sample.count()
    if not count:
        sample.unpersist()
        return None
    load_seconds, loaded = load_models(spark, request, engine, config, slots)
    tasks = max(1, min(slots, count))
    started = time.perf_counter()
    results = apply_request(sample.repartition(tasks), request, engine, input_col=config.text_col,
                            key_col=config.id_col, output_col="_result", arrow_batch_size=config.arrow_batch_size)
    totals = results.agg(F.sum("_result.completion_tokens"), F.collect_set("_result.engine")).first()
    seconds = time.perf_counter() - started
    sample.unpersist()
    log.info("calibration: %d tickets generated in %.1fs on %d task slots after %.1fs of model loads (answers "
             "discarded)", count, seconds, tasks, load_seconds)
    per_task = math.ceil(count / tasks)
    why = "few tickets are pending" if count < rows else "calibrate_rows allows"
    short = "" if per_task >= micro_batch_rows(engine, config) else (
        f"; under a full micro-batch per task, as {why}: fuller batches may go faster")
    return Rate(seconds * tasks / count, (totals[0] or 0) / count,
                f"a calibration of {count} tickets ({per_task} per task on {tasks} {slot_kind(spark)} slots) in "
                f"{seconds:.1f}s, plus {load_seconds:.1f}s to load the model (a run's Delta work not included){short}",
                fixed_seconds=load_seconds, engine=",".join(sorted(totals[1] or [])) or loaded,
                calibration_seconds=seconds)


def measured_rate(spark: SparkSession, tickets: DataFrame, config, request: Request, engine: EngineConfig,
                  engine_name: str) -> Rate | None:
    """History first (runs answered by ``engine_name``), else a calibration (none when
    ``config.calibrate_rows`` is 0)."""
    rate = history_rate(request, engine_name, slot_kind(spark))
    if rate is None and config.calibrate_rows > 0:
        rate = calibrate(spark, tickets, config, request, engine)
    return rate


def row_cap(config, rate: Rate | None, pending_rows: int, slots: int) -> tuple[int | None, str]:
    """The most tickets a run takes under ``max_rows`` and ``max_hours`` (None: no cap), and the
    cap in words. With nothing pending there is nothing to cap, and no rate is needed."""
    caps = {}
    if pending_rows <= 0:
        return None, ""
    if config.max_rows > 0:
        caps[f"max_rows={config.max_rows}"] = config.max_rows
    if config.max_hours > 0:
        if rate is None:
            raise ValueError(f"max_hours={config.max_hours} needs a rate for the {pending_rows} pending tickets of "
                             f"{config.source_table}: MLflow holds no earlier run of this request answered by the "
                             "engine that runs now on this kind of task slot; set calibrate_rows above 0 to "
                             "measure one, or cap the run with max_rows")
        caps[f"max_hours={config.max_hours:.4g} at {rate.slot_seconds_per_row:.3g} slot-seconds per ticket on "
             f"{slots} slots"] = rate.rows_within(config.max_hours * 3600, slots)
    if not caps:
        return None, ""
    name = min(caps, key=caps.__getitem__)
    return caps[name], name
