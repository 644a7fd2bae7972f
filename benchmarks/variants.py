"""The four ways of running one model over the same rows, each timed the same way.

(a) ``apply_instruction``     dolly_spark's pandas UDF: the engine batches each Arrow batch.
(b) ``mlflow_spark_udf``      mlflow.pyfunc.spark_udf on the registered model (the official route),
                              with the pipeline's batch_size 1, and 8, 16, ... (``_batch<N>``).
(c) ``per_row_pipeline``      a hand-written pandas UDF, one transformers pipeline call per row.
(d) ``engine``                InstructionEngine in the driver, no Spark.

(a) and (d) also run with the workload's long instruction (``_long``), on request.

Load time is kept out of throughput the same way for every variant: each Spark variant first runs
on a few warm-up rows, in as many partitions as the timed run, so each of the two Python workers
has loaded its model (workers are reused, so they keep it); then the timed run is the action on
the full DataFrame only (plans are built before the clock starts). The bare engine is loaded
before its clock starts and warmed up on the same warm-up rows. Warm-up seconds are reported too:
they are mostly model loading. MLflow's spark_udf is the exception it cannot avoid: with a local
master it loads the model inside every task, so each of its timed runs loads once per partition.
"""
from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Callable

from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from benchmarks.bench_models import BenchModel
from benchmarks.padding import RowTokens, replay, single_run_rows
from benchmarks.per_row_pipeline import count_loads, per_row_pipeline_udf
from benchmarks.workload import INSTRUCTION
from dolly_spark.inference.engine import InstructionEngine
from dolly_spark.inference.engines import EngineConfig, Rows
from dolly_spark.inference.results import EngineStats
from dolly_spark.request import Request

APPLY, MLFLOW, PIPELINE, ENGINE = "apply_instruction", "mlflow_spark_udf", "per_row_pipeline", "engine"
# (a) again with dtype="bfloat16": an opt-in for CPUs with bf16 matrix units (AMX); reported
# beside the fp32 comparison, never in place of it.
APPLY_BF16 = "apply_instruction_bf16"
# (a) and (d) with the workload's long instruction (about 150 tokens instead of about 25).
APPLY_LONG, ENGINE_LONG = "apply_instruction_long", "engine_long"
# (a) and (d) on the "vllm" engine (vLLM's CPU backend here), on the same rows.
APPLY_VLLM, ENGINE_VLLM = "apply_instruction_vllm", "engine_vllm"
# The order of the report's rows; (b) with a pipeline batch size above 1 follows (b).
VARIANTS = (APPLY, APPLY_BF16, MLFLOW, PIPELINE, ENGINE, APPLY_VLLM, ENGINE_VLLM, APPLY_LONG, ENGINE_LONG)


def mlflow_variant(batch_size: int) -> str:
    """(b)'s name at a pipeline batch size: ``mlflow_spark_udf`` at 1, as before batch sizes
    were compared, ``mlflow_spark_udf_batch<N>`` above."""
    return MLFLOW if batch_size == 1 else f"{MLFLOW}_batch{batch_size}"


def variant_order(name: str) -> tuple[int, str]:
    """Sort key of variant names in the report: VARIANTS' order, (b)'s batch sizes after (b)."""
    base = MLFLOW if name.startswith(MLFLOW) else name
    return VARIANTS.index(base), f"{len(name):03d}{name}"


@dataclass
class BenchRows:
    """One model's rows in every shape the variants take: the same tickets, the same prompts."""

    bodies: list[str]
    prompts: list[str]  # the engine's prompt text for each row
    df: DataFrame  # ticket_id, body, prompt, mlflow_input; cached, in the timed partition count
    warm_bodies: list[str]
    warm_df: DataFrame


@dataclass
class VariantResult:
    """One variant's timed run."""

    variant: str
    rows: int
    seconds: float
    prompt_tokens: int
    generated_tokens: int
    token_counts_from: str  # "engine", "pipeline token ids", or how re-tokenized text was used
    warmup_seconds: float
    loads_warmup: int | None  # model loads during the warm-up, where they can be counted
    loads_timed: int | None  # ... and during the timed run (0 is the point of the warm-up)
    padding_waste: float | None = None
    error_rows: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    # ticket_id -> (generated text, generated tokens), to compare routes; not reported
    per_row: dict[str, tuple[str, int]] = field(default_factory=dict, repr=False)

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds

    @property
    def generated_tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds

    def as_dict(self) -> dict[str, Any]:
        figures = {k: v for k, v in asdict(self).items() if k != "per_row"}
        return {**figures, "rows_per_second": self.rows_per_second,
                "generated_tokens_per_second": self.generated_tokens_per_second}


