"""The fine-tune job: instruction tuning with transformers' Trainer, tracked in MLflow.

records → validate → stratified split → score the unmodified base in its own format →
[Dolly format: special tokens + resized embeddings] → Trainer (loss on the answer and its stop
only, warm-up then cosine decay, a number of epochs or exactly ``max_steps``) → [merge LoRA] →
score the tuned model in the format it learned → log with the transformers flavor → register a
new version → alias ``challenger``.

Two training formats: ``dolly`` (the Dolly v2 prompt and ``### End``, as Dolly was trained from
pythia; the default for base models) and ``chat`` (the model's own chat template, loss on the
assistant turn and its end-of-turn token, no new tokens; the default for models with a chat
template, which keep the stop they already know).
"""
from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import mlflow
import torch

from dolly_spark.prompts import DOLLY_SPECIAL_TOKENS, get_format, stop_token_ids
from dolly_spark.lifecycle.registry import log_and_register
from dolly_spark.request import REGISTERED_DEFAULTS, in_effect
from dolly_spark.training.data import load_records, stratified_split, validate_records
from dolly_spark.training.examples import encode_examples
from dolly_spark.training.base_model import load_base_model
from dolly_spark.training.checkpoints import checkpoint_dir_for, claim, configuration, unfinished_configuration
from dolly_spark.training.configs import FinetuneConfig
from dolly_spark.training.distributed import check_devices, check_settings, launch, stage, train_with_restarts
from dolly_spark.training.trainer import (FAULT_ENV_VAR, Fault, MlflowStepMetrics, Progress, load_checkpoint_weights,
                                          training_arguments)
from dolly_spark.training.model_scoring import category_chart, flat_metrics, gain_metrics, score_model
from dolly_spark.training.tokens import prepare_tokens, training_format

log = logging.getLogger(__name__)


@dataclass
class FinetuneReport:
    run_id: str
    model_name: str
    version: str
    train_records: int
    eval_records: int
    skipped: dict[str, int] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    restarts: int = 0
    resumed_from: list[int] = field(default_factory=list)


def optimizer_steps(examples: int, config: FinetuneConfig) -> int:
    """Optimizer steps to train for: ``max_steps`` exactly when it is positive, whatever the epochs
    (as transformers' ``TrainingArguments.max_steps``); else ``config.epochs`` passes over
    ``examples``, in global batches of ``batch_size x num_processes x gradient_accumulation``."""
    if config.max_steps > 0:
        return config.max_steps
    per_epoch = math.ceil(examples / (config.batch_size * config.gradient_accumulation * max(1, config.num_processes)))
    return max(1, math.ceil(per_epoch * config.epochs))


