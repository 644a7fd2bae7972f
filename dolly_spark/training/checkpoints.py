"""A fine-tune's checkpoints and the run they belong to.

``checkpoint_dir`` holds one unfinished run at a time: the Trainer's ``checkpoint-N`` folders,
and ``run.json``, which names the configuration the checkpoints belong to (base model version,
data version, hyperparameters, world size, sharding), the MLflow run they log to, and the
restarts so far. A later job with the same configuration resumes from the newest *complete*
checkpoint and continues the same MLflow run; one with another configuration is refused with
what differs. A finished run (its version registered) leaves the directory free for the next.

A checkpoint is complete when its ``trainer_state.json`` exists (transformers' rank 0 writes
that file last) and, for several processes, every rank's ``rng_state_<rank>.pth`` (each rank
writes its own, with no barrier before rank 0's last file). transformers' own resume takes the
highest-numbered folder whatever it holds, so a save cut short by a crash would fail the resume,
or resume a rank from another random state than the uninterrupted run's. Half-written folders
are passed over and removed.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
COMPLETE_MARKER = "trainer_state.json"  # written last by transformers' Trainer._save_checkpoint

# The settings that change what is trained: a checkpoint of another value of any of them is not
# this run's. (Scoring, naming, logging and fault-handling settings are not among them.)
TRAINING_SETTINGS = ("prompt_format", "epochs", "max_steps", "learning_rate", "warmup_fraction", "batch_size",
                     "gradient_accumulation", "max_length", "eval_fraction", "lora", "lora_rank", "seed",
                     "num_processes", "sharding", "offload_optimizer")


def default_checkpoint_dir(model_name: str) -> Path:
    """Where ``model_name``'s checkpoints go when the config names no folder: under the project home."""
    from dolly_spark.paths import project_home

    return project_home() / "checkpoints" / model_name


def checkpoint_dir_for(config: Any) -> Path:
    """The checkpoint folder of a fine-tune config: its ``checkpoint_dir``, or the default for its model."""
    return Path(config.checkpoint_dir).expanduser().resolve() if config.checkpoint_dir \
        else default_checkpoint_dir(config.model_name)


def configuration(config: Any, base_uri: str, source: Any, trained_format: str) -> dict[str, Any]:
    """What a checkpoint belongs to: the exact base model, the exact data, the training settings."""
    settings = {name: getattr(config, name) for name in TRAINING_SETTINGS}
    settings["prompt_format"] = trained_format
    return {"base_model": base_uri, "train_data": source.name, "train_data_kind": source.kind,
            "train_data_version": source.version, **settings}


def unfinished_configuration(directory: Path) -> dict[str, Any] | None:
    """The configuration of the unfinished run in ``directory``, if there is one."""
    run_file = Path(directory) / RUN_FILE
    if not run_file.is_file():
        return None
    saved = json.loads(run_file.read_text())
    return None if saved.get("finished") else saved.get("configuration")


def differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """``name: saved -> wanted`` for each setting that differs."""
    return [f"{name}: {saved.get(name)!r} -> {wanted.get(name)!r}"
            for name in sorted(set(saved) | set(wanted)) if saved.get(name) != wanted.get(name)]


class ConfigurationMismatch(ValueError):
    pass


def missing_files(folder: Path, world_size: int = 1) -> list[str]:
    """What a checkpoint folder of ``world_size`` processes lacks to be complete (nothing: [])."""
    wanted = [COMPLETE_MARKER] + ([f"rng_state_{rank}.pth" for rank in range(world_size)] if world_size > 1 else [])
    return [name for name in wanted if not (folder / name).is_file()]


def complete_checkpoints(directory: Path, world_size: int = 1) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in ``directory``, oldest first."""
    found = []
    for child in Path(directory).iterdir() if Path(directory).is_dir() else []:
        match = CHECKPOINT.match(child.name)
        if match and not missing_files(child, world_size):
            found.append((int(match[1]), child))
    return sorted(found)


def newest_complete_checkpoint(directory: Path, world_size: int = 1,
                               remove_incomplete: bool = True) -> tuple[int, Path] | None:
    """The newest complete checkpoint (step, folder) of a run of ``world_size`` processes, or
    None. Half-written folders are passed over, said in the log, and removed when
    ``remove_incomplete``: the resumed run saves its own in their place."""
    directory = Path(directory)
    complete = complete_checkpoints(directory, world_size)
    newest = complete[-1] if complete else None
    for child in sorted(directory.iterdir()) if directory.is_dir() else []:
        missing = missing_files(child, world_size) if CHECKPOINT.match(child.name) else []
        if missing:
            log.warning("passing over %s: half-written (no %s)%s", child, ", ".join(missing),
                        ", removed" if remove_incomplete else "")
            if remove_incomplete:
                shutil.rmtree(child, ignore_errors=True)
    return newest


@dataclass
class RunState:
    """``run.json``: the run the checkpoints of ``directory`` belong to."""

    directory: Path
    configuration: dict[str, Any]
    run_id: str | None = None
    restarts: int = 0
    resumed_from: list[int] = field(default_factory=list)
    finished: bool = False
    resumed: bool = False  # this job continues a run an earlier job left unfinished

    def save(self) -> None:
        """Write this state to its folder's run file."""
        self.directory.mkdir(parents=True, exist_ok=True)
        body = {"configuration": self.configuration, "run_id": self.run_id, "restarts": self.restarts,
                "resumed_from": self.resumed_from, "finished": self.finished}
        temporary = self.directory / f".{RUN_FILE}.tmp"
        temporary.write_text(json.dumps(body, indent=1, sort_keys=True))
        os.replace(temporary, self.directory / RUN_FILE)  # never a half-written run.json


def claim(directory: Path, wanted: dict[str, Any], resume: bool = True) -> RunState:
    """The run this job trains in ``directory``: the unfinished one there when its configuration
    is ``wanted`` (resumed), else a new one in an emptied directory. An unfinished run of another
    configuration is refused, naming each difference, unless ``resume`` is False."""
    directory = Path(directory)
    run_file = directory / RUN_FILE
    if run_file.is_file():
        saved = json.loads(run_file.read_text())
        if not saved.get("finished") and resume:
            changed = differences(saved["configuration"], wanted)
            if changed:
                raise ConfigurationMismatch(
                    f"the checkpoints in {directory} belong to another configuration ({'; '.join(changed)}): "
                    "resuming them under this one would train a mix of both. Run again with the same settings "
                    "to resume, or choose another --checkpoint-dir, or pass --resume false to discard them")
            state = RunState(directory, wanted, saved.get("run_id"), int(saved.get("restarts", 0)),
                             list(saved.get("resumed_from", [])), resumed=True)
            log.info("resuming the unfinished run %s in %s", state.run_id, directory)
            return state
    if directory.is_dir():
        for child in directory.iterdir():
            if CHECKPOINT.match(child.name) or child.name in ("staging", "final", "ranks", RUN_FILE):
                shutil.rmtree(child) if child.is_dir() else child.unlink()
    state = RunState(directory, wanted)
    state.save()
    return state