def _timed(action: Callable[[], Any]) -> tuple[Any, float]:
    started = time.perf_counter()
    value = action()
    return value, time.perf_counter() - started


# --------------------------------------------------------------------------------------------
def run_apply_instruction(bench: BenchModel, rows: BenchRows, request: Request, config: EngineConfig,
                          arrow_batch_rows: int, dtype: str | None = None, instruction: str = INSTRUCTION,
                          variant: str = APPLY, loads: Callable[[], int] | None = None,
                          engine: str = "hf") -> VariantResult:
    """(a): apply_instruction over the DataFrame; padding waste and micro-batches replayed from the
    result struct. With ``dtype`` the model runs in that dtype instead of the device default (fp32
    on a CPU). After the timed run, the same rows again with max_new_tokens=1 (prefill and the
    first token) time the prefill phase. Model loads happen in the Python workers, which print a
    line for each; ``loads`` (the number of those lines for this model seen so far, see
    ``benchmarks.stderr_tap``) is read before and after the warm-up and the timed run, outside
    the clock. Without it, loads are not counted. ``engine`` is apply_instruction's; padding and
    micro-batches are replayed for the "hf" engine only (vLLM schedules its own batches)."""
    from dolly_spark import apply_instruction

    def plan(df: DataFrame, max_new_tokens: int = request.max_new_tokens) -> DataFrame:
        out = apply_instruction(
            df, instruction, model_uri=bench.uri, input_col="body", max_new_tokens=max_new_tokens,
            token_budget=config.token_budget, max_batch_rows=config.max_batch_rows, dtype=dtype, engine=engine,
            # The same greedy work as the per-row routes, whatever the version registers.
            repetition_penalty=request.repetition_penalty, no_repeat_ngram_size=request.no_repeat_ngram_size,
        )
        return out.select("ticket_id", F.spark_partition_id().alias("partition"), "response.*")

    loads_before = loads() if loads else None
    _, warm_seconds = _timed(plan(rows.warm_df).collect)
    loads_after_warmup = loads() if loads else None
    timed_plan = plan(rows.df)
    collected, seconds = _timed(timed_plan.collect)
    loads_after = loads() if loads else None
    _, prefill_seconds = _timed(plan(rows.df, max_new_tokens=1).collect)

    tokens = [RowTokens(r["partition"], r["prompt_tokens"], r["completion_tokens"], r["finish_reason"]) for r in collected]
    batching = {}
    stats = None
    if engine == "hf":
        stats, work = replay(tokens, request.max_new_tokens, config, arrow_batch_rows)
        batching = {"micro_batches": stats.micro_batches, "micro_batch_work": work,
                    "padding_waste_from": "replayed from the result struct (see benchmarks/padding.py)"}
    return VariantResult(
        variant, len(collected), seconds,
        prompt_tokens=sum(r["prompt_tokens"] for r in collected),
        generated_tokens=sum(r["completion_tokens"] for r in collected),
        token_counts_from="engine", warmup_seconds=warm_seconds,
        loads_warmup=None if loads is None else loads_after_warmup - loads_before,
        loads_timed=None if loads is None else loads_after - loads_after_warmup,
        padding_waste=stats.padding_waste if stats else None, error_rows=sum(1 for r in collected if r["error"]),
        extra={**batching, "engines": _histogram(r["engine"] for r in collected),
               "finish_reasons": _histogram(r["finish_reason"] for r in collected),
               "phases": _phases(prefill_seconds, seconds, [(r.prompt_tokens, r.completion_tokens) for r in tokens])},
    )


def run_mlflow_spark_udf(spark: SparkSession, bench: BenchModel, rows: BenchRows, max_new_tokens: int,
                         tokenizer: Any, batch_size: int = 1, model_uri: str | None = None) -> VariantResult:
    """(b): mlflow.pyfunc.spark_udf on the same registered version, whose stored inference
    config is greedy (dolly_spark.lifecycle.registry.log_and_register stores do_sample=False), with
    max_new_tokens as an inference param, which the signature declares.

    ``batch_size`` above 1 needs ``model_uri``: a version whose signature also declares
    ``batch_size`` (bench_models.register_batched_pyfunc), which MLflow then passes to the
    pipeline call with the model's stored config.

    The stored prompt template (Dolly models) wraps ``mlflow_input``; a chat model has none and
    gets the full chat prompt, which MLflow then returns with the completion appended.
    """
    import mlflow

    params = {"max_new_tokens": max_new_tokens, **({"batch_size": batch_size} if batch_size > 1 else {})}
    uri = model_uri or bench.uri
    predict = mlflow.pyfunc.spark_udf(spark, uri, result_type="string", params=params)

    def plan(df: DataFrame) -> DataFrame:
        return df.select("ticket_id", "prompt", predict(F.col("mlflow_input")).alias("text"))

    _, warm_seconds = _timed(plan(rows.warm_df).collect)
    timed_plan = plan(rows.df)
    collected, seconds = _timed(timed_plan.collect)
    completions = [_completion(r["text"], r["prompt"]) for r in collected]
    return VariantResult(
        mlflow_variant(batch_size), len(collected), seconds,
        prompt_tokens=_count_tokens(tokenizer, [r["prompt"] for r in collected]),
        generated_tokens=_count_tokens(tokenizer, completions), token_counts_from="re-tokenized text",
        warmup_seconds=warm_seconds, loads_warmup=None, loads_timed=None,
        error_rows=sum(1 for text in completions if not text.strip()),
        extra={"model_uri": uri, "params": params, "batch_size": batch_size,
               "stored_model_config": {"do_sample": False},
               "prompt_template_stored": bench.prompt_template is not None},
        per_row={r["ticket_id"]: (text, 0) for r, text in zip(collected, completions)},
    )


