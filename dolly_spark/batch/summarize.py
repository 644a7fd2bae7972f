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

from dolly_spark.batch import claims, incremental, staging
from dolly_spark.batch import estimate as estimation
from dolly_spark.batch.incremental import attempt_key, input_hash, merge_results
from dolly_spark.batch.progress import ChunkProgress
from dolly_spark.batch.targets import validate
from dolly_spark.inference.engines import AUTO, ENGINE_CHOICES, ENGINES, EngineConfig
from dolly_spark.job_config import option
from dolly_spark.lifecycle.loader import stage_for_executors
from dolly_spark.request import Request
from dolly_spark.spark.apply import apply_request
from dolly_spark.spark.sessions import executor_kind, generation_parallelism
from dolly_spark.spark.tables import table_exists

log = logging.getLogger(__name__)

DEFAULT_INSTRUCTION = (
    "Summarize this customer support ticket in one or two sentences: what the customer needs, "
    "and how urgent it is."
)


@dataclass
class SummarizeConfig:
    source_table: str = option("support_tickets", "Delta table of tickets to summarize")
    target_table: str = option("ticket_summaries", "Delta table the results are MERGEd into, one row per ticket id")
    model_uri: str = option("models:/support_dolly@champion",
                            "models:/name@alias, models:/name/version, a local checkpoint or a hub id")
    instruction: str = option(DEFAULT_INSTRUCTION, "the instruction each ticket's text is the input of")
    id_col: str = option("ticket_id", "the ticket id column of the source table (the MERGE key)")
    text_col: str = option("body", "the ticket text column of the source table")
    max_new_tokens: int = option(96, "the longest summary, in tokens")
    repetition_penalty: float | None = option(None, "> 1 discourages tokens already in the summary "
                                              "(1.0: off); default: the value registered with the model version")
    no_repeat_ngram_size: int | None = option(None, "no n-gram of this size twice in the summary (0: off); "
                                              "default: the value registered with the model version")
    max_rows: int = option(0, "process at most this many pending tickets in one run, those of lowest id; the rest "
                           "stay pending for the next run (0: all of them)")
    max_hours: float = option(0, "process at most the pending tickets this many hours take, by the estimated rate "
                              "(see calibrate_rows); the rest stay pending for the next run (0: no limit)")
    fail_over_budget: bool = option(False, "refuse to run, before generating anything and with the estimate in the "
                                    "error, when more tickets are pending than max_rows or max_hours allow")
    dry_run: bool = option(False, "estimate the run instead of running it: pending tickets and why, their prompt "
                           "tokens, the time and cost; nothing is written to the target")
    calibrate_rows: int = option(8, "tickets generated (and discarded) to measure the rate for the estimate and "
                                 "max_hours, when MLflow holds no earlier run of the same request with the same "
                                 "engine on the same kind of executors (0: never)")
    price_per_hour: float = option(0, "the price of one executor-hour, for the estimate's cost (0: no cost)")
    chunk_rows: int = option(5000, "tickets generated and merged per chunk (chunks are ranges of the id); "
                             "a crash loses at most one chunk")
    token_budget: int = option(16384, "tokens per generation micro-batch: rows x (prompt + max_new_tokens)")
    max_input_tokens: int = option(4096, "the longest prompt (template, instruction and ticket), in tokens; "
                                   "a longer ticket is cut from its end and flagged truncated")
    arrow_batch_size: int = option(256, "rows per Arrow batch sent to a Python worker")
    prompt_format: str | None = option(None, "dolly, chat or plain; default: the model's registered format")
    partitions: int = option(0, "Spark tasks a chunk is generated in (0: one per GPU on GPU executors, "
                             "from spark.executor/task.resource.gpu.amount; else one per executor core)")
    max_attempts: int = option(3, "runs that try a ticket whose result is an error before giving up on it "
                               "(until its text, the instruction, a setting or the model changes); a null, "
                               "empty or over-long ticket is given up at once")
    choices: list[str] | None = option(None, "classify each ticket into exactly one of these labels, by scoring "
                                       "(a YAML list, or comma-separated on the command line); the target gains "
                                       "label, label_probability and label_probabilities")
    schema: str | dict | None = option(None, "extract into these typed fields (a Spark DDL schema such as 'order_id "
                                       "STRING, refund_requested BOOLEAN', or a JSON Schema: a YAML mapping or JSON "
                                       "text, where enum limits a field to fixed values): answers are JSON "
                                       "constrained to it, parsed into the target's struct column parsed")
    shared_model_dir: str = option("", "download the model once on the driver into this directory, which every node "
                                   "reads (a UC Volume, DBFS), for executors without registry access; "
                                   "empty: each node downloads it into its local cache")
    claim_timeout_minutes: float = option(60, "a run claims its target table; a claim without a heartbeat "
                                          "(refreshed between chunks) for this long is taken to be a dead run's, "
                                          "and taken over")
    engine: str = option(AUTO, f"the engine that runs the model: {', '.join(ENGINE_CHOICES)} (auto: vllm on executors "
                         "with a CUDA device and vLLM installed, hf elsewhere; how rows are run, never what they "
                         "answer: a change of engine reprocesses nothing)")
    experiment: str = option("dolly_spark", "MLflow experiment of the job's runs")


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
        mlflow.set_tags({"job": estimation.RUN_JOB, "resolved_model_uri": spec.uri,
                         "executor_kind": executor_kind(spark)})
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
    cap, cap_text = _row_cap(spark, pending_table, target, config, request, engine)
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
    progress = ChunkProgress(report.rows_pending, report.chunks)
    for step, chunk in enumerate(pending.chunks):
        claim.heartbeat()
        # Asked per chunk: executors keep joining a cluster that is starting or scaling up.
        partitions = config.partitions or generation_parallelism(spark)
        tickets = staging.read_chunk(spark, pending, chunk).repartition(partitions)
        _summarize_chunk(spark, tickets, chunk, config, request, engine, report, claim)
        progress.chunk_done(step, chunk.rows, f"{report.errors} errors so far ({report.retried} retried, "
                                              f"{report.recovered} recovered, {report.given_up} given up)")


