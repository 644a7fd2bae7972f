"""Where dolly_spark keeps its local state, and whether it runs inside Databricks.

The project home holds the embedded defaults: the Spark warehouse and metastore, the MLflow
SQLite database and artifacts, and the per-node model cache. It defaults to `.dolly_spark/`
in the working directory; set ``DOLLY_SPARK_HOME`` to put it elsewhere.
"""
from __future__ import annotations

import os
from pathlib import Path

HOME_ENV_VAR = "DOLLY_SPARK_HOME"
MODEL_CACHE_ENV_VAR = "DOLLY_SPARK_MODEL_CACHE"


def project_home() -> Path:
    """The absolute project home directory, created if missing."""
    home = Path(os.environ.get(HOME_ENV_VAR) or ".dolly_spark").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    return home


def model_cache_dir() -> Path:
    """The node-local directory that holds downloaded model versions."""
    configured = os.environ.get(MODEL_CACHE_ENV_VAR)
    cache = Path(configured).expanduser().resolve() if configured else project_home() / "model_cache"
    cache.mkdir(parents=True, exist_ok=True)
    return cache


def running_on_databricks() -> bool:
    """True inside a Databricks runtime (notebook, job or cluster)."""
    return "DATABRICKS_RUNTIME_VERSION" in os.environ
