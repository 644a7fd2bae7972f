"""Executor-side loading without Spark: one model per process, shared by every settings."""
from __future__ import annotations

from dolly_spark import models
from dolly_spark.engine import GenerationSettings
from dolly_spark.registry import resolve_model


def test_one_model_per_process_shared_across_settings(tiny_model_dir, tmp_path):
    from dolly_spark.testing import save_tiny_model

    first = resolve_model(str(tiny_model_dir))
    short = models.load_engine(first, GenerationSettings(max_new_tokens=4), cache_root=str(tmp_path))
    long = models.load_engine(first, GenerationSettings(max_new_tokens=64), cache_root=str(tmp_path))
    assert short is not long and short.model is long.model
    assert models.load_engine(first, GenerationSettings(max_new_tokens=4), cache_root=str(tmp_path)) is short
    assert models.load_count(first, str(tmp_path)) == 1

    other_dir = save_tiny_model(tmp_path / "other", ["some other text to train on"] * 5, seed=2)
    second = resolve_model(str(other_dir))
    replacement = models.load_engine(second, GenerationSettings(max_new_tokens=4), cache_root=str(tmp_path))
    assert replacement.model is not short.model
    assert list(models._models) == [(second, None, None)]  # the first model was let go
    assert models.load_count(second, str(tmp_path)) == 1
