"""Executor-side model loading: files fetched once per node, the engine loaded once per process.

Registry models are downloaded into the node-local cache under a directory named by their
version, behind a file lock (parallel Python workers on one node download once) and with an
atomic rename (a crashed download never looks complete); each download is recorded beside the
files (``downloads.log``: when, which process, how long). Each load prints one line to the
process's stderr, which on a cluster is the executor's log. The engine is the one
``EngineConfig.engine`` names (``dolly_spark.inference.engines``). Under "auto", a vLLM that
cannot load the model (an old driver, too little memory, an architecture it lacks) gives way to
the "hf" engine with one warning line; a vLLM named explicitly fails the task, saying why.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import socket
import sys
import threading
import time
from pathlib import Path

from filelock import FileLock

from dolly_spark.inference.engines import AUTO, EngineConfig, engine_class, resolve_engine
from dolly_spark.inference.row_encoder import RowEncoder
from dolly_spark.paths import model_cache_dir
from dolly_spark.request import ModelSpec

log = logging.getLogger(__name__)

DOWNLOAD_LEDGER = "downloads.log"
_models: dict[tuple, object] = {}  # (spec, gpu, engine, dtype) -> a loaded engine; at most one entry
_engines: dict[tuple, object] = {}  # ((spec, gpu, engine, dtype), config) -> an engine on that model
_engines_lock = threading.Lock()
_encoders: dict[ModelSpec, RowEncoder] = {}  # for counting prompts, with no weights
_process_loads = 0  # models this process loaded, for its log lines


def version_cache_dir(spec: ModelSpec, cache_root: str | None = None) -> Path:
    """The node-local directory for ``spec``'s files and its download record, under ``cache_root``
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


def load_engine(spec: ModelSpec, config: EngineConfig | None = None, gpu_index: int | None = None,
                cache_root: str | None = None):
    """The engine ``config.engine`` names, for ``spec`` under ``config``. The model is loaded at
    most once per process and shared by the engines of every configuration that loads it alike
    (same engine, same dtype); a different model (another version, device, dtype or engine)
    replaces it rather than sitting beside it in accelerator memory."""
    requested = (config or EngineConfig()).engine
    config = _resolved(config)
    model_key = (spec, gpu_index, config.engine, config.dtype)
    with _engines_lock:
        engine = _engines.get((model_key, config))
        if engine is None:
            loaded = _models.get(model_key)
            engine = (loaded.with_config(config) if loaded is not None
                      else _load(model_key, config, cache_root, fall_back=requested == AUTO))
            _models[model_key] = _models.get(model_key, engine)
            _engines[(model_key, config)] = engine
    return engine


def load_row_encoder(spec: ModelSpec, cache_root: str | None = None) -> RowEncoder:
    """The row encoder of ``spec``, which encodes rows exactly as every engine on it does and
    holds no weights: a dry run's prompt counts, on executors with or without an accelerator.
    Its files come through the same node-local cache."""
    with _engines_lock:
        encoder = _encoders.get(spec)
        if encoder is None:
            model_path, tokenizer_path = local_model_paths(spec, cache_root)
            encoder = _encoders[spec] = RowEncoder.from_pretrained(model_path, tokenizer_path, spec.prompt_format)
    return encoder


def forget_model(spec: ModelSpec, config: EngineConfig | None = None, gpu_index: int | None = None) -> None:
    """Drop this process's loaded copy of ``spec`` and every engine built on it, so the next
    ``load_engine`` loads it afresh. For a task that failed in generation: the model (or the
    device under it) may be what broke, and a retry in this process must not inherit it. Its
    memory is freed once the failure's traceback is gone (``_load`` collects before loading)."""
    config = _resolved(config)
    model_key = (spec, gpu_index, config.engine, config.dtype)
    with _engines_lock:
        _close(_models.pop(model_key, None))
        for key in [key for key in _engines if key[0] == model_key]:
            del _engines[key]


def _resolved(config: EngineConfig | None) -> EngineConfig:
    """``config`` (the default when None) with "auto" replaced by the engine it means in this
    process, so a loaded engine is kept under the name of the engine that runs."""
    config = config or EngineConfig()
    return dataclasses.replace(config, engine=resolve_engine(config.engine))


def _load(model_key: tuple, config: EngineConfig, cache_root: str | None, fall_back: bool):
    """Load a model, after dropping the one loaded before (there is at most one per process);
    with ``fall_back``, the "hf" engine where vLLM cannot load it."""
    for loaded in _models.values():
        _close(loaded)
    _models.clear()
    _engines.clear()
    _release_accelerator_memory()
    spec, gpu_index, _, _ = model_key
    started = time.perf_counter()
    model_path, tokenizer_path = local_model_paths(spec, cache_root)
    try:
        engine = engine_class(config.engine).from_pretrained(model_path, tokenizer_path, spec.prompt_format, config,
                                                             gpu_index)
    except Exception as exc:
        if config.engine != "vllm":
            raise
        cause = _first_line(exc)
        if not fall_back:
            raise RuntimeError(f"vLLM could not load {spec.name} version {spec.version} ({spec.uri}): {cause}. Run it "
                               'with engine="hf" (--engine hf), or with "auto", which falls back to hf') from exc
        _log_line(f"WARNING vLLM could not load {spec.name} version {spec.version} ({cause}); running it with "
                  "engine hf")
        config = dataclasses.replace(config, engine="hf")
        engine = engine_class("hf").from_pretrained(model_path, tokenizer_path, spec.prompt_format, config, gpu_index)
    # stderr, not logging: Spark's Python workers configure no log handler, and their stderr
    # lands in the executor's log.
    # Numbered per process, so a log that repeats a line (an executor's log may) still shows
    # whether one process loaded twice.
    global _process_loads
    _process_loads += 1
    _log_line(f"loaded {spec.name} version {spec.version} with engine {config.engine} on {engine.device} in "
              f"{time.perf_counter() - started:.1f}s (host {socket.gethostname()}, pid {os.getpid()}, load "
              f"{_process_loads} of this process)")
    return engine


def _log_line(text: str) -> None:
    """One line on stderr, the executor's log. One write, line and newline together: print writes
    them apart, and a thread of an engine (vLLM logs from its own) could land its line in between."""
    sys.stderr.write(f"dolly_spark: {text}\n")
    sys.stderr.flush()


def _first_line(exc: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message."""
    message = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {message[0][:300] if message else ''}"


def _close(engine: object | None) -> None:
    """Stop what an engine runs beside this process (vLLM's engine process), if anything."""
    close = getattr(engine, "close", None)
    if close is not None:
        close()


def _release_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    # Only where CUDA has started: asking whether it is available could start it, before the
    # vllm engine has made the task's GPU the only visible one.
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _append_ledger(path: Path, entry: str) -> None:
    with open(path, "a", encoding="utf-8") as ledger:
        ledger.write(f"{time.time():.3f} host={socket.gethostname()} {entry}\n")
