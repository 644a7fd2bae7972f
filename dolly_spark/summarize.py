"""The ticket summarization job: incremental, idempotent, tracked.

Reads a source Delta table of tickets, selects those without a current result in the target
table (see ``dolly_spark.incremental``: a result is current when its request fingerprint and
input hash match the run's), generates in chunks, and MERGEs each chunk into the target keyed
by ticket id, never replacing an answer with an error. A rerun with nothing new generates
nothing; a crash loses at most the chunk in flight, and a rerun picks up exactly the tickets
still missing.

Everything between reading the source and the MERGE is staged in Delta tables beside the target
(``<target>__pending``: the run's fixed set of tickets; ``<target>__staged``: each chunk's
results), never in executor memory: a lost executor makes Spark retry tasks, and a chunk's
results are generated once even when the MERGE has to be retried.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass

import mlflow
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dolly_spark import incremental
from dolly_spark.config import option
from dolly_spark.incremental import attempt_key, input_hash, merge_results, request_fingerprint
from dolly_spark.registry import ModelSpec, resolve_model
from dolly_spark.tables import require_columns, require_table, table_exists
from dolly_spark.inference.results import GenerationSettings
from dolly_spark.udf import RESULT_SCHEMA, apply_instruction, with_registered_defaults

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
    max_rows: int = option(0, "process at most this many pending tickets in one run (0: all of them)")
    chunk_rows: int = option(5000, "tickets generated and merged per chunk; a crash loses at most one chunk")
    token_budget: int = option(16384, "tokens per generation micro-batch: rows x (prompt + max_new_tokens)")
    max_input_tokens: int = option(4096, "the longest prompt (template, instruction and ticket), in tokens; "
                                   "a longer ticket is cut from its end and flagged truncated")
    arrow_batch_size: int = option(256, "rows per Arrow batch sent to a Python worker")
    prompt_format: str | None = option(None, "dolly, chat or plain; default: the model's registered format")
    partitions: int = option(0, "Spark partitions a chunk is generated in (0: the default parallelism); "
                             "one per GPU or per executor core")
    max_attempts: int = option(3, "runs that try a ticket whose result is an error before giving up on it "
                               "(until its text, the instruction, a setting or the model changes)")
    shared_model_dir: str = option("", "download the model once on the driver into this directory, which every node "
                                   "reads (a UC Volume, DBFS), for executors without registry access; "
                                   "empty: each node downloads it into its local cache")
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
    wall_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.wall_seconds if self.wall_seconds else 0.0


RESULT_COLUMNS = [field.name for field in RESULT_SCHEMA.fields]


def validate(spark: SparkSession, config: SummarizeConfig) -> tuple[DataFrame, ModelSpec]:
    """The source DataFrame and the resolved model, or a ValueError naming what is wrong.
    Reads only catalog metadata and the registry: no Spark job runs."""
    source = require_table(spark, config.source_table, "source table")
    where = f"source table {config.source_table!r}"
    require_columns(source, {"text column": config.text_col}, where)
    if config.id_col not in source.columns:
        raise ValueError(f"id column {config.id_col!r} is not a column of {where}; its columns are {source.columns}")
    if config.max_attempts < 1:
        raise ValueError(f"max_attempts must be at least 1, not {config.max_attempts}")
    spec = resolve_model(config.model_uri, config.prompt_format)
    if table_exists(spark, config.target_table):
        missing = {config.id_col, *RESULT_COLUMNS} - set(spark.read.table(config.target_table).columns)
        if missing:
            raise ValueError(
                f"target table {config.target_table!r} exists but lacks columns {sorted(missing)}; "
                "point --target-table at a new table or at one this job wrote"
            )
    return source, spec


def job_request(config: SummarizeConfig, spec: ModelSpec) -> dict:
    """Everything that changes a summary: the model version, the prompt format, the instruction
    and the generation settings in effect (a version's registered repetition control included)."""
    settings = with_registered_defaults(
        GenerationSettings(repetition_penalty=config.repetition_penalty or 1.0,
                           no_repeat_ngram_size=config.no_repeat_ngram_size or 0),
        spec, config.repetition_penalty is None, config.no_repeat_ngram_size is None)
    return {
        "model_name": spec.name, "model_version": spec.version, "prompt_format": spec.prompt_format or "auto",
        "instruction": config.instruction, "max_new_tokens": config.max_new_tokens,
        "max_input_tokens": config.max_input_tokens, "repetition_penalty": float(settings.repetition_penalty),
        "no_repeat_ngram_size": float(settings.no_repeat_ngram_size), "decoding": "greedy",
    }


def pending_tickets(spark: SparkSession, source: DataFrame, config: SummarizeConfig, fingerprint: str) -> DataFrame:
    """Source tickets (one row per id, with their ``input_hash``) that have no current result."""
    tickets = source.where(F.col(config.id_col).isNotNull()).dropDuplicates([config.id_col]) \
        .withColumn("input_hash", input_hash(F.col(config.text_col)))
    target = spark.read.table(config.target_table) if table_exists(spark, config.target_table) else None
    return incremental.pending(tickets, target, config.id_col, fingerprint, config.max_attempts)


def run_summarize(spark: SparkSession, config: SummarizeConfig) -> SummarizeReport:
    """Run the job once; return what it did. Logs one MLflow run with its metrics."""
    source, spec = validate(spark, config)
    report = SummarizeReport(spec.name, spec.version)
    fingerprint = request_fingerprint(job_request(config, spec))
    started = time.perf_counter()
    with mlflow.start_run(run_name="summarize_tickets"):
        mlflow.log_params({**asdict(config), "model_version": spec.version, "model_name": spec.name,
                           "request_fingerprint": fingerprint})
        mlflow.set_tags({"job": "summarize_tickets", "resolved_model_uri": spec.uri})
        if table_exists(spark, config.target_table):
            added = incremental.upgrade_target(spark, config.target_table)
            if added:
                log.info("added %s to %s; its rows are summarized again once", added, config.target_table)
        report.skipped_null_ids = source.where(F.col(config.id_col).isNull()).count()
        if report.skipped_null_ids:
            log.warning("%d tickets in %s have a null %s and cannot be keyed; skipped",
                        report.skipped_null_ids, config.source_table, config.id_col)
        pending = pending_tickets(spark, source, config, fingerprint).select(config.id_col, config.text_col, "input_hash")
        if config.max_rows > 0:
            pending = pending.limit(config.max_rows)
        # Fix the set of tickets once, durably: re-evaluating a limit or an anti-join per chunk
        # could pick other rows, the target changes under us as chunks are merged, and data
        # held by an executor is gone with it.
        pending_table = _stage(pending, staging_table(config.target_table, "pending"), "overwrite")
        report.rows_pending = spark.read.table(pending_table).count()
        chunks = math.ceil(report.rows_pending / max(1, config.chunk_rows))
        log.info("%d tickets of %s to summarize with %s version %s, in %d chunks",
                 report.rows_pending, config.source_table, spec.name, spec.version, chunks)
        for chunk in range(chunks):
            tickets = spark.read.table(pending_table).where(
                F.pmod(F.xxhash64(config.id_col), F.lit(chunks)) == chunk)
            _summarize_chunk(spark, tickets, chunk, config, spec, fingerprint, report)
            log.info("chunk %d/%d merged: %d rows written so far, %d errors (%d retried, %d recovered, %d given up)",
                     chunk + 1, chunks, report.rows_written, report.errors, report.retried, report.recovered,
                     report.given_up)
        _drop_staging(spark, config.target_table)
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
        })
    return report


