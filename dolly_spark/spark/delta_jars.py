"""Delta Lake's jars for the Spark of this environment: which Maven artifact, what to leave out of
it, and a folder of local jars resolved once.

delta-spark's Python package holds no jars: ``delta.configure_spark_with_delta_pip`` sets
``spark.jars.packages``, and Spark then resolves the artifact with Ivy at every start, printing
Ivy's dependency report (about 30 lines) before a job's first line, from the Ivy cache as much as
from Maven Central. Resolved once instead, at install time (``dolly-spark setup-spark``), with
Spark's own resolver, into ``conf/delta-jars/<coordinate>/`` of this environment's Spark, the jars
are given to Spark as local files (``spark.jars``): the sessions the package starts and
``spark-submit`` start without resolving anything, and print nothing about it.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from urllib.parse import unquote, urlparse

from dolly_spark.spark.spark_conf import spark_home

DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
DELTA_CATALOG = "org.apache.spark.sql.delta.catalog.DeltaCatalog"
# Lists the resolved jars' file names; written last, so a folder without it is an interrupted copy.
MANIFEST = "jars.txt"

# What delta-spark's Maven artifact pulls in that Spark's own jars already hold, in the same or a
# newer version: Spark's class loader finds its own first, so these copies were never used, yet
# each submission resolved them and every executor fetched them (86 MB with Delta 4.4, most of it
# Hadoop's client jars). Resolving without them leaves Delta's own jars (about 15 MB).
DELTA_EXCLUDES = (
    "org.apache.hadoop:hadoop-client-api", "org.apache.hadoop:hadoop-client-runtime",
    "org.apache.parquet:parquet-column", "org.apache.parquet:parquet-common", "org.apache.parquet:parquet-encoding",
    "org.apache.parquet:parquet-format-structures", "org.apache.parquet:parquet-hadoop",
    "org.apache.parquet:parquet-jackson",
    "com.fasterxml.jackson.core:jackson-annotations", "com.fasterxml.jackson.core:jackson-core",
    "com.fasterxml.jackson.core:jackson-databind",
    "org.apache.logging.log4j:log4j-api", "org.apache.logging.log4j:log4j-core",
    "org.apache.logging.log4j:log4j-slf4j2-impl", "org.slf4j:slf4j-api",
    "com.github.luben:zstd-jni", "org.xerial.snappy:snappy-java", "io.airlift:aircompressor",
    "org.roaringbitmap:RoaringBitmap", "org.locationtech.jts:jts-core", "com.google.code.findbugs:jsr305",
)

# Run by spark-submit after it resolved the packages: the JVM's configuration then lists the
# resolved jars as ``spark.jars``. It connects to that JVM and starts no Spark application.
RESOLVE_PROBE = """\
from pyspark import SparkConf, SparkContext
SparkContext._ensure_initialized()
print("resolved-jars " + SparkConf().get("spark.jars", ""))
"""


class DeltaJarsUnresolvedError(RuntimeError):
    """Delta Lake's jars could not be resolved (no Java, no route to Maven Central)."""


def delta_package() -> str:
    """The Maven coordinate of Delta Lake's jar for the installed pyspark and delta-spark,
    ``io.delta:delta-spark_<spark major.minor>_2.13:<delta-spark version>`` (the artifact that
    ``delta.configure_spark_with_delta_pip`` asks for)."""
    import pyspark

    spark_minor = ".".join(pyspark.__version__.split(".")[:2])
    return f"io.delta:delta-spark_{spark_minor}_2.13:{version('delta-spark')}"


def delta_excludes() -> str:
    """``spark.jars.excludes`` for ``delta_package()``: the artifacts in ``DELTA_EXCLUDES``."""
    return ",".join(DELTA_EXCLUDES)


def delta_jars_root() -> Path:
    """The folder that holds one subfolder of resolved jars per Delta coordinate: ``delta-jars``
    in the conf directory of the Spark installed here (not ``$SPARK_CONF_DIR``: every conf
    directory this Spark reads shares the same jars)."""
    return spark_home() / "conf" / "delta-jars"


