"""Sessions start from Delta's jars resolved once; without them (never resolved, or a jar deleted
since) a session still starts, resolving at start, rather than failing on a missing file."""
from __future__ import annotations

from dolly_spark.spark import delta_jars
from dolly_spark.spark.delta_jars import MANIFEST, delta_excludes, delta_jars_conf, delta_jars_dir, delta_package


def test_sessions_use_the_resolved_jars_while_every_one_is_there(tmp_path, monkeypatch):
    monkeypatch.setattr(delta_jars, "spark_home", lambda: tmp_path)
    resolving = {"spark.jars.packages": delta_package(), "spark.jars.excludes": delta_excludes()}
    assert delta_jars_conf() == resolving  # never resolved here
    folder = delta_jars_dir()
    folder.mkdir(parents=True)
    names = ["io.delta_delta-spark_4.2_2.13-4.4.0.jar", "io.delta_delta-storage-4.4.0.jar"]
    for name in names:
        (folder / name).write_bytes(b"PK")
    assert delta_jars_conf() == resolving  # copied, but the manifest (written last) is missing
    (folder / MANIFEST).write_text("\n".join(names) + "\n")
    assert delta_jars_conf() == {"spark.jars": ",".join(str(folder / name) for name in names)}
    (folder / names[1]).unlink()
    assert delta_jars_conf() == resolving