def _row_cap(spark: SparkSession, pending_table: str, target: DataFrame | None, config: SummarizeConfig,
             request: Request, engine: EngineConfig) -> tuple[int | None, str]:
    """The run's cap on tickets (None: none) and what sets it. With ``fail_over_budget``, raises
    BudgetExceededError, before anything is generated, when the pending tickets exceed it."""
    if config.max_rows <= 0 and config.max_hours <= 0:
        return None, ""
    staged = spark.read.table(pending_table)
    tickets = estimation.keyed(staged).drop(staging.CHUNK_COL, staging.COPIES_COL)
    rate = estimation.measured_rate(spark, tickets, config, request, engine) if config.max_hours > 0 else None
    cap, cap_text = estimation.row_cap(config, rate)
    if config.fail_over_budget and tickets.count() > cap:
        # The whole pending set, estimated without generating (history only, no calibration).
        whole = replace(config, max_rows=0, max_hours=0, calibrate_rows=0)
        estimate = estimation.build(spark, staged, target, whole, request, engine)
        raise estimation.BudgetExceededError(
            f"{estimate.pending_rows} tickets of {config.source_table} are pending for {config.target_table}, over "
            f"the cap of {cap} ({cap_text}); nothing was generated. Raise the cap, or leave out fail_over_budget to "
            f"take {cap} now and the rest in later runs. The estimate of the whole set:\n{estimate.table()}")
    return cap, cap_text


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
                     request: Request, engine: EngineConfig, report: SummarizeReport, claim: claims.Claim) -> None:
    results = apply_request(tickets, request, engine, input_col=config.text_col, key_col=config.id_col,
                            output_col="_result", arrow_batch_size=config.arrow_batch_size)
    fingerprint = request.fingerprint()
    flat = results.select(config.id_col, "_result.*", F.current_timestamp().alias("processed_at"),
                          F.lit(fingerprint).alias("request_fingerprint"), "input_hash",
                          attempt_key(F.lit(fingerprint), F.col("input_hash")).alias("attempt_key"))
    # Generate exactly once: the results land in Delta before the MERGE reads them (a MERGE may
    # read its source more than once, and may be retried after a lost executor).
    staged = staging.stage_results(spark, flat, config.target_table)
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
