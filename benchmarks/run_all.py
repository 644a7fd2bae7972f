"""python -m benchmarks.run_all [--rows 32] [--max-new-tokens 32] [--models tiny,demo] [--seed 0]

Side-by-side throughput of one registered model over the same rows, in one Spark session
(local[2], UI off): (a) apply_instruction, (b) mlflow.pyfunc.spark_udf at several pipeline batch
sizes, (c) a hand-written per-row pipeline UDF, (d) the bare engine in the driver; with
--long-instruction, (a) and (d) again with a long instruction. Writes a markdown table to stdout
and benchmarks/results/latest.md, and the figures to benchmarks/results/latest.json. See
benchmarks/README.md for what each figure means.
"""
from __future__ import annotations

import argparse
import gc
import logging
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
PARTITIONS = 2  # one per core of local[2]

log = logging.getLogger("benchmarks")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run_all", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--rows", type=int, default=32, help="tickets per model")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True,
                        help="also time (a) with dtype=bfloat16, reported beside the fp32 comparison")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens generated per row, at most (greedy)")
    parser.add_argument("--models", default="tiny,demo", help="comma-separated: tiny, demo")
    parser.add_argument("--seed", type=int, default=0, help="seed of the workload and of the tiny model")
    parser.add_argument("--warmup-rows", type=int, default=4, help="rows each variant runs before its timed run")
    parser.add_argument("--token-budget", type=int, default=16384,
                        help="engine micro-batch token budget, for (a) and (d) (the package default)")
    parser.add_argument("--max-batch-rows", type=int, default=64, help="engine micro-batch row cap, for (a) and (d)")
    parser.add_argument("--mlflow-batch-sizes", default="1,8,16",
                        help="comma-separated pipeline batch sizes for (b); a/b is taken against the fastest")
    parser.add_argument("--long-instruction", action=argparse.BooleanOptionalAction, default=True,
                        help="also run (a) and (d) with the workload's long instruction (about 150 tokens)")
    parser.add_argument("--vllm", action=argparse.BooleanOptionalAction, default=True,
                        help="also run (a) and (d) with engine=vllm (vLLM's CPU backend on a CPU)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where latest.md and latest.json go")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    try:
        args.mlflow_batch_sizes = sorted({int(b) for b in args.mlflow_batch_sizes.split(",") if b.strip()})
    except ValueError:
        parser.error("--mlflow-batch-sizes takes integers, such as 1,8,16")
    if not args.mlflow_batch_sizes or min(args.mlflow_batch_sizes) < 1:
        parser.error("--mlflow-batch-sizes needs at least one batch size, each at least 1")
    if args.rows < PARTITIONS or args.warmup_rows < PARTITIONS:
        parser.error(f"--rows and --warmup-rows must be at least {PARTITIONS}, one per partition")
    return args


def start_spark():
    """The benchmark's one Spark session: local[2], UI off, its metastore and warehouse under the
    benchmark's home so it never contends with the demo's Derby metastore."""
    from benchmarks.bench_models import bench_home
    from dolly_spark.spark.sessions import get_spark

    # Workers unpickle the per-row UDF by importing benchmarks.per_row_pipeline; Spark passes
    # the JVM's PYTHONPATH on to them, so the repository must be on it before the JVM starts.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    home = bench_home()
    return get_spark(
        app_name="dolly_spark-bench", master=f"local[{PARTITIONS}]", ui=False, shuffle_partitions=PARTITIONS,
        extra_conf={
            "spark.default.parallelism": str(PARTITIONS),
            "spark.sql.session.timeZone": "UTC",
            "spark.sql.warehouse.dir": str(home / "warehouse"),
            "spark.hadoop.javax.jdo.option.ConnectionURL": f"jdbc:derby:;databaseName={home / 'metastore_db'};create=true",
        },
    )


def build_rows(spark, tickets: list[tuple[str, str]], warm: list[tuple[str, str]], engine, template):
    """The same tickets as lists (for the engine) and as a cached 2-partition DataFrame with the
    engine's prompt text and MLflow's input text per row (for the Spark variants)."""
    from benchmarks.bench_models import mlflow_input_for
    from benchmarks.variants import BenchRows
    from benchmarks.workload import INSTRUCTION

    def frame(items: list[tuple[str, str]]):
        data = []
        for ticket_id, body in items:
            prompt = engine.format.prompt(INSTRUCTION, body)
            data.append((ticket_id, body, prompt, mlflow_input_for(prompt, template)))
        df = spark.createDataFrame(data, "ticket_id string, body string, prompt string, mlflow_input string")
        df = df.repartition(PARTITIONS).cache()
        df.count()  # materialise, so no variant pays for the shuffle
        return df, [p for _, _, p, _ in data]

    df, prompts = frame(tickets)
    warm_df, _ = frame(warm)
    return BenchRows([b for _, b in tickets], prompts, df, [b for _, b in warm], warm_df)


