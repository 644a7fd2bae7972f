"""The foundation: real Delta tables in the embedded Spark, and the MLflow registry round trip."""
from __future__ import annotations

import os
from pathlib import Path

from pyspark.testing import assertDataFrameEqual


def test_delta_table_history_has_versions(spark):
    spark.createDataFrame([(1, "open"), (2, "open")], "id INT, status STRING").write.format("delta").saveAsTable(
        "tickets_history_check"
    )
    spark.sql("UPDATE tickets_history_check SET status = 'closed' WHERE id = 1")

    history = spark.sql("DESCRIBE HISTORY tickets_history_check").collect()
    assert sorted(row["version"] for row in history) == [0, 1]
    assert {row["operation"] for row in history} >= {"UPDATE"}
    assert spark.sql("DESCRIBE DETAIL tickets_history_check").first()["format"] == "delta"
    assertDataFrameEqual(
        spark.read.table("tickets_history_check"),
        spark.createDataFrame([(1, "closed"), (2, "open")], "id INT, status STRING"),
    )


def test_local_session_runs_workers_on_this_interpreter(spark):
    import sys

    executables = spark.sparkContext.parallelize([0, 1], 2).map(lambda _: __import__("sys").executable).collect()
    assert set(executables) == {sys.executable}


def test_python_workers_fork_from_a_daemon_that_imported_torch(spark):
    from dolly_spark.spark.sessions import WORKER_DAEMON_MODULE

    # The daemon, not each worker, pays for importing torch and transformers.
    def worker_parent(_) -> tuple[str, bool]:
        """(command line, whether torch's library is mapped) of the process that forked this worker."""
        from pathlib import Path

        parent = __import__("os").getppid()
        command = Path(f"/proc/{parent}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        return command, "libtorch_cpu" in Path(f"/proc/{parent}/maps").read_text()

    parents = set(spark.sparkContext.parallelize([0, 1], 2).map(worker_parent).collect())
    assert len(parents) == 1, parents
    ((command, has_torch),) = parents
    assert WORKER_DAEMON_MODULE in command
    assert has_torch, f"the daemon ({command}) has not imported torch"


def test_saved_tables_live_under_project_home(spark, project_home):
    spark.range(3).write.format("delta").saveAsTable("home_location_check")
    location = spark.sql("DESCRIBE DETAIL home_location_check").first()["location"]
    assert location.startswith(f"file:{project_home / 'warehouse'}")
    assert (project_home / "metastore_db").is_dir()


def test_registry_alias_resolves_to_model_files(registered_tiny, tmp_path):
    import mlflow

    from dolly_spark.lifecycle.loader import checkpoint_paths, fetch_model_files
    from dolly_spark.lifecycle.registry import resolve_model

    name, version = registered_tiny
    spec = resolve_model(f"models:/{name}@champion")
    assert (spec.kind, spec.uri, spec.version, spec.prompt_format) == ("registry", f"models:/{name}/{version}", version, "dolly")

    model_path, tokenizer_path = checkpoint_paths(fetch_model_files(spec, str(tmp_path)))
    assert (Path(model_path) / "config.json").exists()
    assert (Path(tokenizer_path) / "tokenizer.json").exists()
    assert mlflow.get_tracking_uri().startswith("sqlite:///")


def test_configure_mlflow_defaults_to_sqlite_under_home(tmp_path, monkeypatch):
    import mlflow

    from dolly_spark.lifecycle.tracking import configure_mlflow

    previous = mlflow.get_tracking_uri()
    monkeypatch.setenv("DOLLY_SPARK_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    try:
        uri = configure_mlflow("defaults-check")
        assert uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
        experiment = mlflow.get_experiment_by_name("defaults-check")
        assert experiment.artifact_location.startswith((tmp_path / "mlartifacts").as_uri())
    finally:
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous)


def test_configure_mlflow_respects_environment(tmp_path):
    import subprocess
    import sys

    configured = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": configured, "DOLLY_SPARK_HOME": str(tmp_path / "home")}
    script = "from dolly_spark.lifecycle.tracking import configure_mlflow; print(configure_mlflow(None))"
    output = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert output.stdout.strip() == configured
    assert not (tmp_path / "home" / "mlflow.db").exists()