def staging_table(target: str, role: str) -> str:
    """The staging table for ``role`` ("pending" or "staged") of ``target``, in its schema."""
    return f"{target}__{role}"


def _stage(df: DataFrame, table: str, mode: str) -> str:
    df.write.format("delta").mode(mode).option("overwriteSchema", "true").saveAsTable(table)
    return table


def _drop_staging(spark: SparkSession, target: str) -> None:
    for role in ("pending", "staged"):
        spark.sql(f"DROP TABLE IF EXISTS {staging_table(target, role)}")


def _summarize_chunk(spark: SparkSession, tickets: DataFrame, chunk: int, config: SummarizeConfig,
                     spec: ModelSpec, fingerprint: str, report: SummarizeReport) -> None:
    results = apply_instruction(
        tickets.repartition(config.partitions or _default_parallelism(spark)), config.instruction,
        model_uri=spec.uri, input_col=config.text_col, key_col=config.id_col, output_col="_result",
        max_new_tokens=config.max_new_tokens, prompt_format=spec.prompt_format, token_budget=config.token_budget,
        max_input_tokens=config.max_input_tokens, repetition_penalty=config.repetition_penalty,
        no_repeat_ngram_size=config.no_repeat_ngram_size,
        arrow_batch_size=config.arrow_batch_size, shared_model_dir=config.shared_model_dir or None,
    )
    flat = results.select(config.id_col, "_result.*", F.current_timestamp().alias("processed_at"),
                          F.lit(fingerprint).alias("request_fingerprint"), "input_hash",
                          attempt_key(F.lit(fingerprint), F.col("input_hash")).alias("attempt_key"),
                          F.lit(chunk).alias("_chunk"))
    # Generate exactly once: the results land in Delta before the MERGE reads them (a MERGE may
    # read its source more than once, and may be retried after a lost executor).
    staged_table = _stage(flat, staging_table(config.target_table, "staged"), "overwrite" if chunk == 0 else "append")
    staged = spark.read.table(staged_table).where(F.col("_chunk") == chunk).drop("_chunk")
    target = spark.read.table(config.target_table) if table_exists(spark, config.target_table) else None
    # Counted before the MERGE: the outcomes compare each row with what the target held.
    totals = incremental.chunk_totals(staged, target, config.id_col, config.max_attempts)
    merge_results(spark, staged, config.target_table, config.id_col)
    report.rows_written += totals["rows"]
    report.errors += totals["errors"]
    report.prompt_tokens += totals["prompt_tokens"]
    report.generated_tokens += totals["completion_tokens"]
    report.retried += totals["retried"]
    report.recovered += totals["recovered"]
    report.given_up += totals["given_up"]


def _default_parallelism(spark: SparkSession) -> int:
    try:
        return spark.sparkContext.defaultParallelism
    except Exception:  # noqa: BLE001 - Spark Connect sessions have no SparkContext
        return int(spark.conf.get("spark.default.parallelism", "8"))


def preview(spark: SparkSession, config: SummarizeConfig, rows: int = 10) -> str:
    """A readable sample of the target table: ticket, subject or text, summary."""
    target = spark.read.table(config.target_table)
    source = spark.read.table(config.source_table)
    label = "subject" if "subject" in source.columns else config.text_col
    joined = target.join(source.select(config.id_col, label), config.id_col, "left").orderBy(config.id_col)
    lines = []
    for row in joined.limit(rows).collect():
        answer = row["response"] if row["error"] is None else f"[error: {row['error']}]"
        lines.append(f"{row[config.id_col]}  {str(row[label])[:70]}\n    -> {answer}  ({row['finish_reason']}, "
                     f"{row['completion_tokens']} tokens, {row['model_name']} v{row['model_version']})")
    return "\n".join(lines)
