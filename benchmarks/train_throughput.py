"""Fine-tuning throughput in 1 and 2 processes: the fine-tune job (``run_finetune``) on the
dolly sample beside the project, the same global batch and steps each way, 2 processes launched
by Spark's TorchDistributor on the driver node (gloo on CPUs, as on this machine).

    python -m benchmarks.train_throughput [--steps 40] [--global-batch 8] [--repeats 1]

Two figures per run, both in examples a second: ``training`` (the Trainer's own
``train_runtime``, logged to MLflow by rank 0: the optimizer steps alone) and ``with launch``
(the job's training phase as the driver times it: for 2 processes, torchrun and each rank's
start, imports and model load included, which a long run amortises). The model is a small
GPT-NeoX (4 layers of 256, about 3.4M parameters with its 512-token vocabulary) in fp32; each
run has a project home and MLflow registry of its own, in a temporary directory.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "dolly15k_sample.jsonl"


def small_model(directory: Path, corpus: list[str]) -> Path:
    from dolly_spark.testing.tiny_models import build_tiny_model, train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(corpus)
    model = build_tiny_model(tokenizer, hidden_size=256, layers=4, heads=4)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def one_run(spark, model_dir: Path, processes: int, args: argparse.Namespace, root: Path) -> dict[str, float]:
    import mlflow

    from dolly_spark.training.configs import FinetuneConfig
    from dolly_spark.training.finetune import run_finetune

    config = FinetuneConfig(base_model=str(model_dir), train_data=str(SHARED_DATA), model_name=f"bench_{processes}",
                            max_steps=args.steps, batch_size=args.global_batch // processes, learning_rate=1e-4,
                            warmup_fraction=0.0, max_length=256, eval_fraction=0.0, evaluate=False, save_steps=0,
                            num_processes=processes, checkpoint_dir=str(root / f"checkpoints_{processes}"),
                            resume=False)
    report = run_finetune(config, spark)
    runtime = mlflow.MlflowClient().get_run(report.run_id).data.metrics["train_runtime"]
    examples = args.steps * args.global_batch
    return {"processes": processes, "examples": examples, "training_seconds": runtime,
            "training_examples_per_s": examples / runtime, "with_launch_seconds": report.train_seconds,
            "with_launch_examples_per_s": examples / report.train_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="train_throughput_"))
    os.environ["DOLLY_SPARK_HOME"] = str(root / "home")

    from dolly_spark.lifecycle.tracking import configure_mlflow
    from dolly_spark.spark.sessions import get_spark

    configure_mlflow("train_throughput")
    spark = get_spark("train_throughput", master="local[2]", ui=False)
    corpus = [json.loads(line)["instruction"] for line in SHARED_DATA.read_text().splitlines()[:200]]
    model_dir = small_model(root / "model", corpus)
    results = []
    for repeat in range(args.repeats):
        for processes in (1, 2):
            started = time.perf_counter()
            result = one_run(spark, model_dir, processes, args, root)
            result.update(repeat=repeat, load_average=round(os.getloadavg()[0], 1),
                          job_seconds=round(time.perf_counter() - started, 1))
            results.append(result)
            print(json.dumps(result))
    print("\n| processes | examples | training s | training examples/s | with launch s | with launch examples/s |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['processes']} | {r['examples']} | {r['training_seconds']:.1f} | {r['training_examples_per_s']:.1f} "
              f"| {r['with_launch_seconds']:.1f} | {r['with_launch_examples_per_s']:.1f} |")
    spark.stop()


if __name__ == "__main__":
    main()
