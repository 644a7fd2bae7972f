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


def test_a_shared_model_dir_is_filled_once_on_the_driver_and_loads_with_no_registry(registered_tiny, tmp_path,
                                                                                     monkeypatch):
    import mlflow

    from dolly_spark.inference.engines import Rows
    from dolly_spark.request import Request

    name, version = registered_tiny
    spec = resolve_model(f"models:/{name}/{version}")
    shared = tmp_path / "volume"
    staged = [loader.stage_for_executors(spec, str(shared)) for _ in range(2)]
    assert staged[0] == staged[1]
    assert (staged[0].name, staged[0].version, staged[0].kind) == (name, version, "local")
    assert staged[0].tracking_uri is None and staged[0].registry_uri is None
    assert staged[0].uri.startswith(str(shared))
    (ledger,) = shared.glob("*/downloads.log")
    assert len(ledger.read_text().splitlines()) == 1  # the second call found the files there
    # An executor without registry access: nothing it does may reach one.
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda **_: (_ for _ in ()).throw(
        AssertionError("an executor called the registry")))
    engine = loader.load_engine(staged[0], EngineConfig(), cache_root=str(tmp_path / "node_cache"))
    (result,) = engine.run(Rows(["Say hi."]), Request(max_new_tokens=2))
    assert result.error is None and result.completion_tokens > 0
    assert not (tmp_path / "node_cache").exists() or not any((tmp_path / "node_cache").rglob("downloads.log"))
