"""Fine-tuning on the tiny model: masking in both training formats, data hygiene, MLflow lineage,
the fair baseline on a real held-out split, the round trip train → register → apply_instruction
that reproduces the training answers, and promotion that never rewards a regression."""
from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from dolly_spark.prompts import get_format
from dolly_spark.training.data import stratified_split, validate_records
from dolly_spark.training.examples import IGNORE_INDEX, encode_example
from dolly_spark.training.metrics import exact_match, paired_bootstrap, rouge_l, score_by_category
from finetune_helpers import RECORDS

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
    assert [r["category"] for r in held[:2]] == ["x", "y"]  # categories in turn: a cap stays stratified
    assert len(train) + len(held) == len(records)
    assert stratified_split(records, 0.2, seed=7) == (train, held)
    assert stratified_split(records, 0.2, seed=8)[1] != held


def test_rouge_l_exact_match_stop_rate_and_bootstrap():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("the cat", "the cat sat on the mat") == pytest.approx(2 * (1 * 2 / 6) / (1 + 2 / 6))
    # Standard ROUGE-L stems words, so an inflection still counts as the same word.
    assert rouge_l("the cats sat", "the cat sat") == 1.0
    assert rouge_l("", "anything") == 0.0 and rouge_l(None, "x") == 0.0
    assert exact_match("Positive.", "positive") == 1.0 and exact_match("Positive!", "Negative.") == 0.0
    scores = score_by_category(["a b", "c", "e"], ["a b", "d", "e"], ["k", "m", "m"], stopped=[True, False, True])
    assert scores["overall"]["exact_match"] == pytest.approx(2 / 3) and scores["k"]["rouge_l"] == 1.0
    assert scores["m"]["stop_rate"] == 0.5 and scores["overall"]["stop_rate"] == pytest.approx(2 / 3)
    gain, low, high = paired_bootstrap([0.1, 0.2, 0.3, 0.2] * 5, [0.3, 0.3, 0.4, 0.2] * 5)
    assert gain == pytest.approx(0.1) and 0 < low < gain < high < 0.2
    gain, low, high = paired_bootstrap([0.1, 0.5] * 10, [0.5, 0.1] * 10)
    assert gain == pytest.approx(0) and low < 0 < high  # no gain: the interval holds 0


def test_max_steps_is_the_exact_number_of_optimizer_steps_whatever_the_epochs():
    from dolly_spark.training.finetune import FinetuneConfig, optimizer_steps

    # As transformers' TrainingArguments.max_steps: more steps than the epochs would give, or fewer.
    assert optimizer_steps(4, FinetuneConfig(max_steps=120, batch_size=4)) == 120
    assert optimizer_steps(4, FinetuneConfig(max_steps=120, batch_size=4, epochs=0.5)) == 120
    assert optimizer_steps(1000, FinetuneConfig(max_steps=2, batch_size=4, epochs=3)) == 2
    # 0 or negative: the epochs decide (a partial batch is a step; at least one step).
    assert optimizer_steps(4, FinetuneConfig(max_steps=0, batch_size=4, epochs=3)) == 3
    assert optimizer_steps(10, FinetuneConfig(max_steps=-1, batch_size=4, gradient_accumulation=2, epochs=2)) == 4
    assert optimizer_steps(4, FinetuneConfig(batch_size=8, epochs=0.1)) == 1


def test_training_format_follows_the_base_unless_asked():
    from dolly_spark.training.tokens import training_format

    assert training_format("auto", "chat") == "chat" and training_format("auto", "plain") == "dolly"
    assert training_format("dolly", "chat") == "dolly" and training_format("chat", "dolly") == "chat"
    with pytest.raises(ValueError, match="prompt_format must be dolly, chat or auto"):
        training_format("alpaca", "chat")


@pytest.fixture(scope="module")
def tiny_chat_dir(tmp_path_factory):
    """A tiny chat model: a chat template and end-of-turn token, no Dolly keys in its vocabulary."""
    from conftest import tokenizer_corpus

    from dolly_spark.testing.tiny_models import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("tiny_chat"), tokenizer_corpus(), seed=1, dolly_keys=False)


