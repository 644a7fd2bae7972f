"""The ticket summarization job: incremental, idempotent, tracked, one pass at any size.

Reads a source Delta table of tickets, selects those without a current result in the target
table (see ``dolly_spark.batch.incremental``: a result is current when its request fingerprint and
input hash match the run's), generates in chunks, and MERGEs each chunk into the target keyed
by ticket id, never replacing an answer with an error. A rerun with nothing new generates
nothing; a crash loses at most the chunk in flight, and a rerun picks up exactly the tickets
still missing.

Each run reads the source and the target once, to stage its pending tickets in Delta, laid out
in chunks of id ranges (``dolly_spark.batch.staging``); each chunk then reads only its own staged
files and MERGEs with its id range, so Delta skips the target files of other chunks. Nothing is
held in executor memory: a lost executor makes Spark retry tasks, and a chunk's results are
generated once even when the MERGE has to be retried. A run claims its target first
(``dolly_spark.batch.claims``): a second run on the same target fails fast, naming the first.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field, replace
from datetime import timedelta

import mlflow
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dolly_spark.batch import claims, incremental, rates, staging
from dolly_spark.batch import estimate as estimation
from dolly_spark.batch.incremental import attempt_key, input_hash, merge_results
from dolly_spark.batch.progress import ChunkProgress
from dolly_spark.batch.summarize_config import SummarizeConfig
from dolly_spark.batch.targets import validate
from dolly_spark.inference.engines import ENGINES, EngineConfig
from dolly_spark.lifecycle.loader import stage_for_executors
from dolly_spark.request import Request
from dolly_spark.spark.apply import apply_request
from dolly_spark.spark.sessions import executor_kind, generation_parallelism
from dolly_spark.spark.tables import table_exists

log = logging.getLogger(__name__)


@dataclass
class SummarizeReport:
    model_name: str
    model_version: str
    rows_pending: int = 0
    rows_written: int = 0
    errors: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    skipped_null_ids: int = 0
    retried: int = 0
    recovered: int = 0
    given_up: int = 0
    chunks: int = 0
    rows_left: int = 0  # pending tickets over the run's cap, left for the next run
    wall_seconds: float = 0.0
    rows_by_engine: dict[str, int] = field(default_factory=dict)  # engine name -> rows it answered
    # Where the time went, for the rate a later estimate takes from this run (``batch.rates``):
    # generating (each chunk's seconds x the task slots at work), loading the model, and the
    # generating of a calibration for max_hours, which is no part of a run's rate or fixed costs.
    task_slots: int = 0
    generate_seconds: float = 0.0
    generate_slot_seconds: float = 0.0
    load_seconds: float = 0.0
    calibration_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_seconds if self.wall_seconds else 0.0


def current_target(spark: SparkSession, config: SummarizeConfig) -> DataFrame | None:
    """The target table as a run compares with it (with the tracking columns a target written
    before them lacks, read as null), or None before the first run."""
    if not table_exists(spark, config.target_table):
        return None
    return incremental.with_tracking(spark.read.table(config.target_table))


def pending_tickets(source: DataFrame, target: DataFrame | None, config: SummarizeConfig,
                    fingerprint: str) -> DataFrame:
    """One row per ticket id (with its ``input_hash``) that has no current result in ``target``,
    and one that counts the rows with a null id (see ``staging.one_row_per_id``)."""
    tickets = staging.one_row_per_id(
        source.select(config.id_col, config.text_col, input_hash(F.col(config.text_col)).alias("input_hash")),
        config.id_col)
    return incremental.pending(tickets, target, config.id_col, fingerprint, config.max_attempts)


def dry_run(spark: SparkSession, config: SummarizeConfig) -> estimation.Estimate:
    """What a run of ``config`` would do and cost (see ``batch.estimate``), logged to MLflow as
    a run of its own; the target is not written (no claim, no staging table, no MERGE).
    ``.as_dict()`` gives it as a dict, ``.table()`` as the console prints it."""
    source, request, engine = validate(spark, config)
    request = _for_executors(request, config)
    target = current_target(spark, config)
    pending = pending_tickets(source, target, config, request.fingerprint())
    estimate = estimation.build(spark, pending, target, config, request, engine)
    estimation.log_to_mlflow(estimate, config, request)
    return estimate


def _for_executors(request: Request, config: SummarizeConfig) -> Request:
    """``request`` as executors load it: with ``shared_model_dir``, from the files the driver
    downloads there, once per run (the fingerprint is unchanged: same name and version)."""
    if not config.shared_model_dir:
        return request
    return replace(request, model=stage_for_executors(request.model, config.shared_model_dir))


def run_summarize(spark: SparkSession, config: SummarizeConfig) -> SummarizeReport:
    """Run the job once; return what it did. Logs one MLflow run with its metrics, and per chunk
    its progress (``step`` = chunk). Raises TargetBusyError, naming the other run, when another
    run is writing the same target."""
    source, request, engine = validate(spark, config)
    spec = request.model
    report = SummarizeReport(spec.name, spec.version)
    fingerprint = request.fingerprint()
    request = _for_executors(request, config)
    started = time.perf_counter()
    with mlflow.start_run(run_name="summarize_tickets") as run:
        mlflow.log_params({**asdict(config), "model_version": spec.version, "model_name": spec.name,
                           "request_fingerprint": fingerprint})
        mlflow.set_tags({"job": rates.RUN_JOB, "resolved_model_uri": spec.uri,
                         "executor_kind": executor_kind(spark), "slot_kind": rates.slot_kind(spark)})
        claim = claims.acquire(spark, config.target_table, _owner(spark, run),
                               timedelta(minutes=config.claim_timeout_minutes))
        try:
            _summarize_pending(spark, source, config, request, engine, report, claim)
        finally:
            _end_claim(spark, claim)
        report.wall_seconds = time.perf_counter() - started
        mlflow.log_metrics({
            "rows_read": report.rows_pending,
            "rows_written": report.rows_written,
            "errors": report.errors,
            "prompt_tokens": report.prompt_tokens,
            "generated_tokens": report.generated_tokens,
            "tokens_per_second": report.tokens_per_second,
            "wall_seconds": report.wall_seconds,
            "skipped_null_ids": report.skipped_null_ids,
            "retried": report.retried,
            "recovered": report.recovered,
            "given_up": report.given_up,
            "chunks": report.chunks,
            "rows_left": report.rows_left,
            "task_slots": report.task_slots,
            "generate_seconds": report.generate_seconds,
            "generate_slot_seconds": report.generate_slot_seconds,
            "load_seconds": report.load_seconds,
            "calibration_seconds": report.calibration_seconds,
            # Model loads, selecting and staging the tickets, MERGEs, claims: what a run costs
            # whatever its size (its calibration's generating excluded).
            "fixed_seconds": report.wall_seconds - report.generate_seconds - report.calibration_seconds,
            **{f"rows_engine_{name}": rows for name, rows in report.rows_by_engine.items()},
        })
        mlflow.set_tag("engines_used", ",".join(sorted(name for name, rows in report.rows_by_engine.items() if rows)))
    return report


def _summarize_pending(spark: SparkSession, source: DataFrame, config: SummarizeConfig, request: Request,
                       engine: EngineConfig, report: SummarizeReport, claim: claims.Claim) -> None:
    if table_exists(spark, config.target_table):
        added = incremental.upgrade_target(spark, config.target_table)
        if added:
            log.info("added %s to %s; its rows are summarized again once", added, config.target_table)
    # Fix the set of tickets once, durably, from one read of the source and one of the target:
    # re-evaluating the anti-join per chunk would rescan both and could pick other rows (the
    # target changes as chunks are merged), and data held by an executor is gone with it.
    target = current_target(spark, config)
    pending_table = staging.stage_pending(pending_tickets(source, target, config, request.fingerprint()),
                                          config.target_table)
    cap, cap_text, rate = estimation.run_cap(spark, pending_table, target, config, request, engine)
    report.calibration_seconds = rate.calibration_seconds if rate is not None else 0.0
    pending = staging.plan_chunks(spark, pending_table, config.id_col, config.chunk_rows, cap)
    report.rows_pending, report.chunks, report.rows_left = pending.rows, len(pending.chunks), pending.left_rows
    report.skipped_null_ids = pending.null_id_rows
    if pending.left_rows:
        log.warning("%d of the %d pending tickets of %s are over the cap (%s): they stay pending for the next run",
                    pending.left_rows, pending.rows + pending.left_rows, config.source_table, cap_text)
    if pending.null_id_rows:
        log.warning("%d tickets in %s have a null %s and cannot be keyed; skipped",
                    pending.null_id_rows, config.source_table, config.id_col)
    if pending.duplicate_id_rows:
        log.warning("%d more rows of %s share the %s of a pending ticket; one row per id is processed",
                    pending.duplicate_id_rows, config.source_table, config.id_col)
    log.info("%d tickets of %s to summarize with %s version %s, in %d chunks", report.rows_pending,
             config.source_table, report.model_name, report.model_version, report.chunks)
    report.task_slots = rates.working_slots(spark, config)
    if report.rows_pending:
        # Before the first chunk, generating nothing: the chunks' time is then generating alone.
        report.load_seconds, _ = rates.load_models(spark, request, engine, config, report.task_slots)
    progress = ChunkProgress(report.rows_pending, report.chunks)
    for step, chunk in enumerate(pending.chunks):
        claim.heartbeat()
        # Asked per chunk: executors keep joining a cluster that is starting or scaling up.
        partitions = config.partitions or generation_parallelism(spark)
        tickets = staging.read_chunk(spark, pending, chunk).repartition(partitions)
        seconds = _summarize_chunk(spark, tickets, chunk, config, request, engine, report, claim)
        report.generate_seconds += seconds
        report.generate_slot_seconds += seconds * min(rates.working_slots(spark, config), chunk.rows)
        progress.chunk_done(step, chunk.rows, f"{report.errors} errors so far ({report.retried} retried, "
                                              f"{report.recovered} recovered, {report.given_up} given up)")


def _end_claim(spark: SparkSession, claim: claims.Claim) -> None:
    """However the run ended: drop its staging tables and release its claim, unless the claim
    was taken over (the staging tables are then another run's). Never hides the run's own error."""
    try:
        if claim.held():
            staging.drop_staging(spark, claim.target)
            claim.release()
    except Exception:  # noqa: BLE001 - the run's own outcome matters more; the claim goes stale
        log.exception("could not clean up after the run on %s; its claim expires after %s", claim.target,
                      claim.stale_after)


def _owner(spark: SparkSession, run) -> dict:
    """This run, as other runs' errors name it."""
    owner = {"mlflow_run_id": run.info.run_id}
    try:
        owner["spark_app_id"] = spark.sparkContext.applicationId
    except Exception:  # noqa: BLE001 - Spark Connect sessions have no SparkContext
        pass
    return owner


def _summarize_chunk(spark: SparkSession, tickets: DataFrame, chunk: staging.Chunk, config: SummarizeConfig,
                     request: Request, engine: EngineConfig, report: SummarizeReport, claim: claims.Claim) -> float:
    """Generate, stage and MERGE one chunk, adding its counts to ``report``; returns the seconds
    spent generating (and staging the results)."""
    results = apply_request(tickets, request, engine, input_col=config.text_col, key_col=config.id_col,
                            output_col="_result", arrow_batch_size=config.arrow_batch_size)
    fingerprint = request.fingerprint()
    flat = results.select(config.id_col, "_result.*", F.current_timestamp().alias("processed_at"),
                          F.lit(fingerprint).alias("request_fingerprint"), "input_hash",
                          attempt_key(F.lit(fingerprint), F.col("input_hash")).alias("attempt_key"))
    # Generate exactly once: the results land in Delta before the MERGE reads them (a MERGE may
    # read its source more than once, and may be retried after a lost executor).
    started = time.perf_counter()
    staged = staging.stage_results(spark, flat, config.target_table)
    generated = time.perf_counter() - started
    target = None
    if table_exists(spark, config.target_table):
        # Only the chunk's id range of the target: Delta skips the files of every other chunk.
        in_chunk = chunk.id_range(F.col(config.id_col))
        target = spark.read.table(config.target_table)
        target = target if in_chunk is None else target.where(in_chunk)
    # Counted before the MERGE: the outcomes compare each row with what the target held.
    totals = incremental.chunk_totals(staged, target, config.id_col, config.max_attempts)
    # Generating may have outlasted the claim's timeout: write only while it is still ours.
    claim.heartbeat()
    merge_results(spark, staged, config.target_table, config.id_col, chunk.id_range(F.col(f"t.`{config.id_col}`")))
    report.rows_written += totals["rows"]
    report.errors += totals["errors"]
    report.prompt_tokens += totals["prompt_tokens"]
    report.generated_tokens += totals["completion_tokens"]
    report.retried += totals["retried"]
    report.recovered += totals["recovered"]
    report.given_up += totals["given_up"]
    for name in ENGINES:
        report.rows_by_engine[name] = report.rows_by_engine.get(name, 0) + totals[f"rows_engine_{name}"]
    return generated
