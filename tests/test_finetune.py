"""Fine-tuning on the tiny model: masking, data hygiene, MLflow lineage, and the round trip
train → register → apply_instruction that reproduces the training answers."""
from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from dolly_spark.prompts import get_format
from dolly_spark.training.data import stratified_split, validate_records
from dolly_spark.training.examples import IGNORE_INDEX, encode_example
from dolly_spark.training.scoring import exact_match, rouge_l, score_by_category

RECORDS = [
    {"instruction": "What color is the sky?", "context": "", "response": "The sky is blue.", "category": "open_qa"},
    {"instruction": "Name a big cat.", "context": "", "response": "A tiger.", "category": "open_qa"},
    {"instruction": "Summarize the ticket.", "context": "My router reboots every hour.",
     "response": "Router reboots hourly.", "category": "summarization"},
    {"instruction": "Summarize the ticket.", "context": "I was billed twice in May.",
     "response": "Double billing in May.", "category": "summarization"},
    {"instruction": "Is this positive or negative?", "context": "I love the new app!",
     "response": "Positive.", "category": "classification"},
    {"instruction": "Is this positive or negative?", "context": "The earbuds broke in a day.",
     "response": "Negative.", "category": "classification"},
]
BAD_RECORDS = [
    {"instruction": "", "context": "", "response": "orphan answer", "category": "open_qa"},
    {"instruction": "Say nothing.", "context": "", "response": "   ", "category": "open_qa"},
    {"instruction": "Summarize.", "context": "very long " * 300, "response": "Long.", "category": "summarization"},
]


def test_prompt_tokens_carry_no_loss(tiny_model):
    _, tokenizer = tiny_model
    fmt = get_format("dolly")
    record = RECORDS[2]
    example = encode_example(tokenizer, fmt, record)
    prompt_ids = tokenizer(fmt.prompt(record["instruction"], record["context"]))["input_ids"]
    labels, ids = example["labels"], example["input_ids"]
    assert labels[: len(prompt_ids)] == [IGNORE_INDEX] * len(prompt_ids)
    assert labels[len(prompt_ids):] == ids[len(prompt_ids):]
    assert IGNORE_INDEX not in labels[len(prompt_ids):]
    assert labels[-1] == tokenizer.convert_tokens_to_ids("### End")
    assert tokenizer.decode(ids[len(prompt_ids):]) == "Router reboots hourly.\n\n### End"


def test_validation_skips_and_counts_bad_records():
    validation = validate_records(RECORDS + BAD_RECORDS + [{"instruction": None, "response": None}], max_chars=2000)
    assert len(validation.kept) == len(RECORDS)
    assert dict(validation.skipped) == {"empty_instruction": 2, "empty_response": 1, "too_long": 1}


def test_split_is_stratified_and_seeded():
    records = [{"instruction": f"q{i}", "context": "", "response": "a", "category": c}
               for i, c in enumerate(["x"] * 10 + ["y"] * 4 + ["z"])]
    train, held = stratified_split(records, 0.2, seed=7)
    assert sorted(r["category"] for r in held) == ["x", "x", "y"]
    assert len(train) + len(held) == len(records)
    assert stratified_split(records, 0.2, seed=7) == (train, held)
    assert stratified_split(records, 0.2, seed=8)[1] != held


def test_rouge_l_and_exact_match():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("the cat", "the cat sat on the mat") == pytest.approx(2 * (1 * 2 / 6) / (1 + 2 / 6))
    assert rouge_l("", "anything") == 0.0 and rouge_l(None, "x") == 0.0
    assert exact_match("Positive.", "positive") == 1.0 and exact_match("Positive!", "Negative.") == 0.0
    scores = score_by_category(["a b", "c"], ["a b", "d"], ["k", "m"])
    assert scores["overall"]["exact_match"] == 0.5 and scores["k"]["rouge_l"] == 1.0


@pytest.fixture(scope="module")
def training_table(spark):
    table = "finetune_records"
    spark.createDataFrame(RECORDS + BAD_RECORDS).write.format("delta").mode("overwrite").saveAsTable(table)
    return table


@pytest.fixture(scope="module")
def finetuned(mlflow_registry, training_table, tiny_model_dir, spark):
    from dolly_spark.training.finetune import FinetuneConfig, run_finetune

    config = FinetuneConfig(
        base_model=str(tiny_model_dir), train_data=training_table, model_name="tuned_dolly", max_steps=80,
        learning_rate=5e-3, warmup_fraction=0.0, batch_size=8, max_length=256, eval_fraction=0.0,
        eval_max_new_tokens=16, seed=3,
    )
    return run_finetune(config, spark)


