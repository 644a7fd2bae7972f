"""Fine-tuning in more than one process through Spark's TorchDistributor (gloo on these CPUs):
the ranks train together and match one process with the same global batch, a rank lost mid-run
is relaunched from the newest complete checkpoint with the same result, one MLflow run and one
version; checkpoints of another configuration and settings that cannot run are refused."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from dolly_spark.training.checkpoints import (ConfigurationMismatch, RunState, claim, complete_checkpoints,
                                              newest_complete_checkpoint)
from dolly_spark.training.configs import FinetuneConfig
from test_finetune import RECORDS

# Eight records, two optimizer steps an epoch at a global batch of 4 (1 process x 4, or 2 x 2).
EIGHT = RECORDS + [{"instruction": "Name a fruit.", "context": "", "response": "An apple.", "category": "open_qa"},
                   {"instruction": "Name a color.", "context": "", "response": "Red.", "category": "open_qa"}]
# Measured here (2-core CPU, learning rate 5e-3, 4 steps, weights moved by up to 1.25e-2): 2
# processes x 2 against 1 x 4 differ by at most 2.1e-5 in any weight and 1.2e-7 in the loss
# (float32 sums in another order: gloo's all-reduce of two half-batch gradients against one
# full-batch gradient, which Adam's normalisation enlarges where gradients are near 0). Allowed:
# 1e-4. A resumed run equals the uninterrupted one exactly (difference 0).
TOLERANCE = 1e-4


def test_newest_complete_checkpoint_and_a_configuration_of_its_own(tmp_path):
    for step, complete in ((2, True), (4, True), (6, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_text("weights")
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    # checkpoint-6 is half-written (a crash during its save): the one before is taken, 6 removed.
    assert newest_complete_checkpoint(tmp_path) == (4, tmp_path / "checkpoint-4")
    assert not (tmp_path / "checkpoint-6").exists()
    assert [step for step, _ in complete_checkpoints(tmp_path)] == [2, 4]

    wanted = {"base_model": "models:/m/1", "train_data_version": "3", "learning_rate": 1e-5, "num_processes": 2}
    RunState(tmp_path, wanted, run_id="r1").save()
    resumed = claim(tmp_path, wanted)
    assert resumed.resumed and resumed.run_id == "r1" and complete_checkpoints(tmp_path)
    other = {**wanted, "learning_rate": 2e-5, "num_processes": 1}
    with pytest.raises(ConfigurationMismatch, match=r"learning_rate: 1e-05 -> 2e-05; num_processes: 2 -> 1"):
        claim(tmp_path, other)
    # --resume false discards them; a finished run leaves the directory to the next.
    fresh = claim(tmp_path, other, resume=False)
    assert not fresh.resumed and fresh.run_id is None and not complete_checkpoints(tmp_path)
    fresh.finished = True
    fresh.save()
    assert not claim(tmp_path, wanted).resumed


def test_settings_that_cannot_run_are_refused_before_training(spark, tmp_path):
    from dolly_spark.training.finetune import run_finetune

    missing = str(tmp_path / "never_read.jsonl")  # refused before the data is read
    with pytest.raises(ValueError, match=r"sharding fsdp needs GPUs, and these processes run on CPUs: .*plain DDP "
                                         r"over gloo. Use --sharding none on CPUs"):
        run_finetune(FinetuneConfig(train_data=missing, num_processes=2, sharding="fsdp"), spark)
    cores = os.cpu_count()
    with pytest.raises(ValueError, match=rf"{cores + 1} processes asked for, but the driver node \(CPU cores\) has "
                                         rf"{cores} free task slots"):
        run_finetune(FinetuneConfig(train_data=missing, num_processes=cores + 1), spark)
    with pytest.raises(ValueError, match="keep_checkpoints must be at least 2"):
        run_finetune(FinetuneConfig(train_data=missing, keep_checkpoints=1), spark)


def registered_weights(model_name: str, version: str, cache: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from dolly_spark.lifecycle.loader import local_model_paths
    from dolly_spark.lifecycle.registry import resolve_model

    path, _ = local_model_paths(resolve_model(f"models:/{model_name}/{version}"), str(cache))
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


@pytest.mark.slow
def test_two_processes_train_as_one_and_survive_a_lost_rank(spark, mlflow_registry, tiny_model_dir, tmp_path,
                                                            monkeypatch):
    from dolly_spark.training.distributed import rank_reports
    from dolly_spark.training.finetune import run_finetune

    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in EIGHT))
    common = dict(base_model=str(tiny_model_dir), train_data=str(data), model_name="dist_dolly", max_steps=4,
                  learning_rate=5e-3, warmup_fraction=0.0, max_length=256, eval_fraction=0.0, evaluate=False,
                  save_steps=2, seed=5)
    one = run_finetune(FinetuneConfig(**common, batch_size=4, checkpoint_dir=str(tmp_path / "one")), spark)
    two = run_finetune(FinetuneConfig(**common, batch_size=2, num_processes=2, checkpoint_dir=str(tmp_path / "two")),
                       spark)
    reports = rank_reports(tmp_path / "two", 0)
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert {(r["world_size"], r["backend"]) for r in reports} == {(2, "gloo")}

    # Rank 1 kills itself by its pid after step 3 of the first attempt; checkpoint-2 is the newest.
    monkeypatch.setenv("DOLLY_SPARK_FAULT", "rank1@3")
    lost = run_finetune(FinetuneConfig(**common, batch_size=2, num_processes=2,
                                       checkpoint_dir=str(tmp_path / "lost")), spark)
    assert (lost.restarts, lost.resumed_from) == (1, [2])
    assert [r["rank"] for r in rank_reports(tmp_path / "lost", 1)] == [0, 1]  # the relaunch

    cache = tmp_path / "cache"
    weights = {report.version: registered_weights("dist_dolly", report.version, cache) for report in (one, two, lost)}
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).state_dict()
    assert largest_difference(base, weights[one.version]) > 1e-3  # it trained
    assert largest_difference(weights[one.version], weights[two.version]) < TOLERANCE
    assert largest_difference(weights[two.version], weights[lost.version]) == 0.0
    assert abs(one.metrics["train_loss"] - two.metrics["train_loss"]) < TOLERANCE

    client = MlflowClient()
    # One version per job, restart or not; the restart and the step it resumed from on the run.
    versions = sorted(int(v.version) for v in client.search_model_versions("name='dist_dolly'"))
    assert versions == [1, 2, 3] and lost.version == "3"
    run = client.get_run(lost.run_id)
    assert run.data.metrics["restarts"] == 1 and run.data.tags["resumed_from_steps"] == "2"
    assert [m.value for m in client.get_metric_history(lost.run_id, "resumed_from_step")] == [2]
    assert run.data.params["num_processes"] == "2" and run.data.params["sharding"] == "none"
    # Rank 0 alone logs, and the steps the relaunch trained again are not logged twice.
    progress = [m.step for m in client.get_metric_history(lost.run_id, "progress_step")]
    assert sorted(progress) == [1, 2, 3, 4], progress
    losses = [m.step for m in client.get_metric_history(two.run_id, "loss")]
    assert len(losses) == len(set(losses)) == 4
    assert client.get_metric_history(two.run_id, "eta_seconds")
