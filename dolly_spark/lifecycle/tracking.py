"""MLflow defaults: a local SQLite registry under the project home unless the caller configured one."""
from __future__ import annotations

import logging
import os

import mlflow

from dolly_spark.paths import project_home, running_on_databricks

log = logging.getLogger(__name__)

DEFAULT_EXPERIMENT = "dolly_spark"


def configure_mlflow(experiment: str | None = DEFAULT_EXPERIMENT) -> str:
    """Point MLflow at the embedded default when nothing else is configured; return the tracking URI.

    Inside Databricks, or with ``MLFLOW_TRACKING_URI`` set, the environment is used unchanged.
    Otherwise tracking and the model registry go to ``sqlite:///<project home>/mlflow.db`` (an
    absolute path: relative SQLite URIs break when a job changes directory) and artifacts to
    ``<project home>/mlartifacts``. When ``experiment`` is given it becomes the active experiment.
    """
    embedded = not running_on_databricks() and not os.environ.get("MLFLOW_TRACKING_URI")
    if embedded:
        home = project_home()
        uri = f"sqlite:///{home / 'mlflow.db'}"
        mlflow.set_tracking_uri(uri)
        mlflow.set_registry_uri(uri)
    if experiment:
        _use_experiment(experiment, embedded)
    return mlflow.get_tracking_uri()


def _use_experiment(name: str, embedded: bool) -> None:
    if running_on_databricks() and not name.startswith("/"):
        # Workspace experiments are paths; a bare name would be refused.
        name = f"/Shared/{name}"
    if embedded and mlflow.get_experiment_by_name(name) is None:
        # The SQLite store's default artifact root is relative to the working directory;
        # keep artifacts beside the database instead so every run finds them.
        artifacts = (project_home() / "mlartifacts" / name).as_uri()
        mlflow.create_experiment(name, artifact_location=artifacts)
    mlflow.set_experiment(name)
