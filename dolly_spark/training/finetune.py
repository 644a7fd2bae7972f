"""The fine-tune job: Dolly-style instruction tuning with transformers' Trainer, tracked in MLflow.

records → validate → stratified split → special tokens + resized embeddings → Trainer
(loss on response and stop key only, decaying learning rate) → [merge LoRA] → log with the
transformers flavor → register a new version → alias ``challenger``.
"""
from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import mlflow
import torch
from transformers import TrainerCallback

from dolly_spark.config import option
from dolly_spark.prompts import DOLLY_SPECIAL_TOKENS, get_format
from dolly_spark.registry import CHALLENGER, log_and_register
from dolly_spark.training.data import load_records, stratified_split, validate_records
from dolly_spark.training.model_scoring import category_chart, flat_metrics, score_model
from dolly_spark.training.examples import encode_examples

log = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    base_model: str = option("databricks/dolly-v2-3b", "hub id, local checkpoint or models:/ URI to start from")
    train_data: str = option("databricks/databricks-dolly-15k", "Delta table name or JSONL path of dolly-15k style records")
    model_name: str = option("support_dolly", "registered model name the result becomes a new version of")
    max_steps: int = option(200, "optimizer steps")
    learning_rate: float = option(1e-5, "peak learning rate (cosine decay after warm-up)")
    warmup_fraction: float = option(0.05, "share of steps spent warming up the learning rate")
    batch_size: int = option(8, "examples per device per step")
    gradient_accumulation: int = option(1, "steps whose gradients are summed before an update")
    max_length: int = option(1024, "longest example in tokens; longer ones are dropped and counted")
    eval_fraction: float = option(0.1, "share of each category held out for evaluation")
    eval_steps: int = option(50, "evaluate the held-out loss every this many steps")
    max_eval_records: int = option(64, "held-out records generated on for ROUGE-L (generation is slow)")
    eval_max_new_tokens: int = option(128, "longest generated answer when scoring")
    evaluate: bool = option(True, "score the base and the tuned model on the held-out split")
    lora: bool = option(False, "train LoRA adapters (merged into the model before registration)")
    lora_rank: int = option(16, "LoRA rank")
    seed: int = option(42, "seed of the split, the initialisation and the data order")
    experiment: str = option("dolly_spark", "MLflow experiment of the fine-tune run")
    alias: str = option(CHALLENGER, "alias the new version gets")


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


def load_base_model(base_model: str) -> tuple[Any, Any]:
    """(model, tokenizer) of a hub id, a local checkpoint or a registered model URI."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dolly_spark.models import local_model_paths
    from dolly_spark.registry import resolve_model

    model_path = tokenizer_path = base_model
    if base_model.startswith("models:/"):
        model_path, tokenizer_path = local_model_paths(resolve_model(base_model))
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return model, tokenizer


def add_dolly_tokens(model: Any, tokenizer: Any) -> int:
    """Add the Dolly keys as special tokens (pad = eos when unset) and resize the embeddings;
    return how many tokens were new."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    added = tokenizer.add_special_tokens({"additional_special_tokens": list(DOLLY_SPECIAL_TOKENS)},
                                         replace_extra_special_tokens=False)
    if added:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return added


def _with_lora(model: Any, rank: int) -> Any:
    from peft import LoraConfig, get_peft_model

    names = {module: name for name, module in model.named_modules()}
    # The new special tokens need trainable embeddings; adapters alone cannot learn them.
    embeddings = [names[m].split(".")[-1] for m in (model.get_input_embeddings(), model.get_output_embeddings())]
    config = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.05, target_modules="all-linear",
                        modules_to_save=embeddings, task_type="CAUSAL_LM")
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


def _training_arguments(config: FinetuneConfig, output_dir: str, has_eval: bool):
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=output_dir,
        max_steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=int(config.max_steps * config.warmup_fraction),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation,
        logging_steps=max(1, min(10, config.max_steps // 10)),
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.eval_steps,
        save_strategy="no",
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        bf16=on_gpu and torch.cuda.is_bf16_supported(),
        activation_checkpointing=on_gpu,
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
    model, tokenizer = load_base_model(config.base_model)
    new_tokens = add_dolly_tokens(model, tokenizer)
    fmt = get_format("dolly")
    train_set = encode_examples(tokenizer, fmt, train_records, config.max_length)
    eval_set = encode_examples(tokenizer, fmt, eval_records, config.max_length)
    skipped = {**validation.skipped, "too_long_tokens": train_set.dropped_too_long + eval_set.dropped_too_long}
    if not train_set.examples:
        raise ValueError(
            f"every training example of {config.train_data!r} is longer than max_length={config.max_length} "
            f"tokens ({train_set.dropped_too_long} dropped); raise --max-length"
        )
    scored = eval_records[: config.max_eval_records]

    with mlflow.start_run(run_name=f"finetune-{config.model_name}") as run:
        mlflow.set_tags({"job": "finetune", "base_model": config.base_model})
        mlflow.log_params({**asdict(config), **source.as_params(), "new_special_tokens": new_tokens})
        _log_training_input(source, validation.kept)
        mlflow.log_metrics({
            "records_read": len(records), "records_kept": len(validation.kept),
            "train_examples": len(train_set.examples), "eval_examples": len(eval_set.examples),
            **{f"records_skipped_{reason}": count for reason, count in skipped.items()},
        })
        metrics: dict[str, float] = {}
        evaluations = {}
        if config.evaluate and scored:
            evaluations["base"] = _score(model, tokenizer, scored, config)
            metrics.update(flat_metrics("before", evaluations["base"]))

        trainable = _with_lora(model, config.lora_rank) if config.lora else model
        with tempfile.TemporaryDirectory() as output_dir:
            trainer = Trainer(
                model=trainable,
                args=_training_arguments(config, output_dir, bool(eval_set.examples)),
                train_dataset=train_set.examples,
                eval_dataset=eval_set.examples or None,
                data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100,
                                                     pad_to_multiple_of=8 if torch.cuda.is_available() else None),
                callbacks=[MlflowStepMetrics()],
            )
            started = time.perf_counter()
            outcome = trainer.train()
            train_seconds = time.perf_counter() - started
        model = trainable.merge_and_unload() if config.lora else trainable
        model.eval()
        metrics["train_loss"] = float(outcome.training_loss)
        metrics["train_seconds"] = train_seconds

        if config.evaluate and scored:
            evaluations["tuned"] = _score(model, tokenizer, scored, config)
            metrics.update(flat_metrics("after", evaluations["tuned"]))
            mlflow.log_figure(category_chart(evaluations), "rouge_l_by_category.png")
        mlflow.log_metrics(metrics)

        version = log_and_register(
            model.to("cpu"), tokenizer, config.model_name, "dolly", alias=config.alias,
            metadata={"base_model": config.base_model, "special_tokens": list(DOLLY_SPECIAL_TOKENS),
                      "train_data": source.name, "train_data_version": source.version},
        )
        log.info("fine-tuned %s: version %s (@%s), metrics %s", config.model_name, version, config.alias, metrics)
        return FinetuneReport(run.info.run_id, config.model_name, version, len(train_set.examples),
                              len(eval_set.examples), skipped, metrics, train_seconds)


def _score(model, tokenizer, records, config: FinetuneConfig) -> dict[str, Any]:
    return score_model(model, tokenizer, records, "dolly", config.eval_max_new_tokens, config.max_length)


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
