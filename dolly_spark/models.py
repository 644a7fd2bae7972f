"""Executor-side model loading: files fetched once per node, the engine loaded once per process.

Registry models are downloaded into the node-local cache under a directory named by their
version, behind a file lock (parallel Python workers on one node download once) and with an
atomic rename (a crashed download never looks complete). Each load is appended to the
version's load ledger, which is how benchmarks and tests count loads across worker processes.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import socket
import shutil
import threading
import time
from pathlib import Path

from filelock import FileLock

from dolly_spark.registry import ModelSpec
from dolly_spark.settings import model_cache_dir

log = logging.getLogger(__name__)

LOAD_LEDGER = "loads.log"
DOWNLOAD_LEDGER = "downloads.log"
_models: dict[tuple, tuple] = {}  # (spec, gpu, dtype) -> (model, tokenizer); at most one entry
_engines: dict[tuple, object] = {}  # ((spec, gpu, dtype), settings) -> InstructionEngine
_engines_lock = threading.Lock()


def version_cache_dir(spec: ModelSpec, cache_root: str | None = None) -> Path:
    """The node-local directory for ``spec``'s files and its load ledger, under ``cache_root``
    (default: the project's model cache)."""
    directory = (Path(cache_root) if cache_root else model_cache_dir()) / spec.cache_key
    directory.mkdir(parents=True, exist_ok=True)
    return directory


def fetch_model_files(spec: ModelSpec, cache_root: str | None = None) -> str:
    """A local path (or, for hub models, the hub id) from which transformers loads ``spec``."""
    if spec.kind != "registry":
        return spec.uri
    target = version_cache_dir(spec, cache_root) / "files"
    if target.exists():
        return str(target)
    with FileLock(str(target.with_name("download.lock"))):
        if target.exists():  # another worker finished the download while we waited
            return str(target)
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        import mlflow

        if spec.tracking_uri:
            mlflow.set_tracking_uri(spec.tracking_uri)
        if spec.registry_uri:
            mlflow.set_registry_uri(spec.registry_uri)
        staging = target.with_name(f"files.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        started = time.perf_counter()
        try:
            mlflow.artifacts.download_artifacts(artifact_uri=spec.uri, dst_path=str(staging))
            os.rename(staging, target)
        except BaseException:
            # A killed or failed download must not leave gigabytes behind for every retry.
            shutil.rmtree(staging, ignore_errors=True)
            raise
        seconds = time.perf_counter() - started
        _append_ledger(target.with_name(DOWNLOAD_LEDGER), f"pid={os.getpid()} seconds={seconds:.2f}")
        log.info("downloaded %s to %s in %.1fs", spec.uri, target, seconds)
    return str(target)


def stage_for_executors(spec: ModelSpec, shared_dir: str) -> ModelSpec:
    """Download ``spec``'s files once, here on the driver, into ``shared_dir`` (a location every
    node reads: a UC Volume, DBFS, a shared file system); return the spec executors load from
    there, with the same name and version and no registry to call."""
    if spec.kind != "registry":
        return spec
    files = fetch_model_files(spec, shared_dir)
    return dataclasses.replace(spec, kind="local", uri=files, tracking_uri=None, registry_uri=None)


def checkpoint_paths(model_dir: str) -> tuple[str, str]:
    """(model path, tokenizer path) inside a model directory.

    An MLflow transformers model keeps the weights in ``model/`` and the tokenizer in
    ``components/tokenizer/``; a plain checkpoint keeps both at its top level.
    """
    root = Path(model_dir)
    if (root / "MLmodel").exists():
        weights = root / "model"
        tokenizer = root / "components" / "tokenizer"
        return str(weights), str(tokenizer if tokenizer.exists() else weights)
    return model_dir, model_dir


def local_model_paths(spec: ModelSpec, cache_root: str | None = None) -> tuple[str, str]:
    """(model path, tokenizer path) of ``spec`` on this node, fetched into the cache if needed."""
    return checkpoint_paths(fetch_model_files(spec, cache_root))


def load_engine(spec: ModelSpec, settings, gpu_index: int | None = None, cache_root: str | None = None,
                dtype: str | None = None):
    """The InstructionEngine for ``spec`` and ``settings``. The model is loaded at most once per
    process and shared by the engines of every settings; a different model (another version,
    device or dtype) replaces it rather than sitting beside it in GPU memory."""
    from dolly_spark.engine import InstructionEngine

    model_key = (spec, gpu_index, dtype)
    with _engines_lock:
        engine = _engines.get((model_key, settings))
        if engine is None:
            if model_key in _models:
                engine = InstructionEngine(*_models[model_key], spec.prompt_format, settings)
            else:
                engine = _load(model_key, settings, cache_root)
                _models[model_key] = (engine.model, engine.tokenizer)
            _engines[(model_key, settings)] = engine
    return engine


def forget_model(spec: ModelSpec, gpu_index: int | None = None, dtype: str | None = None) -> None:
    """Drop this process's loaded copy of ``spec`` and every engine built on it, so the next
    ``load_engine`` loads it afresh. For a task that failed in generation: the model (or the
    device under it) may be what broke, and a retry in this process must not inherit it. Its
    memory is freed once the failure's traceback is gone (``_load`` collects before loading)."""
    model_key = (spec, gpu_index, dtype)
    with _engines_lock:
        _models.pop(model_key, None)
        for key in [key for key in _engines if key[0] == model_key]:
            del _engines[key]


def _load(model_key: tuple, settings, cache_root: str | None):
    """Load a model, after dropping the one loaded before (there is at most one per process)."""
    from dolly_spark.engine import InstructionEngine

    _models.clear()
    _engines.clear()
    _release_accelerator_memory()
    spec, gpu_index, dtype = model_key
    started = time.perf_counter()
    model_path, tokenizer_path = local_model_paths(spec, cache_root)
    engine = InstructionEngine.from_pretrained(
        model_path, spec.prompt_format, settings, gpu_index=gpu_index, tokenizer_path=tokenizer_path, dtype=dtype
    )
    _record_load(spec, engine, time.perf_counter() - started, cache_root)
    return engine


def _release_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _record_load(spec: ModelSpec, engine, seconds: float, cache_root: str | None) -> None:
    _append_ledger(version_cache_dir(spec, cache_root) / LOAD_LEDGER,
                   f"pid={os.getpid()} device={engine.device} seconds={seconds:.2f}")
    log.info("loaded %s (version %s) on %s in %.1fs", spec.name, spec.version, engine.device, seconds)


def _append_ledger(path: Path, entry: str) -> None:
    with open(path, "a", encoding="utf-8") as ledger:
        ledger.write(f"{time.time():.3f} host={socket.gethostname()} {entry}\n")


def load_count(spec: ModelSpec, cache_root: str | None = None) -> int:
    """How many times ``spec`` was loaded on this node (every process together)."""
    ledger = version_cache_dir(spec, cache_root) / LOAD_LEDGER
    return len(ledger.read_text().splitlines()) if ledger.exists() else 0
