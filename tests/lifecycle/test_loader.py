"""Executor-side loading without Spark: one model per process, shared by every configuration."""
from __future__ import annotations

from dolly_spark.inference.engines import EngineConfig
from dolly_spark.lifecycle import loader
from dolly_spark.lifecycle.registry import resolve_model


def test_one_model_per_process_shared_across_configurations(tiny_model_dir, tmp_path, capfd):
    from dolly_spark.testing.tiny_models import save_tiny_model

    first = resolve_model(str(tiny_model_dir))
    small = loader.load_engine(first, EngineConfig(token_budget=2048), cache_root=str(tmp_path))
    large = loader.load_engine(first, EngineConfig(token_budget=8192), cache_root=str(tmp_path))
    assert small is not large and small.model is large.model
    assert loader.load_engine(first, EngineConfig(token_budget=2048), cache_root=str(tmp_path)) is small
    loads = capfd.readouterr().err.splitlines()
    assert [line for line in loads if line.startswith("dolly_spark: loaded")] == [
        line for line in loads if line.startswith(f"dolly_spark: loaded {first.name} version {first.version} "
                                                  "with engine hf on cpu")]
    assert sum(line.startswith("dolly_spark: loaded") for line in loads) == 1

    other_dir = save_tiny_model(tmp_path / "other", ["some other text to train on"] * 5, seed=2)
    second = resolve_model(str(other_dir))
    replacement = loader.load_engine(second, EngineConfig(), cache_root=str(tmp_path))
    assert replacement.model is not small.model
    assert list(loader._models) == [(second, None, "hf", None)]  # the first model was let go
    assert capfd.readouterr().err.count("dolly_spark: loaded") == 1