def test_chat_format_loss_falls_on_the_assistant_turn_and_its_end_of_turn_only(tiny_chat_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dolly_spark.prompts import stop_token_ids

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    fmt = get_format("chat", tokenizer)
    record = RECORDS[2]
    example = encode_example(tokenizer, fmt, record, stop_token_ids(model, tokenizer, "chat"))
    ids, labels = example["input_ids"], example["labels"]
    learned = [token for token, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert [label for label in labels if label != IGNORE_INDEX] == learned
    assert tokenizer.decode(learned) == "Router reboots hourly.<|im_end|>"
    # Everything before is the prompt (the user turn and the generation prompt), and the
    # template's newline after the end-of-turn token is not learned either.
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    assert tokenizer.decode(ids[:first]).endswith("My router reboots every hour.<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(ids[first + len(learned):]) == "\n"


@pytest.fixture(scope="module")
def training_table(spark):
    table = "finetune_records"
    spark.createDataFrame(RECORDS + BAD_RECORDS).write.format("delta").mode("overwrite").saveAsTable(table)
    return table


@pytest.fixture(scope="module")
def finetuned(mlflow_registry, training_table, tiny_model_dir, spark):
    from dolly_spark.lifecycle.registry import alias_version
    from dolly_spark.training.finetune import FinetuneConfig, run_finetune

    config = FinetuneConfig(
        base_model=str(tiny_model_dir), train_data=training_table, model_name="tuned_dolly", epochs=80,
        learning_rate=5e-3, warmup_fraction=0.0, batch_size=8, max_length=256, eval_fraction=0.0,
        eval_max_new_tokens=16, seed=3,
    )
    report = run_finetune(config, spark)
    # Read now: a later test registers a newer challenger of the same name.
    report.challenger_alias_after_run = alias_version("tuned_dolly", "challenger")
    return report


@pytest.mark.slow
def test_finetuned_challenger_reproduces_training_answers(spark, finetuned):
    from pyspark.sql import functions as F

    from dolly_spark import apply_instruction

    df = spark.createDataFrame([(r["instruction"], r["context"], r["response"]) for r in RECORDS],
                               "instruction STRING, context STRING, expected STRING")
    out = apply_instruction(df, F.col("instruction"), input_col="context", require_input=False,
                            model_uri=f"models:/tuned_dolly/{finetuned.version}", max_new_tokens=24)
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
    assert finetuned.challenger_alias_after_run == finetuned.version


@pytest.mark.slow
def test_evaluate_promotes_a_winner_and_keeps_a_better_champion(finetuned, tmp_path, tiny_model):
    from dolly_spark.lifecycle.registry import CHALLENGER, alias_version, log_and_register
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

    from dolly_spark.lifecycle.loader import local_model_paths
    from dolly_spark.lifecycle.registry import resolve_model
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


def test_new_dolly_keys_start_from_what_the_model_knows(tiny_chat_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dolly_spark.training.tokens import add_dolly_tokens

    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    pieces = tokenizer("### Instruction:", add_special_tokens=False)["input_ids"]
    before = model.get_input_embeddings().weight[pieces].mean(dim=0).clone()
    assert add_dolly_tokens(model, tokenizer) == 3
    inputs, outputs = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert torch.equal(inputs[tokenizer.convert_tokens_to_ids("### Instruction:")], before)
    end = tokenizer.convert_tokens_to_ids("### End")
    assert torch.equal(outputs[end], outputs[tokenizer.eos_token_id])  # predicted where EOS would be


@pytest.mark.slow
@pytest.mark.parametrize("requested, trained, added", [("dolly", "dolly", 3), ("auto", "chat", 0)])
def test_base_is_scored_unmodified_in_its_own_format_on_a_real_split(mlflow_registry, tiny_chat_dir,
                                                                       requested, trained, added):
    from conftest import SHARED_DATA
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dolly_spark.training.data import load_records
    from dolly_spark.training.finetune import FinetuneConfig, run_finetune
    from dolly_spark.training.model_scoring import score_model

    config = FinetuneConfig(base_model=str(tiny_chat_dir), train_data=str(SHARED_DATA), model_name=f"chat_{trained}",
                            prompt_format=requested, epochs=1, batch_size=8, max_length=256, eval_fraction=0.25,
                            max_eval_records=12, eval_max_new_tokens=8, seed=5)
    report = run_finetune(config)
    run = MlflowClient().get_run(report.run_id)
    params, metrics = run.data.params, run.data.metrics
    assert params["baseline_prompt_format"] == "chat" and params["trained_prompt_format"] == trained
    assert params["new_special_tokens"] == str(added)

    # The logged before-scores are those of the base as it is, in the chat format: scored again
    # here on the same held-out split, from the untouched checkpoint.
    held_out = stratified_split(validate_records(load_records(str(SHARED_DATA))[0]).kept, 0.25, 5)[1][:12]
    assert len(held_out) == 12 and len({r["category"] for r in held_out}) >= 4
    base = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    again = score_model(base, tokenizer, held_out, "chat", 8, 256)
    assert metrics["before_eval_loss"] == pytest.approx(again["eval_loss"], rel=1e-5)
    assert metrics["before_rouge_l"] == pytest.approx(again["scores"]["overall"]["rouge_l"])
    in_dolly_format = score_model(base, tokenizer, held_out, "dolly", 8, 256)["eval_loss"]
    assert abs(in_dolly_format - again["eval_loss"]) > 1e-3  # the format is what was measured
    for stage in ("before", "after"):
        assert 0.0 <= metrics[f"{stage}_stop_rate"] <= 1.0
    assert metrics["rouge_l_gain_low"] <= metrics["rouge_l_gain"] <= metrics["rouge_l_gain_high"]
    assert metrics["eval_examples"] > 0 and metrics["train_examples"] > 12

    info = mlflow.models.get_model_info(f"models:/chat_{trained}/{report.version}")
    assert info.metadata["prompt_format"] == trained
    assert info.metadata["baseline_prompt_format"] == "chat"
    assert info.metadata["base_model_uri"] == str(tiny_chat_dir.resolve())
    artifacts = {a.path for a in MlflowClient().list_artifacts(report.run_id)}
    assert {"rouge_l_by_category.png", "held_out_answers.json"} <= artifacts


@pytest.mark.slow
def test_a_challenger_worse_than_its_base_is_not_promoted(finetuned, tmp_path):
    from dolly_spark.lifecycle.registry import alias_version
    from dolly_spark.training.evaluate import EvaluateConfig, run_evaluate_and_promote
    from dolly_spark.training.finetune import FinetuneConfig, run_finetune

    # Taught the wrong answers on purpose, starting from the version that knows the right ones.
    wrong = [{**record, "response": RECORDS[(i + 1) % len(RECORDS)]["response"]} for i, record in enumerate(RECORDS)]
    data = tmp_path / "wrong.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in wrong))
    regressed = run_finetune(FinetuneConfig(
        base_model=f"models:/tuned_dolly/{finetuned.version}", train_data=str(data), model_name="regressed_dolly",
        epochs=40, learning_rate=5e-3, warmup_fraction=0.0, batch_size=8, max_length=256, eval_fraction=0.0, seed=3))

    right = tmp_path / "right.jsonl"
    right.write_text("\n".join(json.dumps(r) for r in RECORDS))
    report = run_evaluate_and_promote(EvaluateConfig(model_name="regressed_dolly", eval_data=str(right),
                                                     eval_fraction=1.0, max_new_tokens=24, max_length=256))
    assert report.champion_version is None  # no champion: the base is the only reference
    assert report.base_score == 1.0 and report.challenger_score < report.base_score
    assert not report.promoted and alias_version("regressed_dolly", "champion") is None
    assert MlflowClient().get_run(report.run_id).data.tags["base_prompt_format"] == "dolly"


@pytest.mark.slow
def test_both_models_are_scored_and_the_new_version_registered_with_the_bases_repetition_control(
        mlflow_registry, tiny_chat_dir):
    from conftest import SHARED_DATA
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dolly_spark.lifecycle.registry import log_and_register, resolve_model
    from dolly_spark.training.data import load_records
    from dolly_spark.training.finetune import FinetuneConfig, run_finetune
    from dolly_spark.training.model_scoring import score_model

    base = AutoModelForCausalLM.from_pretrained(tiny_chat_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_chat_dir)
    control = {"repetition_penalty": 1.3, "no_repeat_ngram_size": 2}
    version = log_and_register(base, tokenizer, "controlled_chat", "chat", **control)
    config = FinetuneConfig(base_model=f"models:/controlled_chat/{version}", train_data=str(SHARED_DATA),
                            model_name="controlled_chat", epochs=1, batch_size=8, max_length=256, eval_fraction=0.25,
                            max_eval_records=6, eval_max_new_tokens=12, seed=5)
    report = run_finetune(config)
    run = MlflowClient().get_run(report.run_id)
    assert run.data.params["scoring_repetition_control"] == str(control)
    # The before-score is the base's as the jobs run it: with its registered control.
    held_out = stratified_split(validate_records(load_records(str(SHARED_DATA))[0]).kept, 0.25, 5)[1][:6]
    controlled = score_model(base, tokenizer, held_out, "chat", 12, 256, control)
    assert run.data.metrics["before_rouge_l"] == pytest.approx(controlled["scores"]["overall"]["rouge_l"])
    assert resolve_model(f"models:/controlled_chat/{report.version}").registered_defaults == control

    # Set in the config, it wins; 0 turns the n-gram ban off.
    import dataclasses
    override = run_finetune(dataclasses.replace(config, no_repeat_ngram_size=0, evaluate=False))
    assert resolve_model(f"models:/controlled_chat/{override.version}").registered_defaults == {
        "repetition_penalty": 1.3}
