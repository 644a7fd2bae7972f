"""The Trainer every fine-tune process builds, in the job's own process or as one rank of many:
its arguments (batching, checkpoints, precision, the backend, sharding) and its callbacks (step
metrics to MLflow from rank 0 alone, progress with the time left, the tests' fault injection)."""
from __future__ import annotations

import logging
import math
import os
import signal
import time
from typing import Any

import torch
from transformers import TrainerCallback

log = logging.getLogger(__name__)

# A test's fault, "rank<R>@<step>" (rank R kills itself by its pid once step N is done) or
# "driver@<step>" (rank 0 kills the job's driver process), on the first attempt of a job only.
FAULT_ENV_VAR = "DOLLY_SPARK_FAULT"


def dolly_zero3_config(offload_optimizer: bool) -> dict[str, Any]:
    """DeepSpeed ZeRO-3 as Dolly trained with it (its ``ds_z3_bf16_config.json``): bf16, stage 3
    with overlapped communication, 16-bit weights gathered when the model is saved; with
    ``offload_optimizer`` its A10/V100 variant, the optimizer state in pinned CPU memory. The
    Trainer fills the ``auto`` values from its own arguments; its cosine schedule is kept."""
    zero = {
        "stage": 3, "overlap_comm": True, "contiguous_gradients": True, "sub_group_size": 1e9,
        "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 1e9,
        "stage3_max_reuse_distance": 1e9, "stage3_gather_16bit_weights_on_model_save": True,
    }
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "bf16": {"enabled": "auto"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto"}},
        "zero_optimization": zero,
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto", "steps_per_print": 2000,
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "wall_clock_breakdown": False,
    }


def sharding_arguments(sharding: str, offload_optimizer: bool) -> dict[str, Any]:
    """TrainingArguments for the sharding option (GPUs only; checked before launching)."""
    if sharding == "fsdp":
        # Full shard of parameters, gradients and optimizer state, one unit per decoder layer
        # (the model's own _no_split_modules); a full state dict on save, so the final model and
        # the checkpoints load anywhere. FSDP's offload moves parameters and optimizer to the CPU.
        return {"fsdp": "full_shard auto_wrap" + (" offload" if offload_optimizer else ""),
                "fsdp_config": {"state_dict_type": "FULL_STATE_DICT"}}
    if sharding == "zero3":
        return {"deepspeed": dolly_zero3_config(offload_optimizer)}
    return {}


def _length_grouped_batches(arguments_class) -> dict[str, Any]:
    """Batches of similar lengths (shuffled in mega-batches), so far less padding is computed;
    the option's name changed within transformers 5."""
    fields = getattr(arguments_class, "__dataclass_fields__", {})
    if "train_sampling_strategy" in fields:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True} if "group_by_length" in fields else {}


def _checkpointing(arguments_class, on: bool) -> dict[str, Any]:
    """Activations recomputed in the backward pass instead of kept (on GPUs, for memory), under
    the option's name in this transformers: ``activation_checkpointing`` in newer 5.x releases,
    ``gradient_checkpointing`` in earlier ones (5.19, which vLLM 0.32 requires)."""
    fields = getattr(arguments_class, "__dataclass_fields__", {})
    return {"activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing": on}