def delta_jars_dir() -> Path:
    """Where the jars of ``delta_package()`` are kept once resolved."""
    return delta_jars_root() / delta_package().replace(":", "_")


def local_delta_jars() -> list[Path] | None:
    """The resolved jars of ``delta_package()``, or None when they were never resolved here (or
    one of them has gone missing since)."""
    manifest = delta_jars_dir() / MANIFEST
    if not manifest.exists():
        return None
    jars = [delta_jars_dir() / name for name in manifest.read_text(encoding="utf-8").split()]
    return jars if jars and all(jar.is_file() for jar in jars) else None


def delta_jars_conf() -> dict[str, str]:
    """``spark.jars`` naming the local jars when they are resolved, else the Maven coordinate
    to resolve at start (``spark.jars.packages``, without ``DELTA_EXCLUDES``)."""
    jars = local_delta_jars()
    if jars:
        return {"spark.jars": ",".join(str(jar) for jar in jars)}
    return {"spark.jars.packages": delta_package(), "spark.jars.excludes": delta_excludes()}


def resolve_delta_jars() -> list[Path]:
    """Resolve ``delta_package()`` (without ``DELTA_EXCLUDES``) once, with Spark's own resolver
    (so ``spark.jars.repositories`` and ``spark.jars.ivySettings`` in the Spark conf apply), copy
    its jars into ``delta_jars_dir()`` and return them; the jars already there when they are.
    Ivy's report is shown only when the resolution fails, in the DeltaJarsUnresolvedError raised."""
    jars = local_delta_jars()
    if jars:
        return jars
    output, returncode = _run_resolve_probe()
    listed = re.search(r"^resolved-jars (.*)$", output, re.M)
    if returncode != 0 or not listed or not listed[1].strip():
        raise DeltaJarsUnresolvedError(
            f"could not resolve Delta Lake's jars ({delta_package()}) with {spark_home() / 'bin' / 'spark-submit'}: "
            f"{_resolution_hint(output)} Then run `dolly-spark setup-spark` again. Its output ended:\n"
            + "\n".join(output.splitlines()[-25:]))
    sources = [Path(unquote(urlparse(uri).path)) for uri in listed[1].split(",") if uri]
    target = delta_jars_dir()
    target.mkdir(parents=True, exist_ok=True)
    for source in sources:
        shutil.copy2(source, target / source.name)
    (target / MANIFEST).write_text("\n".join(source.name for source in sources) + "\n", encoding="utf-8")
    return [target / source.name for source in sources]


def _run_resolve_probe() -> tuple[str, int]:
    """Run ``RESOLVE_PROBE`` under ``spark-submit`` with Delta's package; its output and exit code."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("PYSPARK_GATEWAY")}
    # The probe imports pyspark: run it with this interpreter, not whichever python3 is on PATH.
    env.update(PYSPARK_PYTHON=sys.executable, PYSPARK_DRIVER_PYTHON=sys.executable)
    with tempfile.TemporaryDirectory() as scratch:
        probe = Path(scratch) / "resolve_delta_jars.py"
        probe.write_text(RESOLVE_PROBE, encoding="utf-8")
        command = [str(spark_home() / "bin" / "spark-submit"), "--conf", f"spark.jars.packages={delta_package()}",
                   "--conf", f"spark.jars.excludes={delta_excludes()}", "--conf", "spark.jars=", str(probe)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=1800)
        except OSError as exc:
            return f"{exc}", 1
    return result.stdout + result.stderr, result.returncode


def _resolution_hint(output: str) -> str:
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME") or "JAVA_HOME" in output:
        return "Spark needs Java 17 or newer: install it and put `java` on the PATH (or set JAVA_HOME)."
    return ("check that Maven Central (or the repositories in spark.jars.repositories of your Spark conf) "
            "can be reached from this machine.")