def run_per_row_pipeline(bench: BenchModel, rows: BenchRows, max_new_tokens: int, ledger_path: str) -> VariantResult:
    """(c): the hand-written one-row-at-a-time pipeline UDF on the engine's prompt text."""
    generate = per_row_pipeline_udf(bench.model_path, bench.tokenizer_path, max_new_tokens, ledger_path)

    def plan(df: DataFrame) -> DataFrame:
        return df.select("ticket_id", generate(F.col("prompt")).alias("out")).select("ticket_id", "out.*")

    loads_before = count_loads(ledger_path)
    _, warm_seconds = _timed(plan(rows.warm_df).collect)
    loads_after_warmup = count_loads(ledger_path)
    timed_plan = plan(rows.df)
    collected, seconds = _timed(timed_plan.collect)
    loads_after = count_loads(ledger_path)
    with open(ledger_path, encoding="utf-8") as ledger:
        worker_loads = [line.strip() for line in ledger if line.strip()]
    return VariantResult(
        PIPELINE, len(collected), seconds,
        prompt_tokens=sum(r["prompt_tokens"] for r in collected),
        generated_tokens=sum(r["generated_tokens"] for r in collected), token_counts_from="pipeline token ids",
        warmup_seconds=warm_seconds, loads_warmup=loads_after_warmup - loads_before,
        loads_timed=loads_after - loads_after_warmup,
        error_rows=sum(1 for r in collected if not r["text"].strip()),
        extra={"worker_loads": worker_loads},
        per_row={r["ticket_id"]: (r["text"], r["generated_tokens"]) for r in collected},
    )


def reconcile_mlflow_counts(mlflow_result: VariantResult, pipeline_result: VariantResult, tokenizer: Any) -> None:
    """Give (b) exact generated-token counts where it provably generated what (c) did.

    MLflow returns text only. (b) and (c) run the same pipeline class on the same model, prompt
    text and settings, greedy, so a row whose text is identical in both generated the same
    tokens, and (c) counted those exactly; only rows whose texts differ are re-tokenized.
    (Without do_sample=False stored in the model, the pipeline would sample and no row would
    match: see dolly_spark.lifecycle.registry.log_and_register.)
    """
    total, same = 0, 0
    for key, (text, _) in mlflow_result.per_row.items():
        reference = pipeline_result.per_row.get(key)
        # MLflow strips the whitespace around a completion; the tokens behind it are the same.
        if reference is not None and reference[0].strip() == text.strip():
            total += reference[1]
            same += 1
        else:
            total += _count_tokens(tokenizer, [text])
    mlflow_result.generated_tokens = total
    # The same pipeline tokenized the same prompt text (bench_models.mlflow_input_for checks the
    # text), so (c)'s exact prompt count is (b)'s too.
    mlflow_result.prompt_tokens = pipeline_result.prompt_tokens
    mlflow_result.token_counts_from = (
        "pipeline token ids" if same == len(mlflow_result.per_row) else f"(c)'s counts for {same} rows, re-tokenized for the rest")
    mlflow_result.extra["rows_with_same_text_as_per_row_pipeline"] = f"{same}/{len(mlflow_result.per_row)}"


