"""Where dolly_spark keeps its local state, and whether it runs inside Databricks.

The project home holds the embedded defaults: the Spark warehouse and metastore, the MLflow
SQLite database and artifacts, and the per-node model cache. It defaults to `.dolly_spark/`
in the working directory; set ``DOLLY_SPARK_HOME`` to put it elsewhere. What is derived from
installed packages alone (the demo model converted from its GGUF file) is kept once per machine,
in the user's cache directory, for every project home.
"""
from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

HOME_ENV_VAR = "DOLLY_SPARK_HOME"
MODEL_CACHE_ENV_VAR = "DOLLY_SPARK_MODEL_CACHE"
USER_CACHE_ENV_VAR = "DOLLY_SPARK_USER_CACHE"


def project_home() -> Path:
    """The absolute project home directory, created if missing."""
    home = Path(os.environ.get(HOME_ENV_VAR) or ".dolly_spark").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def user_cache_dir() -> Path:
    """The machine's cache of what every project home can share: ``$DOLLY_SPARK_USER_CACHE``,
    else ``dolly_spark`` under ``$XDG_CACHE_HOME`` (``~/.cache``). Created if missing."""
    configured = os.environ.get(USER_CACHE_ENV_VAR)
    root = Path(configured) if configured else Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "dolly_spark"
    cache = root.expanduser().resolve()
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def model_cache_dir() -> Path:
    """The node-local directory that holds downloaded model versions, decided where the files
    land (on each executor, not on the driver):

    1. ``$DOLLY_SPARK_MODEL_CACHE`` (on a cluster, set it with the Spark conf
       ``spark.executorEnv.DOLLY_SPARK_MODEL_CACHE``);
    2. ``/local_disk0/dolly_spark/model_cache`` where ``/local_disk0`` exists (Databricks nodes);
    3. ``dolly_spark_model_cache`` in the root of Spark's local directories, inside a Spark
       Python worker (``spark.local.dir`` / ``SPARK_LOCAL_DIRS``);
    4. ``model_cache`` under the project home.
    """
    configured = os.environ.get(MODEL_CACHE_ENV_VAR)
    local_root = spark_local_root()
    if configured:
        cache = Path(configured).expanduser().resolve()
    elif DATABRICKS_LOCAL_DISK.is_dir():
        cache = DATABRICKS_LOCAL_DISK / "dolly_spark" / "model_cache"
    elif local_root is not None:
        cache = local_root / "dolly_spark_model_cache"
    else:
        cache = project_home() / "model_cache"
    cache.mkdir(parents=True, exist_ok=True)
    _announce_once(cache)
    return cache


def spark_local_root() -> Path | None:
    """The first of Spark's local directories, in a Spark Python worker; None elsewhere.

    Executors hand their Python workers per-application scratch directories
    (``<root>/spark-<id>/executor-<id>/blockmgr-<id>``) that are deleted when the application
    ends; the model cache lives in their root, so the next job on the node finds it.
    """
    local_dirs = os.environ.get("SPARK_LOCAL_DIRS")
    if not local_dirs:
        return None
    path = Path(local_dirs.split(",")[0])
    while path.name.startswith(_SPARK_SCRATCH_PREFIXES) and path.parent != path:
        path = path.parent
    return path


_SPARK_SCRATCH_PREFIXES = ("blockmgr-", "executor-", "spark-")
DATABRICKS_LOCAL_DISK = Path("/local_disk0")


def _announce_once(cache: Path) -> None:
    """Say where the model cache is, once per node (the first process to get here on it)."""
    try:
        os.close(os.open(cache / ".location-announced", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    # stderr, not logging: Spark's Python workers configure no log handler, and their stderr
    # lands in the executor's log.
    print(f"dolly_spark: model cache on {socket.gethostname()}: {cache}", file=sys.stderr, flush=True)


def running_on_databricks() -> bool:
    """True inside a Databricks runtime (notebook, job or cluster)."""
    return "DATABRICKS_RUNTIME_VERSION" in os.environ
