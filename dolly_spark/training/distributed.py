"""Fine-tuning in more than one process, launched by Spark's ``TorchDistributor``.

The driver reads and encodes the data once and stages, in the run's checkpoint directory (a
durable path every node can read), the prepared base model, its tokenizer and the encoded
examples. ``TorchDistributor`` starts torchrun on the driver node (``launch: local``) or as
barrier tasks on the executors (``launch: cluster``); every rank builds the same Trainer, which
gives each its own share of each global batch (DDP, or FSDP / ZeRO-3 on GPUs), saves
checkpoints, and at the end writes the final model beside them. Each rank writes what it saw
(rank, world size, backend) to ``ranks/``, and the driver checks the world size from there.

A barrier stage is never retried by Spark: one rank that dies fails the whole launch. The driver
catches that and launches again from the newest complete checkpoint, up to ``max_restarts``
times. The train function's return value comes from rank 0 only, so the model goes through the
checkpoint directory and the step metrics through MLflow (rank 0 alone logs them).
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger(__name__)

LAUNCHES = ("local", "cluster")
SHARDINGS = ("none", "fsdp", "zero3")


def uses_gpus(config: Any, spark: Any = None) -> bool:
    """Whether the processes get GPUs: the driver node's for ``local``, the executors' (a GPU
    amount per task in the Spark conf) for ``cluster``."""
    import torch

    if config.launch == "local" or spark is None:
        return torch.cuda.is_available()
    return float(spark.conf.get("spark.task.resource.gpu.amount", "0") or 0) > 0


def check_settings(config: Any) -> None:
    """Refuse settings that cannot run, before anything is loaded."""
    if config.num_processes < 1:
        raise ValueError(f"num_processes must be 1 or more, not {config.num_processes}")
    if config.launch not in LAUNCHES:
        raise ValueError(f"launch must be local or cluster, not {config.launch!r}")
    if config.sharding not in SHARDINGS:
        raise ValueError(f"sharding must be none, fsdp or zero3, not {config.sharding!r}")
    if config.keep_checkpoints < 2:
        raise ValueError(f"keep_checkpoints must be at least 2, not {config.keep_checkpoints}: the newest may be "
                         "half-written when a process dies, and then the one before it is resumed from")
    if config.sharding != "none" and config.lora:
        raise ValueError("LoRA with sharding is not supported: LoRA's trainable state is small enough for DDP; "
                         "use --sharding none")
    if config.sharding == "zero3" and importlib.util.find_spec("deepspeed") is None:
        raise ValueError("sharding zero3 needs DeepSpeed on every node: pip install deepspeed (or use --sharding fsdp, "
                         "which is part of torch)")


def check_devices(config: Any, spark: Any) -> bool:
    """Refuse sharding without GPUs and more processes than there are slots for, with the
    numbers; return whether the processes use GPUs."""
    gpu = uses_gpus(config, spark)
    if config.sharding != "none" and not gpu:
        raise ValueError(
            f"sharding {config.sharding} needs GPUs, and these processes run on CPUs: there, each of the "
            f"{config.num_processes} processes holds the whole model and they train as plain DDP over gloo. "
            "Use --sharding none on CPUs")
    if config.num_processes > 1:
        slots, where = free_slots(config, spark, gpu)
        if config.num_processes > slots:
            raise ValueError(f"{config.num_processes} processes asked for, but {where} has {slots} free task slots: "
                             f"lower --num-processes to at most {slots}, or add capacity")
    return gpu


def free_slots(config: Any, spark: Any, gpu: bool) -> tuple[int, str]:
    """How many processes can run at once, and where: the driver node's GPUs or cores for
    ``local``; for ``cluster``, the tasks the executors can run at once (what a barrier stage
    needs all of), waiting a little for executors still registering."""
    if config.launch == "local":
        if gpu:
            import torch

            return torch.cuda.device_count(), "the driver node (GPUs)"
        return os.cpu_count() or 1, "the driver node (CPU cores)"
    context = spark.sparkContext
    deadline = time.monotonic() + 30
    while True:
        try:
            scala = context._jsc.sc()
            slots = int(scala.maxNumConcurrentTasks(scala.resourceProfileManager().defaultResourceProfile()))
        except Exception:  # noqa: BLE001 - an internal API; the public estimate instead
            slots = context.defaultParallelism
        if slots >= config.num_processes or time.monotonic() > deadline:
            return slots, f"the cluster ({context.master})"
        time.sleep(1)


def stage(directory: Path, model: Any, tokenizer: Any, train: list, evaluation: list) -> Path:
    """The prepared base model, its tokenizer and the encoded examples, where every rank reads
    them (written once per run; a resumed run reuses them)."""
    import torch

    staging = directory / "staging"
    done = staging / "staged"
    if done.is_file():
        return staging
    staging.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(staging / "model")
    tokenizer.save_pretrained(staging / "model")
    torch.save({"train": train, "eval": evaluation}, staging / "examples.pt")
    done.write_text("ok")
    return staging


def train_rank(spec: dict[str, Any]) -> dict[str, Any]:
    """One rank's training: run in each process torchrun starts. Returns rank 0's outcome (the
    only return value TorchDistributor passes back)."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer

    from dolly_spark.training.trainer import (Fault, MlflowStepMetrics, Progress, load_checkpoint_weights,
                                              training_arguments)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s rank %(process)d %(name)s: %(message)s")
    # Through the environment, so that a rank that never logs (every rank but 0) never imports
    # mlflow (about 1.6 s of CPU a process here).
    os.environ["MLFLOW_TRACKING_URI"], os.environ["MLFLOW_REGISTRY_URI"] = spec["tracking_uri"], spec["registry_uri"]
    config, directory = spec["config"], Path(spec["directory"])
    if config.launch == "local":
        exit_with_driver(spec["driver_pid"])
    staging = directory / "staging"
    examples = torch.load(staging / "examples.pt")
    tokenizer = AutoTokenizer.from_pretrained(staging / "model")
    torch.manual_seed(config.seed)
    model = AutoModelForCausalLM.from_pretrained(staging / "model", dtype=torch.float32)
    load_checkpoint_weights(model, spec["resume_from"], config.lora)
    if config.lora:
        from dolly_spark.training.finetune import _with_lora

        model = _with_lora(model, config.lora_rank, spec["new_tokens"] > 0)
    arguments = training_arguments(config, str(directory), spec["steps"], bool(examples["eval"]),
                                   world_size=config.num_processes)
    callbacks = [MlflowStepMetrics(spec["run_id"], spec["log_after_step"]), Progress(spec["run_id"], spec["log_after_step"])]
    if spec.get("fault"):
        callbacks.append(Fault(spec["fault"], arguments.process_index, spec["driver_pid"]))
    trainer = Trainer(
        model=model, args=arguments, train_dataset=examples["train"], eval_dataset=examples["eval"] or None,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100,
                                             pad_to_multiple_of=8 if torch.cuda.is_available() else None),
        callbacks=callbacks,
    )
    rank, world = arguments.process_index, arguments.world_size
    seen = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    report = directory / "ranks" / f"attempt-{spec['attempt']}" / f"rank-{rank}.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({"rank": rank, "world_size": seen, "trainer_world_size": world, "pid": os.getpid(),
                                  "backend": dist.get_backend() if seen > 1 else None,
                                  "device": str(arguments.device), "host": os.uname().nodename,
                                  "workdir": os.getcwd()}))  # a barrier task's: its executor's work directory
    started = time.perf_counter()
    outcome = trainer.train(resume_from_checkpoint=spec["resume_from"])
    seconds = time.perf_counter() - started
    final = directory / "final"
    if config.lora:
        if trainer.is_world_process_zero():
            trainer.model.merge_and_unload().save_pretrained(final)
    else:
        trainer.save_model(str(final))  # every rank: FSDP and ZeRO-3 gather the shards for it
    if trainer.is_world_process_zero():
        (final / "outcome.json").write_text(json.dumps({"train_loss": float(outcome.training_loss),
                                                        "global_step": int(outcome.global_step),
                                                        "train_seconds": seconds}))
    return {"train_loss": float(outcome.training_loss), "global_step": int(outcome.global_step),
            "train_seconds": seconds, "world_size": seen}


