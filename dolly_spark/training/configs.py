"""The fine-tune and evaluate jobs' settings, apart from the jobs: ``--help`` and a bad flag are
answered without importing torch, transformers or MLflow (seconds of a user's time)."""
from __future__ import annotations

from dataclasses import dataclass

from dolly_spark.job_config import option
from dolly_spark.lifecycle.aliases import CHALLENGER


@dataclass
class FinetuneConfig:
    base_model: str = option("databricks/dolly-v2-3b", "hub id, local checkpoint or models:/ URI to start from")
    train_data: str = option("databricks/databricks-dolly-15k", "Delta table name or JSONL path of dolly-15k style records")
    model_name: str = option("support_dolly", "registered model name the result becomes a new version of")
    prompt_format: str = option("auto", "format trained in: dolly, chat, or auto (chat when the base answers in "
                                        "its chat template, else dolly)")
    epochs: float = option(3.0, "passes over the training records (Dolly used 2-3)")
    max_steps: int = option(0, "optimizer steps to train for, overriding epochs (0: the epochs decide)")
    learning_rate: float = option(1e-5, "peak learning rate (cosine decay after warm-up)")
    warmup_fraction: float = option(0.05, "share of steps spent warming up the learning rate")
    batch_size: int = option(8, "examples per device per step")
    gradient_accumulation: int = option(1, "steps whose gradients are summed before an update")
    max_length: int = option(1024, "longest example in tokens; longer ones are dropped and counted")
    eval_fraction: float = option(0.1, "share of each category held out for evaluation")
    eval_steps: int = option(50, "evaluate the held-out loss every this many steps")
    max_eval_records: int = option(64, "held-out records generated on for ROUGE-L (generation is slow)")
    eval_max_new_tokens: int = option(128, "longest generated answer when scoring")
    repetition_penalty: float | None = option(None, "repetition control the base and the tuned model are scored "
                                              "with, and the new version is registered with (1.0: off); default: "
                                              "the base version's registered value")
    no_repeat_ngram_size: int | None = option(None, "no n-gram of this size twice in an answer, when scoring and "
                                              "in the new version (0: off); default: the base version's")
    evaluate: bool = option(True, "score the base and the tuned model on the held-out split")
    lora: bool = option(False, "train LoRA adapters (merged into the model before registration)")
    lora_rank: int = option(16, "LoRA rank")
    seed: int = option(42, "seed of the split, the initialisation and the data order")
    experiment: str = option("dolly_spark", "MLflow experiment of the fine-tune run")
    alias: str = option(CHALLENGER, "alias the new version gets")
    num_processes: int = option(1, "training processes (one per GPU; gloo processes on CPUs); 1: in the job's "
                                   "own process; more: launched by Spark's TorchDistributor")
    launch: str = option("local", "where the processes run: local (on the driver node, as Dolly's 8 GPUs) or "
                                  "cluster (barrier tasks on the executors, one per GPU, several nodes)")
    sharding: str = option("none", "memory sharding across GPUs: none (DDP: each process holds the whole model), "
                                   "fsdp (FSDP full shard) or zero3 (DeepSpeed ZeRO-3); GPUs only")
    offload_optimizer: bool = option(False, "with sharding: keep the optimizer state in CPU memory (small GPUs)")
    checkpoint_dir: str = option("", "durable directory of this model's checkpoints (a Unity Catalog volume or "
                                     "DBFS on Databricks); default: checkpoints/<model_name> under the project home")
    save_steps: int = option(50, "save a checkpoint every this many optimizer steps (0: none)")
    keep_checkpoints: int = option(2, "newest checkpoints kept (at least 2: one may be half-written)")
    max_restarts: int = option(2, "times the driver restarts the processes from the newest checkpoint after one dies")
    resume: bool = option(True, "continue an unfinished run of the same configuration from its newest checkpoint "
                                "(false: discard it and start again)")


@dataclass
class EvaluateConfig:
    model_name: str = option("support_dolly", "registered model whose challenger is evaluated")
    eval_data: str = option("databricks/databricks-dolly-15k", "Delta table name or JSONL path of held-out records")
    eval_fraction: float = option(0.1, "share of each category held out (must match the fine-tune's; 1.0: all records)")
    seed: int = option(42, "seed of the split (must match the fine-tune's)")
    max_eval_records: int = option(64, "held-out records generated on")
    max_new_tokens: int = option(128, "longest generated answer")
    max_length: int = option(1024, "longest example in tokens for the eval loss")
    metric: str = option("rouge_l", "overall score compared: rouge_l or exact_match")
    margin: float = option(0.0, "how much higher the challenger's score must be to become champion")
    experiment: str = option("dolly_spark", "MLflow experiment of the evaluation run")
