"""Fine-tuning in more than one process through Spark's TorchDistributor (gloo on these CPUs):
the README's command in two processes loses a rank (relaunched from the newest complete
checkpoint), then its job process is killed and the same command run again resumes; the ranks
train together and the result matches one process with the same global batch, in one MLflow run
and one version. Checkpoints of another configuration and settings that cannot run are refused."""
from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path

import pytest

from dolly_spark.training.checkpoints import (ConfigurationMismatch, RunState, claim, complete_checkpoints,
                                              newest_complete_checkpoint)
from dolly_spark.training.configs import FinetuneConfig
from finetune_helpers import (SETTINGS, eight_records_file, flags, one_process_run, registered_weights,
                              relative_distance, the_run_of_the_one_version, weights_of)
from project_home import REPO, background_command, home_registry, run_command


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
    # In two processes each rank saves its own RNG state, with no barrier before rank 0's
    # trainer_state.json: a folder without rank 1's is half-written too.
    two = tmp_path / "two"
    for step, ranks in ((8, (0, 1)), (10, (0,))):
        (two / f"checkpoint-{step}").mkdir(parents=True)
        for name in ["trainer_state.json"] + [f"rng_state_{rank}.pth" for rank in ranks]:
            (two / f"checkpoint-{step}" / name).write_text("{}")
    assert newest_complete_checkpoint(two, world_size=2) == (8, two / "checkpoint-8")
    assert not (two / "checkpoint-10").exists()

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


# The README's command, then this test's settings: 24 steps of the tiny model at a global batch of
# 4, a checkpoint every 4 steps. Rank 1 kills itself after step 5 of the first launch (its newest
# complete checkpoint is 4); the test kills the job once the relaunch has saved checkpoint 8 or
# later, which leaves up to 16 steps (1 to 3 s here) for the kill to land mid-training.
DOCS_FINETUNE = "spark-submit jobs/finetune.py --config conf/finetune.yaml --num-processes 2"
STEPS, SAVE_STEPS, LOST_RANK_STEP, KILL_FROM_STEP = 24, 4, 5, 8
TRAINING = dict(max_steps=STEPS, **SETTINGS)


def newest_step(directory: Path) -> int:
    return max((step for step, _ in complete_checkpoints(directory, world_size=2)), default=0)


def job_driver(shell_pid: int):
    """The job's Python driver among the processes ``spark-submit`` started (bash, the JVM, and
    the Python process the JVM runs the job in), once it is there."""
    import psutil

    for child in psutil.Process(shell_pid).children(recursive=True):
        try:
            if child.name().startswith("python") and any("jobs/finetune.py" in part for part in child.cmdline()):
                return child
        except psutil.NoSuchProcess:
            pass
    return None