def exit_with_driver(driver_pid: int, every_s: float = 0.5) -> None:
    """End this rank when the job's driver process is gone. TorchDistributor starts torchrun as
    a plain child of the driver: when the driver is killed, torchrun and the ranks live on as
    orphans, training and saving checkpoints into the directory a rerun of the job resumes from.
    (Ranks on the driver node only: barrier tasks on executors end with their Spark job.)"""

    def watch() -> None:
        while True:
            time.sleep(every_s)
            try:
                os.kill(driver_pid, 0)
            except ProcessLookupError:
                log.warning("the driver process %d is gone: this rank ends", driver_pid)
                os._exit(1)
            except PermissionError:  # alive, under another user
                pass

    threading.Thread(target=watch, name="exit-with-driver", daemon=True).start()


def rank_reports(directory: Path, attempt: int) -> list[dict[str, Any]]:
    """What each rank of launch ``attempt`` reported (rank, world size, backend), in rank order; empty before any."""
    folder = Path(directory) / "ranks" / f"attempt-{attempt}"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("rank-*.json"))] if folder.is_dir() else []


def launch(config: Any, spark: Any, gpu: bool, spec: dict[str, Any]) -> dict[str, Any]:
    """One launch of ``num_processes`` ranks through TorchDistributor; its world size checked
    from what the ranks wrote."""
    from pyspark.ml.torch.distributor import TorchDistributor

    # Reports of an earlier job's attempt of the same number (a job rerun after its driver died)
    # must not count as this launch's ranks.
    shutil.rmtree(Path(spec["directory"]) / "ranks" / f"attempt-{spec['attempt']}", ignore_errors=True)
    distributor = TorchDistributor(num_processes=config.num_processes, local_mode=config.launch == "local",
                                   use_gpu=gpu)
    outcome = distributor.run(train_rank, spec)
    reports = rank_reports(Path(spec["directory"]), spec["attempt"])
    sizes = sorted({report["world_size"] for report in reports})
    if len(reports) != config.num_processes or sizes != [config.num_processes]:
        raise RuntimeError(f"{config.num_processes} processes launched, but {len(reports)} reported, with world "
                           f"sizes {sizes}: the processes did not train together")
    log.info("%d ranks trained together (world size %d, backend %s, on %s)", len(reports), sizes[0],
             reports[0]["backend"], sorted({r["host"] for r in reports}))
    return outcome or {}


def train_with_restarts(config: Any, state: Any, start: Callable[[int, str | None, int], dict[str, Any]],
                        on_resume: Callable[[int], None], on_restart: Callable[[int, BaseException], None],
                        max_restarts: int) -> dict[str, Any]:
    """``start(attempt, checkpoint, resumed_step)`` until it returns, restarted from the newest
    complete checkpoint after a failure, up to ``max_restarts`` times."""
    from dolly_spark.training.checkpoints import newest_complete_checkpoint

    attempt = 0
    while True:
        newest = newest_complete_checkpoint(state.directory, config.num_processes)
        checkpoint = None
        if newest is not None:
            step, folder = newest
            checkpoint = str(folder)
            log.info("resuming from %s (step %d)", folder, step)
            on_resume(step)
        try:
            return start(attempt, checkpoint, newest[0] if newest else 0)
        except Exception as exc:  # a dead rank fails the whole barrier stage: relaunch
            if max_restarts == 0:
                raise
            if attempt >= max_restarts:
                raise RuntimeError(f"training failed {attempt + 1} times (max_restarts {max_restarts}); "
                                   f"the last failure: {str(exc)[-2000:]}") from exc
            attempt += 1
            on_restart(attempt, exc)