def training_arguments(config: Any, output_dir: str, steps: int, has_eval: bool, world_size: int = 1):
    """The Trainer's arguments. ``world_size`` processes each take ``config.batch_size`` examples
    a step, so the global batch is ``batch_size x world_size x gradient_accumulation``."""
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    distributed = {}
    if world_size > 1:
        # Without use_cpu, accelerate can quietly leave each CPU process training alone.
        distributed = {"ddp_backend": "nccl" if on_gpu else "gloo", "use_cpu": not on_gpu}
        if not config.lora:
            # Every weight of a full fine-tune gets a gradient: no extra pass over the autograd
            # graph at each step looking for unused ones (what transformers asks DDP for otherwise).
            distributed["ddp_find_unused_parameters"] = False
    saving = {"save_strategy": "no"}
    if config.save_steps > 0:
        saving = {"save_strategy": "steps", "save_steps": config.save_steps,
                  "save_total_limit": max(2, config.keep_checkpoints)}
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=math.ceil(steps * config.warmup_fraction),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        **_length_grouped_batches(TrainingArguments),
        logging_steps=max(1, min(10, steps // 10)),
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps,
        **saving,
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        **_checkpointing(TrainingArguments, on_gpu),
        dataloader_pin_memory=on_gpu,
        include_num_input_tokens_seen=True,
        disable_tqdm=True,
        remove_unused_columns=False,
        **distributed,
        **sharding_arguments(config.sharding, config.offload_optimizer),
    )


class MlflowStepMetrics(TrainerCallback):
    """Rank 0 alone logs the Trainer's numbers (loss, eval loss, learning rate) and tokens/s to
    the driver's run at every log step: the Trainer's token count is already gathered from every
    rank, so tokens/s is the sum over ranks. Steps up to ``log_after_step`` (logged by an attempt
    that a restart repeats) are not logged again."""

    def __init__(self, run_id: str, log_after_step: int = 0):
        self.run_id, self.log_after_step = run_id, log_after_step
        self.last = (time.perf_counter(), 0)

    def on_train_begin(self, args, state, control, **kwargs):
        """Start the clock and token count that tokens/s are measured from."""
        self.last = (time.perf_counter(), int(getattr(state, "num_input_tokens_seen", 0) or 0))

    def on_log(self, args, state, control, logs=None, **kwargs):
        """Log the step's metrics to the run, on rank 0 only, each step once."""
        if not state.is_world_process_zero:
            return
        metrics = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        now = time.perf_counter()
        if seen > self.last[1] and now > self.last[0]:
            metrics["tokens_per_second"] = (seen - self.last[1]) / (now - self.last[0])
        self.last = (now, seen)
        if state.global_step > self.log_after_step or "eval_loss" in metrics:
            _log_metrics(self.run_id, metrics, state.global_step)


class Progress(TrainerCallback):
    """``step N of M`` with the time left (from this attempt's own pace), in the log and in
    MLflow (``progress_step``, ``eta_seconds``), from rank 0 at every log step."""

    def __init__(self, run_id: str | None, log_after_step: int = 0):
        self.run_id, self.log_after_step = run_id, log_after_step
        self.start: tuple[float, int] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        """Start the clock of the estimated time left."""
        self.start = (time.perf_counter(), state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        """On rank 0 at each log step: step N of M and the time left, in the log and in MLflow."""
        if self.start is None:
            self.start = (time.perf_counter(), state.global_step - 1)
        if not state.is_world_process_zero or (state.global_step % args.logging_steps
                                               and state.global_step != state.max_steps):
            return
        elapsed, done = time.perf_counter() - self.start[0], state.global_step - self.start[1]
        left = (state.max_steps - state.global_step) * elapsed / max(done, 1)
        log.info("step %d of %d (%.0f%%), %.2f s a step, about %s left", state.global_step, state.max_steps,
                 100 * state.global_step / max(state.max_steps, 1), elapsed / max(done, 1), _duration(left))
        if self.run_id and state.global_step > self.log_after_step:
            _log_metrics(self.run_id, {"progress_step": state.global_step, "progress_max_steps": state.max_steps,
                                       "eta_seconds": left}, state.global_step)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def _log_metrics(run_id: str, metrics: dict[str, float], step: int) -> None:
    import mlflow
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    mlflow.MlflowClient().log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])


class Fault(TrainerCallback):
    """Kills a process by its pid once a step is done (see ``FAULT_ENV_VAR``): how the tests
    lose a rank, or the driver, at a chosen step."""

    def __init__(self, spec: str, rank: int, driver_pid: int):
        who, _, step = spec.partition("@")
        self.step = int(step)
        self.pid = None
        if who == f"rank{rank}":
            self.pid = os.getpid()
        elif who == "driver" and rank == 0:
            self.pid = driver_pid

    def on_step_end(self, args, state, control, **kwargs):
        """Kill the chosen process (this rank, or the driver) once the chosen step is done."""
        if self.pid is not None and state.global_step == self.step:
            log.warning("fault injection: killing pid %d after step %d", self.pid, self.step)
            os.kill(self.pid, signal.SIGKILL)
            if self.pid == os.getpid():
                time.sleep(60)


def load_checkpoint_weights(model: Any, checkpoint: str | None, lora: bool) -> None:
    """Put a checkpoint's weights into ``model`` through ``from_pretrained``, before the
    Trainer resumes from it. The Trainer's own resume loads the saved state dict as it is, and
    transformers 5 saves some models under their legacy parameter names (GPT-NeoX's
    ``embed_out`` for ``lm_head``): those weights would silently stay at the base's values, and
    the resumed run would train a different model (measured here: 1e-2 apart after 4 steps).
    ``from_pretrained`` maps the names. (LoRA checkpoints hold adapters, which peft resumes.)"""
    if checkpoint is None or lora:
        return
    from transformers import AutoModelForCausalLM

    saved = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model.load_state_dict(saved.state_dict())
