"""The ``dolly-spark`` command and the jobs' entry points: parse arguments, call one library function.

    dolly-spark summarize --config conf/summarize_tickets.yaml [--source-table ... ]
    dolly-spark finetune  --config conf/finetune.yaml [--base-model ... --train-data ...]
    dolly-spark evaluate  --config conf/evaluate_and_promote.yaml
    dolly-spark demo      the summarize and triage jobs on the embedded default, with previews
    dolly-spark setup-spark  resolve Delta Lake's jars once and put them into this environment's Spark
                             conf, so that sessions and `spark-submit jobs/...` start from local jars
"""
from __future__ import annotations

import logging
import sys
import time
from typing import Sequence

from dolly_spark.job_config import load_config

# Short summaries keep the demo to a couple of minutes on a laptop CPU; flags given to
# `dolly-spark demo` come later on the command line and override these.
DEMO_FLAGS = ["--max-new-tokens", "48"]


def _start_job(config_cls, argv: Sequence[str] | None, prog: str, description: str):
    """Parse the job's config (defaults < YAML < flags), set up logging and MLflow; return the config.
    Parsed first: ``--help`` and a bad flag are answered before MLflow is imported."""
    config = load_config(config_cls, argv, prog, description)
    from dolly_spark.lifecycle.tracking import configure_mlflow

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("py4j", "urllib3", "alembic", "mlflow.store", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    configure_mlflow(config.experiment)
    return config


def summarize_main(argv: Sequence[str] | None = None) -> int:
    """spark-submit jobs/summarize_tickets.py: summarize new tickets into the target table."""
    from dolly_spark.batch.summarize import SummarizeConfig, dry_run, run_summarize
    from dolly_spark.spark.sessions import get_spark

    config = _start_job(SummarizeConfig, argv, "summarize_tickets",
                        "Summarize support tickets from a Delta table into another, incrementally.")
    if config.dry_run:
        print(f"dry run: nothing is written to {config.target_table}\n{dry_run(get_spark('summarize_tickets'), config).table()}")
        return 0
    report = run_summarize(get_spark("summarize_tickets"), config)
    print(_report_line(report, "triaged" if config.choices or config.schema else "summarized"))
    return 0


def _report_line(report, verb: str = "summarized") -> str:
    left = f"; {report.rows_left} more left pending for the next run (over the cap)" if report.rows_left else ""
    return (f"{report.rows_written} tickets {verb} with {report.model_name} v{report.model_version} "
            f"({report.errors} errors, {report.generated_tokens} tokens, {report.tokens_per_second:.1f} tokens/s, "
            f"{report.wall_seconds:.1f}s){left}")


def demo_main(argv: Sequence[str] | None = None) -> int:
    """The main job on the embedded default: local Spark and Delta, the local registry, the demo
    model. Summarizes the sample tickets, then triages them (a scored category and extracted
    fields) into the demo's triage table."""
    from dolly_spark.batch.demo import (DEMO_TRIAGE_TABLE, ensure_demo_model_registered, ensure_sample_tickets_table,
                                  triage_accuracy, triage_config)
    from dolly_spark.batch.preview import preview
    from dolly_spark.batch.summarize import SummarizeConfig, run_summarize
    from dolly_spark.spark.sessions import get_spark

    started = time.perf_counter()
    config = _start_job(SummarizeConfig, [*DEMO_FLAGS, *(argv or [])],
                        "dolly-spark demo", "Summarize and triage the sample tickets with the demo model, all local.")
    spark = get_spark("dolly_spark-demo")
    ensure_sample_tickets_table(spark, config.source_table)
    name = config.model_uri.removeprefix("models:/").split("@")[0].split("/")[0]
    ensure_demo_model_registered(name)
    report = run_summarize(spark, config)
    print("\n" + _report_line(report))
    print(f"\n{config.target_table} (first rows):\n{preview(spark, config)}")

    triage = triage_config(config)
    triaged = run_summarize(spark, triage)
    print("\n" + _report_line(triaged, "triaged"))
    print(f"\n{DEMO_TRIAGE_TABLE} (first rows: label (probability) | extracted fields):\n{preview(spark, triage)}")
    matches, labelled = triage_accuracy(spark, triage)
    print(f"\nlabels matching the sample tickets' hand-written ones: {matches} of {labelled}")
    print(f"\ndemo finished in {time.perf_counter() - started:.1f}s")
    return 0


def finetune_main(argv: Sequence[str] | None = None) -> int:
    """spark-submit jobs/finetune.py: fine-tune, register a new version, alias it challenger."""
    from dolly_spark.training.configs import FinetuneConfig

    config = _start_job(FinetuneConfig, argv, "finetune",
                        "Fine-tune an instruction model Dolly-style and register it as a new version.")
    from dolly_spark.training.finetune import run_finetune

    report = run_finetune(config)
    print(f"registered {report.model_name} version {report.version} as @{config.alias} "
          f"({report.train_records} train / {report.eval_records} eval examples, skipped {report.skipped}, "
          f"{report.train_seconds:.1f}s training)")
    headline = [f"{stage}_{name}" for stage in ("before", "after")
                for name in ("eval_loss", "rouge_l", "exact_match", "stop_rate")]
    print(", ".join(f"{key}={report.metrics[key]:.4f}" for key in headline + ["train_loss"] if key in report.metrics))
    if "rouge_l_gain" in report.metrics:
        gain = report.metrics
        print(f"ROUGE-L gain over the base in its own format: {gain['rouge_l_gain']:+.4f} "
              f"(95% bootstrap interval {gain['rouge_l_gain_low']:+.4f} to {gain['rouge_l_gain_high']:+.4f})")
    return 0


def evaluate_main(argv: Sequence[str] | None = None) -> int:
    """spark-submit jobs/evaluate_and_promote.py: score challenger vs champion, promote on a win."""
    from dolly_spark.training.configs import EvaluateConfig

    config = _start_job(EvaluateConfig, argv, "evaluate_and_promote",
                        "Evaluate the challenger against the champion and promote it when it wins.")
    from dolly_spark.training.evaluate import run_evaluate_and_promote

    report = run_evaluate_and_promote(config)
    champion = f"v{report.champion_version} {config.metric}={report.champion_score:.4f}" if report.champion_score is not None else "none"
    base = f"{config.metric}={report.base_score:.4f}" if report.base_score is not None else "not compared"
    print(f"challenger v{report.challenger_version} {config.metric}={report.challenger_score:.4f}, champion {champion}, "
          f"base {base}: {'promoted' if report.promoted else 'not promoted'}")
    return 0


def setup_spark_main(argv: Sequence[str] | None = None) -> int:
    """Resolve Delta Lake's jars once and write them and Delta's settings into the local Spark's conf."""
    from dolly_spark.spark.delta_jars import DeltaJarsUnresolvedError
    from dolly_spark.spark.install import setup_spark
    from dolly_spark.spark.spark_conf import read_defaults

    if argv:
        print("usage: dolly-spark setup-spark   (no options; set SPARK_CONF_DIR to write elsewhere)")
        return 2
    try:
        defaults = setup_spark()
    except DeltaJarsUnresolvedError as exc:
        print(f"dolly-spark setup-spark: {exc}", file=sys.stderr)
        return 1
    print(f"{defaults}:")
    for key, value in read_defaults(defaults).items():
        print(f"  {key} {value}")
    return 0


COMMANDS = {
    "summarize": summarize_main,
    "finetune": finetune_main,
    "evaluate": evaluate_main,
    "demo": demo_main,
    "setup-spark": setup_spark_main,
}


def main(argv: Sequence[str] | None = None) -> int:
    """``dolly-spark <command> ...``: run the command named first; its exit code (2 for an unknown one)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print(__doc__)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    return COMMANDS[argv[0]](argv[1:])


if __name__ == "__main__":
    sys.exit(main())