def run_bare_engine(engine: Any, rows: BenchRows, request: Request, arrow_batch_rows: int,
                    instruction: str = INSTRUCTION, variant: str = ENGINE) -> VariantResult:
    """(d): the engine (either engine) in this process on all rows in one run, after a warm-up
    run; padding and micro-batches are checked for the "hf" engine only."""
    _, warm_seconds = _timed(lambda: engine.run(Rows([instruction] * len(rows.warm_bodies), rows.warm_bodies),
                                                request))
    before = copy.deepcopy(engine.stats)
    results, seconds = _timed(lambda: engine.run(Rows([instruction] * len(rows.bodies), rows.bodies), request))
    stats = _counted_since(before, engine.stats)  # the timed run only
    batching = {}
    if engine.name == "hf":
        # The same replay that gives (a) its padding waste and micro-batches, checked here
        # against the real counters.
        replayed, work = replay(single_run_rows(results), request.max_new_tokens, engine.config, len(results))
        batching = {"micro_batches": stats.micro_batches, "micro_batch_work": work,
                    "padding_replay_matches_engine_stats": (
                        abs(replayed.padding_waste - stats.padding_waste) < 1e-9
                        and replayed.micro_batches == stats.micro_batches
                        and replayed.generated_slots == stats.generated_slots)}
    prefill_seconds = first_token_seconds(engine, rows.bodies, request, instruction)
    return VariantResult(
        variant, len(results), seconds,
        prompt_tokens=sum(r.prompt_tokens for r in results),
        generated_tokens=sum(r.completion_tokens for r in results), token_counts_from="engine",
        warmup_seconds=warm_seconds, loads_warmup=0, loads_timed=0,
        padding_waste=stats.padding_waste if engine.name == "hf" else None,
        error_rows=sum(1 for r in results if r.error),
        extra={**batching, "generate_seconds": stats.generate_seconds,
               "finish_reasons": _histogram(r.finish_reason for r in results),
               "loads_note": "loaded once in the driver before the warm-up",
               "phases": _phases(prefill_seconds, seconds, [(r.prompt_tokens, r.completion_tokens) for r in results])},
    )


def _counted_since(before: EngineStats, after: EngineStats) -> EngineStats:
    """The counters ``after`` added since ``before`` (a copy taken earlier): new list entries and
    the growth of each number. The engine keeps counting into its stats object, which its parts
    may hold too, so it is read, never replaced."""
    counted = {}
    for item in fields(after):
        old, new = getattr(before, item.name), getattr(after, item.name)
        counted[item.name] = new[len(old):] if isinstance(new, list) else new - old
    return type(after)(**counted)


def first_token_seconds(engine: InstructionEngine, bodies: list[str], request: Request,
                        instruction: str = INSTRUCTION) -> float:
    """Seconds of the same rows again with max_new_tokens=1 (the prompts' prefill and the first
    token) on the same engine."""
    first_token_only = replace(request, max_new_tokens=1)
    _, seconds = _timed(lambda: engine.run(Rows([instruction] * len(bodies), bodies), first_token_only))
    return seconds


def _phases(prefill_seconds: float, seconds: float, tokens: list[tuple[int, int]]) -> dict[str, Any]:
    """Where a run's time went, from a max_new_tokens=1 run of the same rows: that run's time
    prefilled the answered rows' prompts (and gave their first tokens); the rest of the run's
    time decoded the other tokens. ``tokens``: (prompt, completion) tokens per row."""
    answered = [(prompt, completion) for prompt, completion in tokens if completion]
    return {"prefill_seconds": prefill_seconds, "prefill_tokens": sum(prompt for prompt, _ in answered),
            "decode_seconds": seconds - prefill_seconds,
            "decode_tokens": sum(completion - 1 for _, completion in answered)}


def probe_worker_threads(spark: SparkSession, partitions: int = 2) -> list[dict[str, Any]]:
    """The torch thread count and OMP_NUM_THREADS each Spark Python worker runs with."""
    import pandas as pd

    def probe(batches):
        import os

        import torch

        for _ in batches:
            time.sleep(0.5)  # hold the worker so the other task starts its own, concurrently
            yield pd.DataFrame({"pid": [os.getpid()], "torch_threads": [torch.get_num_threads()],
                                "omp_num_threads": [os.environ.get("OMP_NUM_THREADS", "")]})

    frame = spark.range(0, partitions, 1, numPartitions=partitions)  # one row in each partition
    rows = frame.mapInPandas(probe, "pid long, torch_threads int, omp_num_threads string").collect()
    return [row.asDict() for row in rows]


# --------------------------------------------------------------------------------------------
def _completion(text: str | None, prompt: str) -> str:
    """The generated part of an MLflow answer: without a prompt template MLflow returns the
    prompt followed by the completion."""
    text = text or ""
    return text[len(prompt):] if text.startswith(prompt) else text


def _count_tokens(tokenizer: Any, texts: list[str]) -> int:
    return sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts)


def _histogram(values) -> dict[str, int]:
    counts: dict[str, int] = {}
    for value in values:
        counts[str(value)] = counts.get(str(value), 0) + 1
    return counts