@pytest.mark.slow
def test_readme_command_in_two_processes_survives_a_lost_rank_and_a_killed_job(mlflow_registry, tiny_model_dir,
                                                                               tmp_path):
    import psutil

    from dolly_spark.training.distributed import rank_reports

    assert DOCS_FINETUNE in (REPO / "docs" / "fine-tuning-distributed.md").read_text(encoding="utf-8")
    # The jobs page's fine-tune command, which this runs with two processes.
    assert DOCS_FINETUNE.removesuffix(" --num-processes 2") in (REPO / "docs" / "jobs.md").read_text(encoding="utf-8")
    data = eight_records_file(tmp_path)
    home = tmp_path / "home"  # a clean project home: the job needs nothing but the model and the data
    command = f"{DOCS_FINETUNE} --base-model {tiny_model_dir} --train-data {data} --model-name two_dolly " \
              f"--batch-size 2 --save-steps {SAVE_STEPS} {flags(TRAINING)}"
    checkpoints = home / "checkpoints" / "two_dolly"

    # The first job: rank 1 dies, the driver relaunches both from checkpoint 4; once the relaunch
    # has saved a later one, the job's driver process is killed by its pid.
    log = tmp_path / "first_job.log"
    with background_command(command, home, log, DOLLY_SPARK_FAULT=f"rank1@{LOST_RANK_STEP}") as job:
        deadline = time.monotonic() + 420
        while newest_step(checkpoints) < KILL_FROM_STEP:
            assert job.poll() is None, log.read_text()[-4000:]
            assert time.monotonic() < deadline, log.read_text()[-4000:]
            time.sleep(0.05)
        driver = job_driver(job.pid)
        ranks = driver.children(recursive=True)  # torchrun and the two ranks
        driver.send_signal(signal.SIGKILL)
        assert job.wait(timeout=60) != 0
        # The driver's orphans (torchrun and the ranks) end on their own: none trains on unwatched.
        gone, alive = psutil.wait_procs(ranks, timeout=20)
        assert not alive, [p.cmdline() for p in alive]
    output = log.read_text()
    killed_at = newest_step(checkpoints)
    assert KILL_FROM_STEP <= killed_at < STEPS, output[-3000:]
    assert "registered two_dolly" not in output and not (checkpoints / "final").exists()
    assert "restart 1 of at most 2, from the newest complete checkpoint" in output, output[-3000:]
    assert [(r["rank"], r["world_size"], r["backend"]) for r in rank_reports(checkpoints, 1)] == \
        [(0, 2, "gloo"), (1, 2, "gloo")]

    # The same command again: it resumes from the newest complete checkpoint, in the same run.
    result = run_command(command, home)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "registered two_dolly version 1 as @challenger" in output, output[-3000:]
    assert re.search(rf"resuming from \S+/checkpoint-{killed_at} \(step {killed_at}\)", output), output[-3000:]
    assert [(r["rank"], r["world_size"], r["backend"]) for r in rank_reports(checkpoints, 0)] == \
        [(0, 2, "gloo"), (1, 2, "gloo")]

    # One version, whatever the restarts and reruns, from one run, continued by the rerun.
    client = home_registry(home)
    run = the_run_of_the_one_version(client, "two_dolly")
    assert run.data.metrics["restarts"] == 1
    assert run.data.tags["resumed_from_steps"] == f"{SAVE_STEPS},{killed_at}"
    assert run.data.params["num_processes"] == "2" and run.data.params["sharding"] == "none"
    # Rank 0 alone logs, and no step is logged twice across the relaunch and the rerun; progress
    # (step N of M and the time left) at every logging step.
    logged = int(run.data.params["optimizer_steps"]) // 10
    progress = [m.step for m in client.get_metric_history(run.info.run_id, "progress_step")]
    assert sorted(progress) == list(range(logged, STEPS + 1, logged)), progress
    losses = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert len(losses) == len(set(losses)) == STEPS // logged
    assert client.get_metric_history(run.info.run_id, "eta_seconds")[-1].value == 0

    # One process with the same global batch (1 x 4 against 2 x 2), uninterrupted.
    one, single_losses = one_process_run(tiny_model_dir, data, "one_dolly", tmp_path / "one", TRAINING)
    # Step by step, up to step 8 (through the relaunch from checkpoint 4), the two train alike:
    # measured here, the losses differ by at most 5e-7 (float32 sums in another order). Later,
    # Adam turns that noise into whole steps of the learning rate wherever a weight's gradient
    # is near 0, and the runs drift apart (7e-5 at step 10, 7e-3 at step 24 at a learning rate of
    # 5e-3; an uninterrupted 2-process run drifts exactly as the resumed one, loss for loss).
    two_losses = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    early = [step for step in sorted(single_losses) if step <= KILL_FROM_STEP]
    assert max(abs(single_losses[step] - two_losses[step]) for step in early) < 1e-5
    # So the final weights are compared by how far they moved: measured, the 2-process model is
    # 0.018 of the distance training moved the weights away from the 1-process one (learning
    # rate 1e-3, 24 steps; 1.8e-3 at most in any weight). Allowed: 0.05.
    single = registered_weights("one_dolly", one.version, tmp_path / "cache")
    two = weights_of(checkpoints / "final")  # what the driver registered
    base = weights_of(tiny_model_dir)
    assert relative_distance(single, two, base) < 0.05