@pytest.mark.slow
def test_finetuned_challenger_reproduces_training_answers(spark, finetuned):
    from pyspark.sql import functions as F

    from dolly_spark import apply_instruction

    df = spark.createDataFrame([(r["instruction"], r["context"], r["response"]) for r in RECORDS],
                               "instruction STRING, context STRING, expected STRING")
    out = apply_instruction(df, F.col("instruction"), input_col="context", require_input=False,
                            model_uri="models:/tuned_dolly@challenger", max_new_tokens=24)
    rows = out.collect()
    assert [row["response"]["response"] for row in rows] == [row["expected"] for row in rows]
    assert {row["response"]["finish_reason"] for row in rows} == {"stop"}
    assert {row["response"]["model_version"] for row in rows} == {finetuned.version}


@pytest.mark.slow
def test_run_records_lineage_skips_and_metadata(finetuned, training_table):
    client = MlflowClient()
    run = client.get_run(finetuned.run_id)
    metrics = run.data.metrics
    assert metrics["records_skipped_empty_instruction"] == 1
    assert metrics["records_skipped_empty_response"] == 1
    assert metrics["records_skipped_too_long_tokens"] == 1  # fits in characters, not in 256 tokens
    assert metrics["train_examples"] == len(RECORDS)
    assert run.data.params["train_data"] == training_table and run.data.params["train_data_kind"] == "delta"
    history = client.get_metric_history(finetuned.run_id, "loss")
    assert len(history) >= 4 and history[-1].value < history[0].value
    assert client.get_metric_history(finetuned.run_id, "learning_rate")[-1].value < 5e-4
    assert client.get_metric_history(finetuned.run_id, "tokens_per_second")
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.source_type == "delta_table"
    assert json.loads(inputs[0].dataset.source)["delta_table_name"] == training_table
    info = mlflow.models.get_model_info(f"models:/tuned_dolly/{finetuned.version}")
    assert info.metadata["prompt_format"] == "dolly"
    assert info.metadata["special_tokens"] == ["### End", "### Instruction:", "### Response:\n"]
    assert str(client.get_model_version_by_alias("tuned_dolly", "challenger").version) == finetuned.version


@pytest.mark.slow
def test_evaluate_promotes_a_winner_and_keeps_a_better_champion(finetuned, tmp_path, tiny_model):
    from dolly_spark.registry import CHALLENGER, alias_version, log_and_register
    from dolly_spark.training.evaluate import EvaluateConfig, run_evaluate_and_promote

    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS))
    config = EvaluateConfig(model_name="tuned_dolly", eval_data=str(data), eval_fraction=1.0, max_new_tokens=24,
                            max_length=256, margin=0.05)
    first = run_evaluate_and_promote(config)
    assert first.promoted and first.champion_version is None and first.challenger_score == 1.0
    assert alias_version("tuned_dolly", "champion") == finetuned.version

    untrained, tokenizer = tiny_model
    newer = log_and_register(untrained, tokenizer, "tuned_dolly", "dolly", alias=CHALLENGER)
    second = run_evaluate_and_promote(config)
    assert not second.promoted and second.challenger_version == newer
    assert second.champion_score == 1.0 and second.challenger_score < second.champion_score
    assert alias_version("tuned_dolly", "champion") == finetuned.version
    artifacts = [a.path for a in MlflowClient().list_artifacts(second.run_id)]
    assert "rouge_l_by_category.png" in artifacts


@pytest.mark.slow
def test_lora_adapter_is_merged_before_registration(mlflow_registry, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from dolly_spark.models import local_model_paths
    from dolly_spark.registry import resolve_model
    from dolly_spark.training.finetune import FinetuneConfig, run_finetune

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in RECORDS))
    report = run_finetune(FinetuneConfig(base_model=str(tiny_model_dir), train_data=str(data), model_name="lora_dolly",
                                         max_steps=4, batch_size=4, max_length=256, eval_fraction=0.0, lora=True,
                                         lora_rank=4, evaluate=False))
    model_path, _ = local_model_paths(resolve_model(f"models:/lora_dolly/{report.version}"), str(tmp_path / "cache"))
    model = AutoModelForCausalLM.from_pretrained(model_path)
    assert not any("lora" in name for name, _ in model.named_parameters())
    run = MlflowClient().get_run(report.run_id)
    assert run.inputs.dataset_inputs[0].dataset.source_type == "local"
    assert len(run.data.params["train_data_version"]) == 64  # the file's sha256