def _with_lora(model: Any, rank: int, train_embeddings: bool) -> Any:
    from peft import LoraConfig, get_peft_model

    names = {module: name for name, module in model.named_modules()}
    # New special tokens need trainable embeddings; adapters alone cannot learn them.
    embeddings = [names[m].split(".")[-1] for m in (model.get_input_embeddings(), model.get_output_embeddings())]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules="all-linear",
                        modules_to_save=embeddings if train_embeddings else None, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def run_finetune(config: FinetuneConfig, spark: Any = None) -> FinetuneReport:
    """Fine-tune, register a new version of ``config.model_name`` with alias ``config.alias``,
    and return what happened. Everything is logged to one MLflow run, which a job resuming an
    unfinished run of the same configuration continues."""
    check_settings(config)
    distributed = config.num_processes > 1
    if distributed and spark is None:
        from dolly_spark.spark.sessions import get_spark

        spark = get_spark("dolly_spark-finetune")
    gpu = check_devices(config, spark)
    directory = checkpoint_dir_for(config)
    saved = unfinished_configuration(directory) if config.resume else None
    pinned = None
    if saved and saved.get("train_data_kind") == "delta" and saved.get("train_data") == config.train_data:
        pinned = int(saved["train_data_version"])  # the resumed run's data, whatever was appended since
    # The driver reads the data once; the ranks get the encoded examples.
    records, source = load_records(config.train_data, spark, pinned) if pinned is not None \
        else load_records(config.train_data, spark)
    validation = validate_records(records)
    train_records, eval_records = stratified_split(validation.kept, config.eval_fraction, config.seed)
    if not train_records:
        raise ValueError(f"no usable training records in {config.train_data!r}: skipped {dict(validation.skipped)}")

    torch.manual_seed(config.seed)
    base = load_base_model(config.base_model)
    model, tokenizer, base_format = base.model, base.tokenizer, base.own_format
    trained_format = training_format(config.prompt_format, base_format)
    # Before any scoring or training: an unfinished run of another configuration is refused.
    state = claim(directory, configuration(config, base.uri, source, trained_format), config.resume)
    repetition = repetition_control(config, base.repetition)
    scored = eval_records[: config.max_eval_records]
    evaluations: dict[str, dict[str, Any]] = {}
    if config.evaluate and scored:
        log.info("scoring the base %s in its own %s format on %d held-out records", base.uri, base_format, len(scored))
        # The fair baseline: the base as it is, in the format it answers best in, before any
        # token is added or any weight changes.
        evaluations["base"] = _score(model, tokenizer, scored, base_format, config, repetition)

    new_tokens = prepare_tokens(model, tokenizer, trained_format)
    fmt = get_format(trained_format, tokenizer)
    stops = stop_token_ids(model, tokenizer, trained_format)
    train_set = encode_examples(tokenizer, fmt, train_records, config.max_length, stops)
    eval_set = encode_examples(tokenizer, fmt, eval_records, config.max_length, stops)
    skipped = {**validation.skipped, "too_long_tokens": train_set.dropped_too_long + eval_set.dropped_too_long}
    if not train_set.examples:
        raise ValueError(
            f"every training example of {config.train_data!r} is longer than max_length={config.max_length} "
            f"tokens ({train_set.dropped_too_long} dropped); raise --max-length"
        )
    steps = optimizer_steps(len(train_set.examples), config)

    run_arguments = {"run_id": state.run_id} if state.run_id else {"run_name": f"finetune-{config.model_name}"}
    with mlflow.start_run(**run_arguments) as run:
        state.run_id = run.info.run_id
        state.save()
        mlflow.set_tags({"job": "finetune", "base_model": config.base_model, "checkpoint_dir": str(directory)})
        _log_params({**asdict(config), **source.as_params(), "new_special_tokens": new_tokens,
                     "trained_prompt_format": trained_format, "baseline_prompt_format": base_format,
                     "optimizer_steps": steps, "global_batch": config.batch_size * config.num_processes
                     * config.gradient_accumulation, "scoring_repetition_control": repetition or "off",
                     "devices": "gpu" if gpu else "cpu"}, run.info.run_id, state.resumed)
        if not state.resumed:
            _log_training_input(source, validation.kept)
        mlflow.log_metrics({
            "records_read": len(records), "records_kept": len(validation.kept),
            "train_examples": len(train_set.examples), "eval_examples": len(eval_set.examples),
            **{f"records_skipped_{reason}": count for reason, count in skipped.items()},
        })
        metrics: dict[str, float] = {}
        if "base" in evaluations:
            metrics.update(flat_metrics("before", evaluations["base"]))

        length = f"max_steps {config.max_steps}" if config.max_steps > 0 else f"{config.epochs:.3g} epochs"
        log.info("training %s in the %s format: %d examples, %d steps (%s), %d process(es) (%s), checkpoints in %s",
                 config.base_model, trained_format, len(train_set.examples), steps, length, config.num_processes,
                 f"{config.launch}, sharding {config.sharding}" if distributed else "in this process", directory)
        fault = None if state.resumed else os.environ.get(FAULT_ENV_VAR)

        def on_resume(step: int) -> None:
            state.resumed_from.append(step)
            state.save()
            mlflow.log_metric("resumed_from_step", step, step=len(state.resumed_from))
            mlflow.set_tag("resumed_from_steps", ",".join(map(str, state.resumed_from)))

        def on_restart(attempt: int, failure: BaseException) -> None:
            state.restarts += 1
            state.save()
            mlflow.log_metric("restarts", state.restarts)
            log.warning("a training process failed (%s); restart %d of at most %d, from the newest complete "
                        "checkpoint", str(failure).strip().splitlines()[0][:300] if str(failure).strip() else
                        type(failure).__name__, attempt, config.max_restarts)

        started = time.perf_counter()
        if distributed:
            staged = stage(directory, model, tokenizer, train_set.examples, eval_set.examples)

            def start(attempt: int, checkpoint: str | None, resumed_step: int) -> dict[str, Any]:
                spec = {"config": config, "directory": str(directory), "steps": steps, "run_id": state.run_id,
                        "resume_from": checkpoint, "attempt": attempt, "driver_pid": os.getpid(),
                        "log_after_step": _last_logged_step(state.run_id), "fault": fault if attempt == 0 else None,
                        "tracking_uri": mlflow.get_tracking_uri(), "registry_uri": mlflow.get_registry_uri(),
                        "new_tokens": new_tokens}
                return launch(config, spark, gpu, spec)

            train_with_restarts(config, state, start, on_resume, on_restart, config.max_restarts)
            from transformers import AutoModelForCausalLM

            final = directory / "final"
            outcome = json.loads((final / "outcome.json").read_text())
            model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
            log.info("trained model read from %s (staged base in %s)", final, staged)
            train_loss = outcome["train_loss"]
        else:
            from transformers import DataCollatorForSeq2Seq, Trainer

            trainable = _with_lora(model, config.lora_rank, new_tokens > 0) if config.lora else model

            def start(attempt: int, checkpoint: str | None, resumed_step: int) -> dict[str, Any]:
                after = _last_logged_step(state.run_id)
                callbacks = [MlflowStepMetrics(state.run_id, after), Progress(state.run_id, after)]
                if fault and attempt == 0:
                    callbacks.append(Fault(fault, 0, os.getpid()))
                load_checkpoint_weights(trainable, checkpoint, config.lora)
                trainer = Trainer(
                    model=trainable,
                    args=training_arguments(config, str(directory), steps, bool(eval_set.examples)),
                    train_dataset=train_set.examples,
                    eval_dataset=eval_set.examples or None,
                    data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100,
                                                         pad_to_multiple_of=8 if torch.cuda.is_available() else None),
                    callbacks=callbacks,
                )
                return {"train_loss": float(trainer.train(resume_from_checkpoint=checkpoint).training_loss)}

            # In this process a failure is the driver's own: no restart here (a rerun resumes).
            train_loss = train_with_restarts(config, state, start, on_resume, on_restart, 0)["train_loss"]
            model = trainable.merge_and_unload() if config.lora else trainable
        train_seconds = time.perf_counter() - started
        model.eval()
        metrics["train_loss"] = float(train_loss)
        metrics["train_seconds"] = train_seconds
        metrics["restarts"] = state.restarts

        if "base" in evaluations:
            log.info("scoring the tuned model in the %s format on %d held-out records", trained_format, len(scored))
            evaluations["tuned"] = _score(model, tokenizer, scored, trained_format, config, repetition)
            metrics.update(flat_metrics("after", evaluations["tuned"]))
            metrics.update(gain_metrics(evaluations["base"], evaluations["tuned"]))
            mlflow.log_figure(category_chart(evaluations), "rouge_l_by_category.png")
            _log_predictions(scored, evaluations)
        mlflow.log_metrics(metrics)

        baseline = {"baseline_prompt_format": base_format}
        if "before_rouge_l" in metrics:
            baseline["baseline_rouge_l"] = round(metrics["before_rouge_l"], 6)
        # The driver registers once, after training: a restart never adds a version.
        version = log_and_register(
            model.to("cpu"), tokenizer, config.model_name, trained_format, alias=config.alias,
            metadata={"base_model": config.base_model, "base_model_uri": base.uri, "train_data": source.name,
                      "train_data_version": source.version, **baseline,
                      **({"special_tokens": list(DOLLY_SPECIAL_TOKENS)} if trained_format == "dolly" else {})},
            **repetition,
        )
        state.finished = True
        state.save()
        log.info("fine-tuned %s: version %s (@%s), metrics %s", config.model_name, version, config.alias, metrics)
        return FinetuneReport(run.info.run_id, config.model_name, version, len(train_set.examples),
                              len(eval_set.examples), skipped, metrics, train_seconds, state.restarts,
                              list(state.resumed_from))


