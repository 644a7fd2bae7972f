"""Where each node keeps model files: decided on the node, from its own environment."""
from __future__ import annotations

from pathlib import Path

import pytest

from dolly_spark import paths as settings


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A node with nothing configured: no cache variable, no /local_disk0, not a Spark worker."""
    monkeypatch.delenv(settings.MODEL_CACHE_ENV_VAR, raising=False)
    monkeypatch.delenv("SPARK_LOCAL_DIRS", raising=False)
    monkeypatch.setenv(settings.HOME_ENV_VAR, str(tmp_path / "home"))
    monkeypatch.setattr(settings, "DATABRICKS_LOCAL_DISK", tmp_path / "local_disk0")
    return tmp_path


def test_spark_local_root_strips_the_per_application_scratch_directories(monkeypatch, tmp_path):
    scratch = tmp_path / "disk1" / "spark-4f2a" / "executor-9c1e" / "blockmgr-77aa"
    monkeypatch.setenv("SPARK_LOCAL_DIRS", f"{scratch},{tmp_path / 'disk2'}")
    assert settings.spark_local_root() == tmp_path / "disk1"
    monkeypatch.delenv("SPARK_LOCAL_DIRS")
    assert settings.spark_local_root() is None


def test_cache_location_in_order_of_precedence(node, monkeypatch, capsys):
    assert settings.model_cache_dir() == node / "home" / "model_cache"

    monkeypatch.setenv("SPARK_LOCAL_DIRS", str(node / "scratch" / "blockmgr-1"))
    assert settings.model_cache_dir() == node / "scratch" / "dolly_spark_model_cache"

    (node / "local_disk0").mkdir()
    assert settings.model_cache_dir() == node / "local_disk0" / "dolly_spark" / "model_cache"

    monkeypatch.setenv(settings.MODEL_CACHE_ENV_VAR, str(node / "configured"))
    assert settings.model_cache_dir() == node / "configured"
    # Each place, new on this node, was made and announced once, in order.
    announced = [Path(line.rsplit(": ", 1)[1]) for line in capsys.readouterr().err.splitlines()]
    assert announced == [node / "home" / "model_cache", node / "scratch" / "dolly_spark_model_cache",
                         node / "local_disk0" / "dolly_spark" / "model_cache", node / "configured"]
    assert all(path.is_dir() for path in announced)


def test_cache_location_is_announced_once_per_node(node, capsys):
    for _ in range(3):
        settings.model_cache_dir()
    assert capsys.readouterr().err.count("dolly_spark: model cache on") == 1
