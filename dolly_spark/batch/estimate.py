"""What a summarize run will cost, before it runs: the dry run and the budget caps.

A dry run selects the pending tickets exactly as a run does (the same fingerprints, retry rules
and cap, ``incremental`` and ``staging.first_rows``), counts their prompt tokens on the
executors with the model's tokenizer and no weights (``RowEncoder.encode_only``: the
counts a run's results carry), and writes nothing to the target. Time comes from a measured
rate: the last MLflow run of the same request (model version, instruction, settings) with the
same engine on the same kind of executors, or else a calibration run that generates a few
pending rows and discards them.

A run with ``max_hours`` turns the hours into a row cap with the same rate; with
``fail_over_budget`` a run whose pending tickets exceed its cap refuses before generating,
with the estimate in the error.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import mlflow
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dolly_spark.batch import incremental, staging
from dolly_spark.inference.engines import EngineConfig
from dolly_spark.request import Request
from dolly_spark.spark.apply import apply_request, count_prompts
from dolly_spark.spark.sessions import executor_count, executor_kind, generation_parallelism, has_gpu_executors

log = logging.getLogger(__name__)

# The job tag of a real run: the only runs whose rates an estimate uses.
RUN_JOB = "summarize_tickets"
DRY_RUN_JOB = "summarize_tickets_dry_run"
HISTOGRAM_BINS = 20


class BudgetExceededError(RuntimeError):
    """A run with ``fail_over_budget`` whose pending tickets exceed its cap: nothing was generated."""


@dataclass
class Rate:
    """Measured seconds per row and completion tokens per row, the fixed seconds a run adds
    (model loads), and where they were measured."""

    seconds_per_row: float
    completion_tokens_per_row: float
    source: str
    fixed_seconds: float = 0.0

    def seconds(self, rows: int) -> float:
        return self.fixed_seconds + rows * self.seconds_per_row


@dataclass
class Estimate:
    source_table: str
    target_table: str
    model: str
    engine: str
    executor_kind: str
    executors: int
    pending_rows: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    skipped_null_ids: int = 0
    duplicate_id_rows: int = 0
    rows_this_run: int = 0
    cap: str = ""
    prompt_tokens: int = 0
    prompt_tokens_p50: int = 0
    prompt_tokens_p95: int = 0
    prompt_tokens_max: int = 0
    truncated_rows: int = 0
    refused_rows: int = 0
    max_new_tokens: int = 0
    generated_tokens_bound: int = 0
    expected_generated_tokens: int | None = None
    seconds: float | None = None
    rate_source: str = "no rate: no earlier run of this request here, and calibration is off (calibrate_rows=0)"
    slot_hours: float | None = None
    slot_name: str = "CPU"
    price_per_hour: float | None = None
    cost: float | None = None
    prompt_histogram: list[tuple[int, int, int]] = field(default_factory=list)  # (from, to, rows)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """The report as a user reads it on the console."""
        reasons = ", ".join(f"{count} {reason}" for reason, count in self.reasons.items() if count) or "none"
        rows = [
            ("tables", f"{self.source_table} -> {self.target_table}"),
            ("model, engine", f"{self.model}, engine {self.engine}, on {self.executor_kind}"),
            ("pending tickets", f"{self.pending_rows} ({reasons})"),
            ("skipped", f"{self.skipped_null_ids} with a null id, {self.duplicate_id_rows} duplicate ids"),
            ("this run takes", f"{self.rows_this_run} tickets{f' ({self.cap})' if self.cap else ''}"),
            ("prompt tokens", f"{self.prompt_tokens} (p50 {self.prompt_tokens_p50}, p95 {self.prompt_tokens_p95}, "
                              f"max {self.prompt_tokens_max})"),
            ("cut or refused", f"{self.truncated_rows} truncated to fit, {self.refused_rows} refused "
                               "(null, empty or over-long input)"),
            ("generated tokens", f"at most {self.generated_tokens_bound} ({self.max_new_tokens} per ticket)"
                                 + (f", expected about {self.expected_generated_tokens}"
                                    if self.expected_generated_tokens is not None else "")),
            ("time", _duration(self.seconds) if self.seconds is not None else "unknown"),
            ("rate from", self.rate_source),
        ]
        if self.slot_hours is not None:
            rows.append((f"{self.slot_name}-hours", f"{self.slot_hours:.3f}"))
        if self.cost is not None:
            rows.append(("cost", f"{self.cost:.2f} at {self.price_per_hour} per executor-hour x {self.executors} "
                                 "executors"))
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _duration(seconds: float) -> str:
    return f"about {seconds:.0f}s" if seconds < 120 else f"about {seconds / 60:.1f} min ({seconds / 3600:.2f} h)"


def keyed(pending: DataFrame) -> DataFrame:
    """The pending tickets that can be processed (not the row that gathers null ids)."""
    return pending.where(F.col(staging.CHUNK_COL) >= 0)


def history_rate(request: Request, engine: EngineConfig, kind: str) -> Rate | None:
    """The rate of the last real run of this request with this engine on this kind of executors
    that wrote rows, from MLflow; None when there is none."""
    # Every experiment: the fingerprint names the request wherever its runs were logged (a
    # notebook's runs go to the notebook's experiment, a job's to its configured one).
    runs = mlflow.search_runs(
        search_all_experiments=True, max_results=1, order_by=["attributes.start_time DESC"], output_format="list",
        filter_string=(f"tags.job = '{RUN_JOB}' AND tags.executor_kind = '{kind}' AND params.engine = '{engine.engine}' "
                       f"AND params.request_fingerprint = '{request.fingerprint()}' AND metrics.rows_written > 0"))
    if not runs:
        return None
    metrics = runs[0].data.metrics
    rows = metrics["rows_written"]
    return Rate(metrics["wall_seconds"] / rows, metrics["generated_tokens"] / rows,
                f"MLflow run {runs[0].info.run_id} ({int(rows)} tickets in {metrics['wall_seconds']:.1f}s, "
                "its fixed costs included)")


def calibrate(spark: SparkSession, tickets: DataFrame, config, request: Request, engine: EngineConfig,
              rows: int) -> Rate | None:
    """Generate the first ``rows`` of ``tickets`` as a run would and discard the answers: first
    one ticket per task, which loads the model in each Python worker (the fixed cost), then all
    ``rows`` on the loaded models, timed for the rate per ticket."""
    partitions = config.partitions or generation_parallelism(spark)
    sample = staging.first_rows(tickets, config.id_col, rows).cache()
    count = sample.count()
    if not count:
        sample.unpersist()
        return None

    def generate(part: DataFrame) -> tuple[float, int]:
        started = time.perf_counter()
        results = apply_request(part.repartition(partitions), request, engine, input_col=config.text_col,
                                key_col=config.id_col, output_col="_result", arrow_batch_size=config.arrow_batch_size)
        generated = results.agg(F.sum("_result.completion_tokens")).first()[0] or 0
        return time.perf_counter() - started, generated

    load_seconds, _ = generate(sample.limit(partitions))
    seconds, generated = generate(sample)
    sample.unpersist()
    log.info("calibration: %d tickets generated in %.1fs after %.1fs of model loads (answers discarded)",
             count, seconds, load_seconds)
    return Rate(seconds / count, generated / count,
                f"a calibration run of {count} tickets in {seconds:.1f}s, plus {load_seconds:.1f}s to load the model "
                "(a run's Delta work not included)", fixed_seconds=load_seconds)


def measured_rate(spark: SparkSession, tickets: DataFrame, config, request: Request, engine: EngineConfig) -> Rate | None:
    """History first, else a calibration run of ``config.calibrate_rows`` tickets (none when 0)."""
    rate = history_rate(request, engine, executor_kind(spark))
    if rate is None and config.calibrate_rows > 0:
        rate = calibrate(spark, tickets, config, request, engine, config.calibrate_rows)
    return rate


def row_cap(config, rate: Rate | None) -> tuple[int | None, str]:
    """The most tickets a run takes under ``max_rows`` and ``max_hours`` (None: no cap), and the
    cap in words."""
    caps = {}
    if config.max_rows > 0:
        caps[f"max_rows={config.max_rows}"] = config.max_rows
    if config.max_hours > 0:
        if rate is None:
            raise ValueError(f"max_hours={config.max_hours} needs a rate, and there is no earlier run of this request "
                             "here to take it from; set calibrate_rows above 0")
        caps[f"max_hours={config.max_hours:.4g} at {rate.seconds_per_row:.2f}s per ticket"] = \
            max(0, math.floor((config.max_hours * 3600 - rate.fixed_seconds) / rate.seconds_per_row))
    if not caps:
        return None, ""
    name = min(caps, key=caps.__getitem__)
    return caps[name], name


def build(spark: SparkSession, pending: DataFrame, target: DataFrame | None, config, request: Request,
          engine: EngineConfig) -> Estimate:
    """The estimate of a run of ``config`` over ``pending`` (rows of ``staging.one_row_per_id``
    that need the request; ``target`` for the reasons). Reads, counts and (without history)
    calibrates; writes no table."""
    spec = request.model
    kind = executor_kind(spark)
    estimate = Estimate(config.source_table, config.target_table, f"{spec.name} v{spec.version}", engine.engine, kind,
                        executor_count(spark), max_new_tokens=request.max_new_tokens)
    with_reason = incremental.with_reasons(pending, target, config.id_col, request.fingerprint())
    counts = with_reason.groupBy(F.col(staging.CHUNK_COL) >= 0, "reason").agg(
        F.count(F.lit(1)).alias("rows"), F.sum(staging.COPIES_COL).alias("copies")).collect()
    for row in counts:
        if row[0]:
            estimate.reasons[row["reason"]] = row["rows"]
            estimate.duplicate_id_rows += row["copies"] - row["rows"]
        else:
            estimate.skipped_null_ids += row["copies"]
    estimate.reasons = {reason: estimate.reasons.get(reason, 0) for reason in incremental.PENDING_REASONS}
    estimate.pending_rows = sum(estimate.reasons.values())

    tickets = keyed(pending).drop(staging.CHUNK_COL, staging.COPIES_COL)
    rate = measured_rate(spark, tickets, config, request, engine) if estimate.pending_rows else None
    cap, cap_text = row_cap(config, rate)
    taken = estimate.pending_rows if cap is None else min(cap, estimate.pending_rows)
    estimate.cap = cap_text if taken < estimate.pending_rows else ""
    estimate.rows_this_run = taken
    run_tickets = tickets if taken == estimate.pending_rows else staging.first_rows(tickets, config.id_col, taken)
    _count_tokens(estimate, run_tickets, config, request, engine)
    if rate is not None:
        estimate.rate_source = rate.source
        estimate.seconds = rate.seconds(taken)
        estimate.expected_generated_tokens = min(estimate.generated_tokens_bound,
                                                 round(taken * rate.completion_tokens_per_row))
        estimate.slot_name = "GPU" if has_gpu_executors(spark) else "CPU-core"
        estimate.slot_hours = estimate.seconds / 3600 * generation_parallelism(spark)
    if config.price_per_hour > 0 and estimate.seconds is not None:
        estimate.price_per_hour = config.price_per_hour
        estimate.cost = estimate.seconds / 3600 * estimate.executors * config.price_per_hour
    return estimate


def _count_tokens(estimate: Estimate, tickets: DataFrame, config, request: Request, engine: EngineConfig) -> None:
    """Prompt-token statistics of ``tickets`` on the executors, in one pass, and a histogram."""
    counted = count_prompts(tickets, request, input_col=config.text_col, key_col=config.id_col,
                            output_col="_prompt").select("_prompt.*").cache()
    try:
        totals = counted.agg(
            F.count(F.lit(1)).alias("rows"),
            F.sum("prompt_tokens").alias("total"), F.max("prompt_tokens").alias("max"),
            F.percentile_approx("prompt_tokens", [0.5, 0.95], 10000).alias("quantiles"),
            F.sum(F.col("truncated").cast("int")).alias("truncated"), F.count("error").alias("refused"),
        ).first()
        estimate.prompt_tokens = int(totals["total"] or 0)
        estimate.prompt_tokens_max = int(totals["max"] or 0)
        estimate.prompt_tokens_p50, estimate.prompt_tokens_p95 = (int(q) for q in (totals["quantiles"] or [0, 0]))
        estimate.truncated_rows, estimate.refused_rows = int(totals["truncated"] or 0), int(totals["refused"])
        estimate.generated_tokens_bound = (totals["rows"] - estimate.refused_rows) * request.max_new_tokens
        width = max(1, math.ceil((estimate.prompt_tokens_max + 1) / HISTOGRAM_BINS))
        bins = counted.groupBy(F.floor(F.col("prompt_tokens") / width).alias("bin")).count().orderBy("bin").collect()
        estimate.prompt_histogram = [(row["bin"] * width, (row["bin"] + 1) * width - 1, row["count"]) for row in bins]
    finally:
        counted.unpersist()


def log_to_mlflow(estimate: Estimate, config, request: Request) -> None:
    """The dry run as an MLflow run of its own (tag ``job`` = DRY_RUN_JOB, so no estimate ever
    takes its rate from it): the config as params, the figures as metrics, the report and a
    prompt-length histogram as artifacts."""
    with mlflow.start_run(run_name=DRY_RUN_JOB):
        mlflow.set_tags({"job": DRY_RUN_JOB, "executor_kind": estimate.executor_kind})
        mlflow.log_params({**asdict(config), "request_fingerprint": request.fingerprint()})
        numbers = {name: value for name, value in estimate.as_dict().items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool) and value is not None}
        mlflow.log_metrics({**numbers, **{f"pending_{reason.replace(' ', '_')}": count
                                          for reason, count in estimate.reasons.items()}})
        mlflow.log_dict(estimate.as_dict(), "estimate.json")
        mlflow.log_text(estimate.table(), "estimate.txt")
        mlflow.log_figure(_histogram_figure(estimate), "prompt_tokens_histogram.png")


def _histogram_figure(estimate: Estimate):
    import matplotlib

    matplotlib.use("Agg")  # no display on a driver
    from matplotlib import pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 3.5))
    if estimate.prompt_histogram:
        starts = [low for low, _, _ in estimate.prompt_histogram]
        width = estimate.prompt_histogram[0][1] - estimate.prompt_histogram[0][0] + 1
        axes.bar(starts, [rows for _, _, rows in estimate.prompt_histogram], width=width, align="edge")
    axes.set_xlabel("prompt tokens")
    axes.set_ylabel("tickets")
    axes.set_title(f"{estimate.rows_this_run} tickets of {estimate.source_table}, {estimate.model}")
    figure.tight_layout()
    plt.close(figure)
    return figure