def _log_params(params: dict[str, Any], run_id: str, resumed: bool) -> None:
    """Log ``params``; a resumed run keeps the values it has (a fault-handling flag changed on
    the rerun, say) and gets only the new ones."""
    if resumed:
        existing = mlflow.MlflowClient().get_run(run_id).data.params
        changed = {k: v for k, v in params.items() if k in existing and existing[k] != str(v)}
        if changed:
            log.info("the resumed run keeps its recorded settings; this job's differ in %s", sorted(changed))
        params = {k: v for k, v in params.items() if k not in existing}
    if params:
        mlflow.log_params(params)


def _last_logged_step(run_id: str) -> int:
    """The last step the run's progress was logged at (0: none): an attempt after a restart
    does not log those steps again."""
    history = mlflow.MlflowClient().get_metric_history(run_id, "progress_step")
    return max((int(m.step) for m in history), default=0)


def repetition_control(config: FinetuneConfig, registered: dict[str, float | int]) -> dict[str, float | int]:
    """The repetition control both models are scored with and the new version gets: the config's
    where it sets it, else the base version's registered one; settings that are off left out."""
    chosen = in_effect({"repetition_penalty": config.repetition_penalty,
                        "no_repeat_ngram_size": config.no_repeat_ngram_size}, registered)
    return {name: value for name, value in chosen.items() if value != REGISTERED_DEFAULTS[name][1]}


