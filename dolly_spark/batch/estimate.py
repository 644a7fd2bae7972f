"""What a summarize run will cost, before it runs: the dry run and the budget caps.

A dry run selects the pending tickets exactly as a run does (the same fingerprints, retry rules
and cap, ``incremental`` and ``staging.first_rows``), counts their prompt tokens on the
executors with the model's tokenizer and no weights (``RowEncoder.encode_only``: the
counts a run's results carry), and writes nothing to the target. Time comes from a measured
rate per task slot (``batch.rates``): the last MLflow run of the same request (model version,
instruction, settings) answered by the engine that runs now, on the same kind of slot, or else
a calibration that generates a full micro-batch per slot and discards it. Nothing pending is
zero time, with or without a rate.

A run with ``max_hours`` turns the hours into a row cap with the same rate; with
``fail_over_budget`` a run whose pending tickets exceed its cap refuses before generating,
with the estimate in the error.
"""
from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import mlflow
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from dolly_spark.batch import incremental, staging
from dolly_spark.batch.rates import Rate, engine_that_runs, measured_rate, row_cap, slot_kind, working_slots
from dolly_spark.inference.engines import EngineConfig
from dolly_spark.request import Request
from dolly_spark.spark.apply import count_prompts
from dolly_spark.spark.sessions import executor_count, executor_kind

log = logging.getLogger(__name__)

DRY_RUN_JOB = "summarize_tickets_dry_run"
HISTOGRAM_BINS = 20


class BudgetExceededError(RuntimeError):
    """A run with ``fail_over_budget`` whose pending tickets exceed its cap: nothing was generated."""


@dataclass
class Estimate:
    source_table: str
    target_table: str
    model: str
    engine: str  # the engine that answers: the one named, or what "auto" resolves to on the executors
    executor_kind: str
    executors: int
    task_slots: int = 0  # the slots generating at once, which divide the rate's slot-seconds
    generates: bool = True  # False with choices alone: they are scored, nothing is generated
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
    slot_name: str = "CPU-core"  # what one task slot is: "GPU" or "CPU-core"
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
            ("model, engine", f"{self.model}, engine {self.engine}, on {self.task_slots} {self.slot_name} slots "
                              f"({self.executor_kind})"),
            ("pending tickets", f"{self.pending_rows} ({reasons})"),
            ("skipped", f"{self.skipped_null_ids} with a null id, {self.duplicate_id_rows} duplicate ids"),
            ("this run takes", f"{self.rows_this_run} tickets{f' ({self.cap})' if self.cap else ''}"),
            ("prompt tokens", f"{self.prompt_tokens} (p50 {self.prompt_tokens_p50}, p95 {self.prompt_tokens_p95}, "
                              f"max {self.prompt_tokens_max})"),
            ("cut or refused", f"{self.truncated_rows} truncated to fit, {self.refused_rows} refused "
                               "(null, empty or over-long input)"),
            ("generated tokens", "none: choices are scored, not generated" if not self.generates else
                                 f"at most {self.generated_tokens_bound} ({self.max_new_tokens} per ticket)"
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


def build(spark: SparkSession, pending: DataFrame, target: DataFrame | None, config, request: Request,
          engine: EngineConfig) -> Estimate:
    """The estimate of a run of ``config`` over ``pending`` (rows of ``staging.one_row_per_id``
    that need the request; ``target`` for the reasons). Reads, counts and (without history)
    calibrates; writes no table."""
    spec = request.model
    estimate = Estimate(config.source_table, config.target_table, f"{spec.name} v{spec.version}",
                        engine_that_runs(spark, engine), executor_kind(spark), executor_count(spark),
                        task_slots=working_slots(spark, config), generates=request.generates,
                        max_new_tokens=request.max_new_tokens, slot_name=slot_kind(spark))
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
    rate = measured_rate(spark, tickets, config, request, engine, estimate.engine) if estimate.pending_rows else None
    cap, cap_text = row_cap(config, rate, estimate.pending_rows, estimate.task_slots)
    taken = estimate.pending_rows if cap is None else min(cap, estimate.pending_rows)
    estimate.cap = cap_text if taken < estimate.pending_rows else ""
    estimate.rows_this_run = taken
    run_tickets = tickets if taken == estimate.pending_rows else staging.first_rows(tickets, config.id_col, taken)
    _count_tokens(estimate, run_tickets, config, request, engine)
    if not estimate.pending_rows:
        rate = Rate(0.0, 0.0, "nothing pending: no rate needed")
    if rate is not None:
        estimate.engine = rate.engine or estimate.engine  # a calibration saw which engine answered
        estimate.rate_source = rate.source
        estimate.seconds = rate.seconds(taken, estimate.task_slots)
        estimate.expected_generated_tokens = min(estimate.generated_tokens_bound,
                                                 round(taken * rate.completion_tokens_per_row))
        estimate.slot_hours = estimate.seconds / 3600 * estimate.task_slots
    if config.price_per_hour > 0 and estimate.seconds is not None:
        estimate.price_per_hour = config.price_per_hour
        estimate.cost = estimate.seconds / 3600 * estimate.executors * config.price_per_hour
    return estimate


def run_cap(spark: SparkSession, pending_table: str, target: DataFrame | None, config, request: Request,
            engine: EngineConfig) -> tuple[int | None, str, Rate | None]:
    """A real run's cap on tickets (None: none), what sets it, and the rate it took (None when
    no rate was needed). With ``fail_over_budget``, raises BudgetExceededError, before anything
    is generated, when the pending tickets exceed the cap. Nothing pending needs no rate."""
    if config.max_rows <= 0 and config.max_hours <= 0:
        return None, "", None
    staged = spark.read.table(pending_table)
    tickets = keyed(staged).drop(staging.CHUNK_COL, staging.COPIES_COL)
    pending_rows = tickets.count()
    rate = None
    if config.max_hours > 0 and pending_rows:
        rate = measured_rate(spark, tickets, config, request, engine, engine_that_runs(spark, engine))
    cap, cap_text = row_cap(config, rate, pending_rows, working_slots(spark, config))
    if config.fail_over_budget and cap is not None and pending_rows > cap:
        # The whole pending set, estimated without generating (history only, no calibration).
        whole = replace(config, max_rows=0, max_hours=0, calibrate_rows=0)
        estimate = build(spark, staged, target, whole, request, engine)
        raise BudgetExceededError(
            f"{estimate.pending_rows} tickets of {config.source_table} are pending for {config.target_table}, over "
            f"the cap of {cap} ({cap_text}); nothing was generated. Raise the cap, or leave out fail_over_budget to "
            f"take {cap} now and the rest in later runs. The estimate of the whole set:\n{estimate.table()}")
    return cap, cap_text, rate


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
        estimate.generated_tokens_bound = generated_tokens_bound(totals["rows"] - estimate.refused_rows, request)
        width = max(1, math.ceil((estimate.prompt_tokens_max + 1) / HISTOGRAM_BINS))
        bins = counted.groupBy(F.floor(F.col("prompt_tokens") / width).alias("bin")).count().orderBy("bin").collect()
        estimate.prompt_histogram = [(row["bin"] * width, (row["bin"] + 1) * width - 1, row["count"]) for row in bins]
    finally:
        counted.unpersist()


def generated_tokens_bound(rows: int, request: Request) -> int:
    """The most tokens ``rows`` answered rows generate: ``max_new_tokens`` each, none with
    choices alone (scored by one prefill per row, never generated)."""
    return rows * request.max_new_tokens if request.generates else 0


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
