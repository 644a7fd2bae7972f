"""python -m benchmarks.estimate_accuracy [--cases hf:2:2,vllm:2:2,hf:1:2] [--max-new-tokens 48]

Whether the summarize job's estimate holds, on the demo model and the 40 sample tickets. A case
is engine:slots it learns on:slots it estimates; for each, a dry run with no history (its rate
from a calibration), the run it learns from, a dry run for a new target on the slots estimated
(its rate from that run, in MLflow), and that run. Every dry run and run is a process of its own
with a cold Spark session, local[slots] (a scheduled job starts cold), in one project home and
MLflow under the benchmark's home. Writes results/estimate_accuracy.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from typing import Any, Sequence

from benchmarks.bench_models import bench_home
from benchmarks.report import write_results
from benchmarks.run_all import REPO_ROOT, RESULTS_DIR

SOURCE = "support_tickets"
MODEL_NAME = "support_dolly"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.estimate_accuracy",
                                     description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--cases", default="hf:2:2,vllm:2:2,hf:1:2",
                        help="comma-separated engine:learn_slots:estimated_slots")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="the demo's summary length")
    parser.add_argument("--phase", choices=("dry", "run"), help=argparse.SUPPRESS)  # one step, in its own process
    parser.add_argument("--engine", help=argparse.SUPPRESS)
    parser.add_argument("--slots", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--instruction", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def phase(args: argparse.Namespace) -> dict[str, Any]:
    """One dry run or run on local[slots], cold; its figures."""
    import mlflow

    from dolly_spark.batch.demo import ensure_demo_model_registered, ensure_sample_tickets_table
    from dolly_spark.batch.summarize import SummarizeConfig, dry_run, run_summarize
    from dolly_spark.lifecycle.tracking import configure_mlflow
    from dolly_spark.spark.sessions import get_spark

    configure_mlflow("dolly_spark_estimate_accuracy")
    spark = get_spark("dolly_spark-estimate", master=f"local[{args.slots}]", ui=False, shuffle_partitions=args.slots,
                      extra_conf={"spark.default.parallelism": str(args.slots)})
    ensure_sample_tickets_table(spark, SOURCE)
    ensure_demo_model_registered(MODEL_NAME)
    config = SummarizeConfig(source_table=SOURCE, target_table=args.target, instruction=args.instruction,
                             max_new_tokens=args.max_new_tokens, engine=args.engine,
                             experiment="dolly_spark_estimate_accuracy")
    try:
        if args.phase == "dry":
            estimate = dry_run(spark, config)
            return {"seconds": estimate.seconds, "engine": estimate.engine, "rows": estimate.rows_this_run,
                    "rate_source": estimate.rate_source, "table": estimate.table()}
        report = run_summarize(spark, config)
        run = mlflow.last_active_run()
        metrics = run.data.metrics if run is not None else {}
        return {"seconds": report.wall_seconds, "rows": report.rows_written, "engines": report.rows_by_engine,
                **{name: metrics.get(name) for name in ("fixed_seconds", "load_seconds", "generate_seconds",
                                                         "generate_slot_seconds")}}
    finally:
        spark.stop()


def run_phase(args: argparse.Namespace, name: str, engine: str, slots: int, target: str, instruction: str) -> dict:
    command = [sys.executable, "-m", "benchmarks.estimate_accuracy", "--phase", name, "--engine", engine,
               "--slots", str(slots), "--target", target, "--instruction", instruction,
               "--max-new-tokens", str(args.max_new_tokens)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    env["DOLLY_SPARK_HOME"] = str(bench_home() / "estimate")
    done = subprocess.run(command, env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(command)} failed:\n{done.stderr[-4000:]}")
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {name} {engine} on {slots} slots -> {target}: {figures['seconds']}", flush=True)
    return figures


def run_case(args: argparse.Namespace, case: str) -> dict[str, Any]:
    """A case's four steps; every case its own instruction, so no case learns from another."""
    engine, learn_slots, slots = case.split(":")
    tag = f"{engine}_{learn_slots}_{slots}_{datetime.now(timezone.utc):%H%M%S}"
    instruction = f"Summarize this customer support ticket in one or two sentences ({tag})."
    learn, check = f"estimate_learn_{tag}", f"estimate_check_{tag}"
    result = {"case": case, "engine": engine, "learn_slots": int(learn_slots), "slots": int(slots)}
    result["calibrated"] = run_phase(args, "dry", engine, int(learn_slots), learn, instruction)
    result["learned_run"] = run_phase(args, "run", engine, int(learn_slots), learn, instruction)
    result["from_history"] = run_phase(args, "dry", engine, int(slots), check, instruction)
    result["checked_run"] = run_phase(args, "run", engine, int(slots), check, instruction)
    return result


def report_text(results: list[dict[str, Any]], max_new_tokens: int) -> str:
    lines = [f"# The summarize estimate against the run it estimates ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} "
             f"UTC)", "", f"Demo model, 40 sample tickets, max_new_tokens {max_new_tokens}; every step a cold "
             "process. Estimated and real seconds of the run's wall time.", "",
             "| engine | learned on | estimated for | calibration: estimate / run | history: estimate / run | "
             "learned run's fixed s (load) | generate slot-s per ticket |", "|---|---|---|---|---|---|---|"]
    for r in results:
        learned = r["learned_run"]
        lines.append(
            f"| {r['calibrated']['engine']} | {r['learn_slots']} slots | {r['slots']} slots | "
            f"{r['calibrated']['seconds']:.1f} / {learned['seconds']:.1f} | "
            f"{r['from_history']['seconds']:.1f} / {r['checked_run']['seconds']:.1f} | "
            f"{learned['fixed_seconds']:.1f} ({learned['load_seconds']:.1f}) | "
            f"{learned['generate_slot_seconds'] / max(1, learned['rows']):.2f} |")
    for r in results:
        lines += ["", f"## {r['case']}: the dry run from history", "", "```", r["from_history"]["table"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.phase:
        print(json.dumps(phase(args), default=str))
        return 0
    results, failed = [], []
    for case in args.cases.split(","):
        print(f"case {case}", flush=True)
        try:
            results.append(run_case(args, case))
        except RuntimeError as error:  # one case's failure (a worker killed for memory) leaves the others'
            print(error, file=sys.stderr)
            failed.append({"case": case, "error": str(error)[-2000:]})
        md, _ = write_results(RESULTS_DIR, "estimate_accuracy", {"cases": results, "failed": failed},
                              report_text(results, args.max_new_tokens))
    print(md.read_text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
