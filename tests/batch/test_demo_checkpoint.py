"""The demo model is converted from its GGUF file once per machine, into the user cache, and every
project home reads that one checkpoint; another transformers version converts it again."""
from __future__ import annotations

from dolly_spark.batch import demo


def test_one_conversion_serves_every_project_home_until_transformers_changes(tiny_model, tmp_path, monkeypatch):
    conversions = []

    def convert():  # the tiny model stands in for the half-minute de-quantization of the GGUF file
        conversions.append(demo.converter_version())
        return tiny_model

    monkeypatch.setattr(demo, "load_demo_from_gguf", convert)
    monkeypatch.setenv("DOLLY_SPARK_USER_CACHE", str(tmp_path / "user_cache"))
    checkpoints = []
    for home in ("first_home", "second_home"):
        monkeypatch.setenv("DOLLY_SPARK_HOME", str(tmp_path / home))
        checkpoints.append(demo.demo_checkpoint())
    assert len(conversions) == 1
    assert checkpoints[0] == checkpoints[1]
    assert checkpoints[0].parent == tmp_path / "user_cache" / "demo_model"
    assert (checkpoints[0] / "config.json").exists() and (checkpoints[0] / "tokenizer_config.json").exists()
    assert not list(checkpoints[0].parent.glob("*.partial*"))
    assert not any((tmp_path / home).exists() and any((tmp_path / home).iterdir())
                   for home in ("first_home", "second_home"))

    installed = demo.converter_version()
    monkeypatch.setattr(demo, "converter_version", lambda: "0.0.0-another")
    assert demo.demo_checkpoint() != checkpoints[0]
    assert conversions == [installed, "0.0.0-another"]