def _score(model, tokenizer, records, prompt_format: str, config: FinetuneConfig,
           repetition: dict[str, float | int]) -> dict[str, Any]:
    return score_model(model, tokenizer, records, prompt_format, config.eval_max_new_tokens, config.max_length,
                       repetition)


def _log_predictions(records: list[dict[str, str]], evaluations: dict[str, dict[str, Any]]) -> None:
    """Every held-out answer of each model beside the reference, with its ROUGE-L and whether it
    stopped, as an MLflow table a reviewer can read."""
    table: dict[str, list] = {"category": [r["category"] for r in records],
                              "instruction": [r["instruction"] for r in records],
                              "reference": [r["response"] for r in records]}
    for label, evaluation in evaluations.items():
        table[f"{label}_answer"] = evaluation["predictions"]
        table[f"{label}_rouge_l"] = evaluation["rouge_l"]
        table[f"{label}_stopped"] = evaluation["stopped"]
    mlflow.log_table(table, "held_out_answers.json")


def _log_training_input(source, records: list[dict[str, str]]) -> None:
    """Record the training data's identity (Delta table and version, or file hash) on the run."""
    import pandas as pd

    frame = pd.DataFrame(records)
    dataset = mlflow.data.from_pandas(frame, source=_dataset_source(source), name=source.name)
    mlflow.log_input(dataset, context="training", tags={"version": source.version})


def _dataset_source(source):
    if source.kind == "delta":
        from mlflow.data.delta_dataset_source import DeltaDatasetSource

        return DeltaDatasetSource(delta_table_name=source.name, delta_table_version=int(source.version))
    return source.name
