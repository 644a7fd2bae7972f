"""python -m benchmarks.job_scale [--sizes 8000,24000,80000] [--chunk-rows 5000] [--max-new-tokens 4]

The summarize job at growing sizes, to show that its cost grows with the rows and nothing else:
one read of the source per run whatever the size, one MERGE per chunk, and wall time linear in
the rows. Each size gets its own source table of short synthetic tickets and a new target; the
job runs as ``run_summarize`` in one local[2] session on the benchmark's tiny model, then once
more unchanged (which must find nothing to do). Writes benchmarks/results/job_scale.md and
job_scale.json.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Sequence

from benchmarks.report import write_results
from benchmarks.run_all import PARTITIONS, RESULTS_DIR, start_spark

log = logging.getLogger("benchmarks.job_scale")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.job_scale", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--sizes", default="8000,24000,80000", help="comma-separated ticket counts, one run each")
    parser.add_argument("--chunk-rows", type=int, default=5000, help="the job's chunk_rows")
    parser.add_argument("--max-new-tokens", type=int, default=4, help="tokens generated per ticket, at most")
    parser.add_argument("--max-body-tokens", type=int, default=40, help="the longest synthetic ticket body")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tickets and of the tiny model")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where job_scale.md and .json go")
    args = parser.parse_args(argv)
    args.sizes = sorted(int(size) for size in args.sizes.split(",") if size.strip())
    return args


def run_size(spark, model_uri: str, rows: int, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    """One size: a new source and target, the job once, then once more unchanged."""
    from delta.tables import DeltaTable

    from benchmarks.workload import generate_tickets
    from dolly_spark.batch.summarize import SummarizeConfig, run_summarize
    from dolly_spark.testing.table_scans import TableScans

    source, target = f"scale_tickets_{rows}", f"scale_summaries_{rows}"
    tickets = generate_tickets(rows, seed, max_body_tokens=args.max_body_tokens)
    spark.createDataFrame(tickets, "ticket_id STRING, body STRING").write.format("delta").mode("overwrite") \
        .saveAsTable(source)
    spark.sql(f"DROP TABLE IF EXISTS {target}")
    config = SummarizeConfig(source_table=source, target_table=target, model_uri=model_uri,
                             max_new_tokens=args.max_new_tokens, chunk_rows=args.chunk_rows, partitions=PARTITIONS,
                             experiment="dolly_spark_bench")
    entry: dict[str, Any] = {"rows": rows}
    for run in ("first", "rerun"):
        scans = TableScans(spark)
        version_before = _version(spark, target)
        started = time.perf_counter()
        report = run_summarize(spark, config)
        seconds = time.perf_counter() - started
        merges = [row for row in DeltaTable.forName(spark, target).history().collect()
                  if row["operation"] == "MERGE" and row["version"] > version_before]
        entry[run] = {
            "wall_seconds": round(seconds, 2), "rows_written": report.rows_written, "chunks": report.chunks,
            "rows_per_second": round(report.rows_written / seconds, 1), "errors": report.errors,
            "source_scans": scans.count(source), "target_scans": scans.count(target), "merge_commits": len(merges),
        }
        log.info("%d tickets, %s run: %s", rows, run, entry[run])
    spark.sql(f"DROP TABLE IF EXISTS {target}")
    spark.sql(f"DROP TABLE IF EXISTS {source}")
    return entry


def _version(spark, table: str) -> int:
    from dolly_spark.spark.tables import delta_version, table_exists

    return delta_version(spark, table) if table_exists(spark, table) else -1


def markdown(report: dict[str, Any]) -> str:
    lines = [f"# The summarize job at scale ({report['generated_at']})", "",
             f"Tiny model, {report['settings']['max_new_tokens']} new tokens, chunk_rows "
             f"{report['settings']['chunk_rows']}, {report['spark_master']}, {report['cpu']}.", "",
             "| tickets | chunks | wall (s) | rows/s | source scans | target scans | MERGE commits | "
             "rerun wall (s) | rerun source scans | rerun MERGE commits |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for entry in report["sizes"]:
        first, rerun = entry["first"], entry["rerun"]
        lines.append(f"| {entry['rows']} | {first['chunks']} | {first['wall_seconds']} | {first['rows_per_second']} | "
                     f"{first['source_scans']} | {first['target_scans']} | {first['merge_commits']} | "
                     f"{rerun['wall_seconds']} | {rerun['source_scans']} | {rerun['merge_commits']} |")
    scaling = report["scaling"]
    lines += ["", f"Largest / smallest: {scaling['row_ratio']:.1f}x the rows in {scaling['time_ratio']:.2f}x the "
              f"time ({scaling['time_over_rows']:.2f} of the row ratio; the goal is at most 1.3)."]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    for name in ("benchmarks", "dolly_spark.batch.progress"):
        logging.getLogger(name).setLevel(logging.INFO)
    started = time.perf_counter()

    from benchmarks.bench_models import configure_bench_mlflow, prepare_model
    from benchmarks.machine import cpu_model

    configure_bench_mlflow()
    spark = start_spark()
    model = prepare_model("tiny", args.seed)
    # Python workers start and load the model in a run of their own, outside the timed ones.
    run_size(spark, model.uri, 20 * PARTITIONS, args, seed=args.seed + 1)
    sizes = [run_size(spark, model.uri, rows, args, seed=args.seed) for rows in args.sizes]
    smallest, largest = sizes[0], sizes[-1]
    row_ratio = largest["rows"] / smallest["rows"]
    time_ratio = largest["first"]["wall_seconds"] / smallest["first"]["wall_seconds"]
    report = {
        "generated_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - started, 1),
        "spark_master": spark.sparkContext.master,
        "cpu": cpu_model(),
        "model_uri": model.uri,
        "settings": {"chunk_rows": args.chunk_rows, "max_new_tokens": args.max_new_tokens,
                     "max_body_tokens": args.max_body_tokens, "seed": args.seed},
        "sizes": sizes,
        "scaling": {"row_ratio": row_ratio, "time_ratio": time_ratio, "time_over_rows": time_ratio / row_ratio},
    }
    text = markdown(report)
    write_results(args.out_dir, "job_scale", report, text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