def prompt_token_stats(engine, instruction: str, bodies: list[str]) -> dict[str, float]:
    """Min, max and mean prompt tokens of ``bodies`` with ``instruction``."""
    lengths = [len(engine.tokenizer(engine.format.prompt(instruction, body), add_special_tokens=False)["input_ids"])
               for body in bodies]
    return {"min": min(lengths), "max": max(lengths), "mean": statistics.mean(lengths)}


def run_model(spark, key: str, args: argparse.Namespace, machine: dict[str, Any], ledger_dir: str,
              tap=None) -> dict[str, Any]:
    """All variants of one model on the same registered version and the same rows. ``tap`` (a
    ``StderrTap`` that sees the workers' stderr) counts (a)'s model loads; without it they are
    not counted."""
    from benchmarks import variants
    from benchmarks.bench_models import (mlflow_input_for, parameter_counts, pipeline_batch_check, prepare_model,
                                         register_batched_pyfunc)
    from benchmarks.report import model_entry
    from benchmarks.stderr_tap import load_prefix
    from benchmarks.workload import INSTRUCTION, LONG_INSTRUCTION, generate_tickets
    import torch

    from dolly_spark.inference.engine import InstructionEngine
    from dolly_spark.inference.engines import EngineConfig, engine_class
    from dolly_spark.request import Request
    from dolly_spark.spark.sessions import ARROW_BATCH_CONF

    bench = prepare_model(key, args.seed)
    log.info("%s: %s (format %s)", key, bench.uri, bench.prompt_format)
    request = Request(max_new_tokens=args.max_new_tokens, require_input=True)
    config = EngineConfig(engine="hf", token_budget=args.token_budget, max_batch_rows=args.max_batch_rows)
    # The driver's engine: variant (d), and the tokenizer and prompt format every variant shares.
    engine = InstructionEngine.from_pretrained(bench.model_path, bench.tokenizer_path, bench.spec.prompt_format,
                                               config)
    tickets = generate_tickets(args.rows, args.seed)
    warm = generate_tickets(args.warmup_rows, args.seed + 1)
    rows = build_rows(spark, tickets, warm, engine, bench.prompt_template)
    arrow_batch_rows = int(spark.conf.get(ARROW_BATCH_CONF))
    # The lines (a)'s workers print for each load of this version, seen so far.
    loads = tap.counter(load_prefix(bench.spec.name, bench.spec.version)) if tap is not None else None

    results = {}
    log.info("%s: (a) apply_instruction", key)
    results[variants.APPLY] = variants.run_apply_instruction(bench, rows, request, config, arrow_batch_rows,
                                                             loads=loads)
    if args.bf16:
        log.info("%s: (a) apply_instruction, dtype=bfloat16", key)
        results[variants.APPLY_BF16] = variants.run_apply_instruction(bench, rows, request, config, arrow_batch_rows,
                                                                      dtype="bfloat16", variant=variants.APPLY_BF16,
                                                                      loads=loads)
    batched = [b for b in args.mlflow_batch_sizes if b > 1]
    batched_uri = register_batched_pyfunc(bench) if batched else None
    for batch_size in args.mlflow_batch_sizes:
        log.info("%s: (b) mlflow.pyfunc.spark_udf, pipeline batch_size %d", key, batch_size)
        results[variants.mlflow_variant(batch_size)] = variants.run_mlflow_spark_udf(
            spark, bench, rows, args.max_new_tokens, engine.tokenizer, batch_size,
            batched_uri if batch_size > 1 else None)
    log.info("%s: (c) per-row pipeline UDF", key)
    ledger = os.path.join(ledger_dir, f"{key}-pipeline-loads.log")
    results[variants.PIPELINE] = variants.run_per_row_pipeline(bench, rows, args.max_new_tokens, ledger)
    for batch_size in args.mlflow_batch_sizes:
        variants.reconcile_mlflow_counts(results[variants.mlflow_variant(batch_size)], results[variants.PIPELINE],
                                         engine.tokenizer)
    log.info("%s: (d) bare engine", key)
    results[variants.ENGINE] = variants.run_bare_engine(engine, rows, request, arrow_batch_rows)
    if args.long_instruction:
        log.info("%s: (a) and (d) with the long instruction", key)
        results[variants.APPLY_LONG] = variants.run_apply_instruction(
            bench, rows, request, config, arrow_batch_rows, instruction=LONG_INSTRUCTION, variant=variants.APPLY_LONG,
            loads=loads)
        results[variants.ENGINE_LONG] = variants.run_bare_engine(
            engine, rows, request, arrow_batch_rows, instruction=LONG_INSTRUCTION, variant=variants.ENGINE_LONG)
    if args.vllm:
        # Last: vLLM runs a GPT-NeoX through transformers' own classes, which it rewires in the
        # process that loads it; nothing of this model runs on the "hf" engine after it.
        log.info("%s: (a) apply_instruction, engine=vllm", key)
        results[variants.APPLY_VLLM] = variants.run_apply_instruction(
            bench, rows, request, config, arrow_batch_rows, variant=variants.APPLY_VLLM, loads=loads, engine="vllm")
        log.info("%s: (d) bare engine, engine=vllm", key)
        vllm = engine_class("vllm").from_pretrained(bench.model_path, bench.tokenizer_path, bench.spec.prompt_format,
                                                    replace(config, engine="vllm"))
        results[variants.ENGINE_VLLM] = variants.run_bare_engine(vllm, rows, request, arrow_batch_rows,
                                                                 variant=variants.ENGINE_VLLM)
        del vllm

    meta = {
        "default_precision": "bf16" if engine.model.dtype == torch.bfloat16 else "fp32",
        "model": key, "model_uri": bench.uri, "registered_name": bench.spec.name, "version": bench.spec.version,
        "prompt_format": bench.prompt_format, "rows": args.rows, "partitions": PARTITIONS,
        "max_new_tokens": args.max_new_tokens, "mlflow_model_uri": bench.uri,
        "parameters": parameter_counts(engine.model),
        "prompt_tokens": prompt_token_stats(engine, INSTRUCTION, rows.bodies),
    }
    if args.long_instruction:
        meta["prompt_tokens_long_instruction"] = prompt_token_stats(engine, LONG_INSTRUCTION, rows.bodies)
    if batched_uri:
        # The shortest rows: the check is about how rows are batched, not about their length.
        shortest = [mlflow_input_for(prompt, bench.prompt_template)
                    for prompt in sorted(rows.prompts, key=len)[:max(batched)]]
        meta["mlflow_batched_model_uri"] = batched_uri
        meta["mlflow_pipeline_batch_check"] = pipeline_batch_check(batched_uri, shortest, batched)
    rows.df.unpersist()
    rows.warm_df.unpersist()
    del engine
    gc.collect()
    return model_entry(meta, results, machine)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    log.setLevel(logging.INFO)
    started = time.perf_counter()

    from benchmarks.bench_models import configure_bench_mlflow, describe_registry
    from benchmarks.machine import measure_machine
    from benchmarks.report import markdown, write_reports
    from benchmarks.stderr_tap import StderrTap, worker_stderr_reaches
    from benchmarks.variants import probe_worker_threads

    # Measured first, before the JVM and the models are up, so nothing else competes with it.
    log.info("measuring the matmul peak and the read bandwidth")
    machine = measure_machine(worker_precisions=("fp32", "bf16") if args.bf16 else ("fp32",))
    configure_bench_mlflow()
    # Before the JVM starts, so it inherits the tapped stderr: the Python workers' load lines
    # come through it (benchmarks/stderr_tap.py).
    tap = StderrTap().start()
    try:
        spark = start_spark()
        machine["spark_workers"] = probe_worker_threads(spark, PARTITIONS)
        loads_counted = worker_stderr_reaches(spark, tap, PARTITIONS)
        if not loads_counted:
            log.warning("the Python workers' stderr does not reach this process: (a)'s model loads are not counted")
        entries = []
        with tempfile.TemporaryDirectory(prefix="dolly-bench-") as ledger_dir:
            for key in args.models:
                entries.append(run_model(spark, key, args, machine, ledger_dir, tap if loads_counted else None))
    finally:
        tap.close()
    report = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": time.perf_counter() - started,
        "spark_master": spark.sparkContext.master,
        # Whether (a)'s model loads were counted from the workers' load lines.
        "worker_loads_counted": loads_counted,
        "settings": {"rows": args.rows, "max_new_tokens": args.max_new_tokens, "seed": args.seed,
                     "warmup_rows": args.warmup_rows, "token_budget": args.token_budget,
                     "max_batch_rows": args.max_batch_rows, "models": args.models, "bf16": args.bf16,
                     "mlflow_batch_sizes": args.mlflow_batch_sizes, "long_instruction": args.long_instruction,
                     "vllm": args.vllm},
        "registry": describe_registry(),
        "machine": machine,
        "models": entries,
    }
    md_path, json_path = write_reports(report, args.out_dir)
    print(markdown(report))
    print(f"\nwrote {md_path} and {json_path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
