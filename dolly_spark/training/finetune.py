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

import logging
import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import mlflow
import torch
from transformers import TrainerCallback

from dolly_spark.prompts import DOLLY_SPECIAL_TOKENS, get_format, stop_token_ids
from dolly_spark.lifecycle.registry import log_and_register
from dolly_spark.request import REGISTERED_DEFAULTS, in_effect
from dolly_spark.training.data import load_records, stratified_split, validate_records
from dolly_spark.training.examples import encode_examples
from dolly_spark.training.base_model import load_base_model
from dolly_spark.training.configs import FinetuneConfig
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


def optimizer_steps(examples: int, config: FinetuneConfig) -> int:
    """Optimizer steps to train for: ``max_steps`` exactly when it is positive, whatever the epochs
    (as transformers' ``TrainingArguments.max_steps``); else ``config.epochs`` passes over
    ``examples``."""
    if config.max_steps > 0:
        return config.max_steps
    per_epoch = math.ceil(examples / (config.batch_size * config.gradient_accumulation))
    return max(1, math.ceil(per_epoch * config.epochs))


def _with_lora(model: Any, rank: int, train_embeddings: bool) -> Any:
    from peft import LoraConfig, get_peft_model

    names = {module: name for name, module in model.named_modules()}
    # New special tokens need trainable embeddings; adapters alone cannot learn them.
    embeddings = [names[m].split(".")[-1] for m in (model.get_input_embeddings(), model.get_output_embeddings())]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules="all-linear",
                        modules_to_save=embeddings if train_embeddings else None, task_type="CAUSAL_LM")
    return get_peft_model(model, config)


class MlflowStepMetrics(TrainerCallback):
    """Logs the Trainer's numbers (loss, eval loss, learning rate) and tokens/s at every log step."""

    def __init__(self):
        self.last = (time.perf_counter(), 0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        metrics = {k: float(v) for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        seen = int(getattr(state, "num_input_tokens_seen", 0) or 0)
        now = time.perf_counter()
        if seen > self.last[1] and now > self.last[0]:
            metrics["tokens_per_second"] = (seen - self.last[1]) / (now - self.last[0])
            self.last = (now, seen)
        mlflow.log_metrics(metrics, step=state.global_step)


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


def _training_arguments(config: FinetuneConfig, output_dir: str, steps: int, has_eval: bool):
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
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
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        **_checkpointing(TrainingArguments, on_gpu),
        dataloader_pin_memory=on_gpu,
        include_num_input_tokens_seen=True,
        disable_tqdm=True,
        remove_unused_columns=False,
    )


def run_finetune(config: FinetuneConfig, spark: Any = None) -> FinetuneReport:
    """Fine-tune, register a new version of ``config.model_name`` with alias ``config.alias``,
    and return what happened. Everything is logged to one MLflow run."""
    from transformers import DataCollatorForSeq2Seq, Trainer

    records, source = load_records(config.train_data, spark)
    validation = validate_records(records)
    train_records, eval_records = stratified_split(validation.kept, config.eval_fraction, config.seed)
    if not train_records:
        raise ValueError(f"no usable training records in {config.train_data!r}: skipped {dict(validation.skipped)}")

    torch.manual_seed(config.seed)
    base = load_base_model(config.base_model)
    model, tokenizer, base_format = base.model, base.tokenizer, base.own_format
    trained_format = training_format(config.prompt_format, base_format)
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

    with mlflow.start_run(run_name=f"finetune-{config.model_name}") as run:
        mlflow.set_tags({"job": "finetune", "base_model": config.base_model})
        mlflow.log_params({**asdict(config), **source.as_params(), "new_special_tokens": new_tokens,
                           "trained_prompt_format": trained_format, "baseline_prompt_format": base_format,
                           "optimizer_steps": steps, "scoring_repetition_control": repetition or "off"})
        _log_training_input(source, validation.kept)
        mlflow.log_metrics({
            "records_read": len(records), "records_kept": len(validation.kept),
            "train_examples": len(train_set.examples), "eval_examples": len(eval_set.examples),
            **{f"records_skipped_{reason}": count for reason, count in skipped.items()},
        })
        metrics: dict[str, float] = {}
        if "base" in evaluations:
            metrics.update(flat_metrics("before", evaluations["base"]))

        trainable = _with_lora(model, config.lora_rank, new_tokens > 0) if config.lora else model
        with tempfile.TemporaryDirectory() as output_dir:
            trainer = Trainer(
                model=trainable,
                args=_training_arguments(config, output_dir, steps, bool(eval_set.examples)),
                train_dataset=train_set.examples,
                eval_dataset=eval_set.examples or None,
                data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100,
                                                     pad_to_multiple_of=8 if torch.cuda.is_available() else None),
                callbacks=[MlflowStepMetrics()],
            )
            length = f"max_steps {config.max_steps}" if config.max_steps > 0 else f"{config.epochs:.3g} epochs"
            log.info("training %s in the %s format: %d examples, %d steps (%s)",
                     config.base_model, trained_format, len(train_set.examples), steps, length)
            started = time.perf_counter()
            outcome = trainer.train()
            train_seconds = time.perf_counter() - started
        model = trainable.merge_and_unload() if config.lora else trainable
        model.eval()
        metrics["train_loss"] = float(outcome.training_loss)
        metrics["train_seconds"] = train_seconds

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
        version = log_and_register(
            model.to("cpu"), tokenizer, config.model_name, trained_format, alias=config.alias,
            metadata={"base_model": config.base_model, "base_model_uri": base.uri, "train_data": source.name,
                      "train_data_version": source.version, **baseline,
                      **({"special_tokens": list(DOLLY_SPECIAL_TOKENS)} if trained_format == "dolly" else {})},
            **repetition,
        )
        log.info("fine-tuned %s: version %s (@%s), metrics %s", config.model_name, version, config.alias, metrics)
        return FinetuneReport(run.info.run_id, config.model_name, version, len(train_set.examples),
                              len(eval_set.examples), skipped, metrics, train_seconds)


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
