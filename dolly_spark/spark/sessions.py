"""Spark sessions: the active one, one a launcher configured, or the embedded local default.

Three cases, in order:
- a session is active (Databricks, a notebook): it is returned untouched;
- the process was started by ``spark-submit`` (or another launcher that brought up the JVM): the
  launcher's master and every setting it passed are kept, and only what is missing is added
  (the Delta extension and catalog, Arrow, the embedded catalog when none is configured);
- otherwise the package starts a local session itself on ``$DOLLY_SPARK_MASTER`` or
  ``local[*]``, with Delta's jars from the local folder ``dolly-spark setup-spark`` resolved them
  into (``delta_jars``), so nothing is resolved and Ivy prints nothing; a local master binds to
  the loopback address unless the user chose an address.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator

from pyspark.sql import SparkSession

from dolly_spark.paths import MODEL_CACHE_ENV_VAR, project_home
from dolly_spark.spark.delta_jars import (DELTA_CATALOG, DELTA_EXTENSION, delta_jars_conf, delta_jars_dir,
                                          delta_package)
from dolly_spark.spark.log_config import write_unless_edited, written_by_the_package
from dolly_spark.spark.spark_conf import configured_defaults, spark_conf_dir

log = logging.getLogger(__name__)

ARROW_BATCH_CONF = "spark.sql.execution.arrow.maxRecordsPerBatch"
CODEGEN_CACHE_CONF = "spark.sql.codegen.cache.maxEntries"
MASTER_ENV_VAR = "DOLLY_SPARK_MASTER"
WORKER_DAEMON_MODULE = "dolly_spark.spark.worker_daemon"
# Settings that decide where tables live; the embedded catalog is added only when the launcher
# configured none of them (a cluster's own metastore or warehouse always wins).
CATALOG_KEYS = ("spark.sql.warehouse.dir", "spark.sql.catalogImplementation",
                "spark.hadoop.javax.jdo.option.ConnectionURL", "spark.hadoop.hive.metastore.uris")


class DeltaNotOnClasspathError(RuntimeError):
    """The JVM was started without Delta Lake's classes, and it is too late to add them."""


def get_spark(
    app_name: str = "dolly_spark",
    master: str | None = None,
    arrow_batch_size: int = 1024,
    shuffle_partitions: int = 8,
    ui: bool = True,
    extra_conf: dict[str, str] | None = None,
) -> SparkSession:
    """The active Spark session, the one ``spark-submit`` configured, or a new local one.

    Under ``spark-submit`` the master and the user's settings are kept; ``master``,
    ``$DOLLY_SPARK_MASTER`` and the other arguments only fill settings the launcher left unset.
    A session the package starts itself runs on ``master`` (default ``$DOLLY_SPARK_MASTER`` or
    ``local[*]``). Either way, when no catalog is configured, tables live in a warehouse and a
    Derby metastore under the project home, so ``saveAsTable`` tables persist across runs.
    Raises DeltaNotOnClasspathError, naming the ``--packages`` coordinate to add, when a
    launcher started the JVM without Delta Lake's classes.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active
    wanted = _session_conf(arrow_batch_size, shuffle_partitions, ui)
    wanted.update(extra_conf or {})
    if launched_by_spark_submit():
        return _launcher_session(app_name, wanted)
    return _local_session(app_name, master or os.environ.get(MASTER_ENV_VAR, "local[*]"), wanted)


def launched_by_spark_submit() -> bool:
    """True when a launcher (``spark-submit``, ``pyspark``) started the JVM this process talks to."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def _session_conf(arrow_batch_size: int, shuffle_partitions: int, ui: bool) -> dict[str, str]:
    return {
        "spark.sql.extensions": DELTA_EXTENSION,
        "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        ARROW_BATCH_CONF: str(arrow_batch_size),
        "spark.sql.shuffle.partitions": str(shuffle_partitions),
        "spark.ui.enabled": "true" if ui else "false",
        "spark.python.worker.reuse": "true",
        # Workers fork from a daemon that imported torch and transformers once (``worker_daemon``).
        "spark.python.daemon.module": WORKER_DAEMON_MODULE,
        # Delta replays its log over 50 partitions by default: far too many for one machine.
        "spark.databricks.delta.snapshotPartitions": "2",
        "spark.ui.showConsoleProgress": "false",
        # A summarize run compiles about 120 classes of generated code (its Delta commands and
        # queries); Spark's default cache holds 100, so a session that runs the job again (a
        # notebook, the demo's two jobs) compiled them all anew each time: 6.9 s against 8.2 s
        # per warm six-ticket run here, about 5 classes compiled per run instead of 120.
        CODEGEN_CACHE_CONF: "2000",
    }


def _embedded_catalog_conf() -> dict[str, str]:
    home = project_home()
    return {
        "spark.sql.warehouse.dir": str(home / "warehouse"),
        "spark.sql.catalogImplementation": "hive",
        "spark.hadoop.javax.jdo.option.ConnectionURL":
            f"jdbc:derby:;databaseName={home / 'metastore_db'};create=true",
    }


def _local_model_cache_conf() -> dict[str, str]:
    # Local executors share the driver's disk: keep the model cache under the project home,
    # where `make demo` and the tests find it, rather than in Spark's scratch directories.
    return {f"spark.executorEnv.{MODEL_CACHE_ENV_VAR}": str(project_home() / "model_cache")}


def _local_session(app_name: str, master: str, wanted: dict[str, str]) -> SparkSession:
    # Python workers must run this interpreter: a venv's python is not the python3 on PATH,
    # and workers started with another one cannot import pyarrow or this package.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
    home = project_home()
    conf = {
        **_embedded_catalog_conf(),
        **_local_model_cache_conf(),
        "spark.driver.extraJavaOptions": f"-Dderby.system.home={home}{_log_config_option(home)}",
        "spark.pyspark.python": sys.executable,
        **delta_jars_conf(),
        **wanted,
    }
    if "spark.jars.packages" in conf:
        log.warning("Delta Lake's jars are not in %s: Spark resolves %s from Maven Central at this start, and Ivy "
                    "prints its report. Run `dolly-spark setup-spark` once to resolve them there for every start.",
                    delta_jars_dir(), delta_package())
    builder = SparkSession.builder.appName(app_name).master(master)
    for key, value in conf.items():
        builder = builder.config(key, value)
    log.info("starting a local Spark session (%s) with Delta Lake; tables under %s", master, home)
    with _on_loopback_unless_chosen(master, conf):
        return builder.getOrCreate()


# Where a user chooses the driver's address; when none is set, a local session binds to 127.0.0.1.
ADDRESS_ENV_VARS = ("SPARK_LOCAL_IP", "SPARK_LOCAL_HOSTNAME")
ADDRESS_CONFS = ("spark.driver.host", "spark.driver.bindAddress")


def address_chosen(conf: dict[str, str]) -> bool:
    """Whether the user chose the driver's address: in the environment (``$SPARK_LOCAL_IP``,
    ``$SPARK_LOCAL_HOSTNAME``), in ``conf`` or in the Spark conf's ``spark-defaults.conf``."""
    defaults = configured_defaults()
    return any(os.environ.get(name) for name in ADDRESS_ENV_VARS) or any(
        key in conf or key in defaults for key in ADDRESS_CONFS)


@contextlib.contextmanager
def _on_loopback_unless_chosen(master: str, conf: dict[str, str]) -> Iterator[None]:
    """Start the JVM of a local session with ``SPARK_LOCAL_IP=127.0.0.1`` unless the user chose an
    address. Without it Spark looks the hostname up, finds a loopback address on most machines
    (Debian and Ubuntu map it to 127.0.1.1), warns, and binds to another interface instead: a
    local session needs no address beyond the machine. A cluster master is left alone, since its
    executors must reach the driver. The variable is set only while the JVM starts."""
    if not master.startswith("local") or address_chosen(conf):
        yield
        return
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    try:
        yield
    finally:
        os.environ.pop("SPARK_LOCAL_IP", None)


def _log_config_option(home: Path) -> str:
    """The JVM option that gives a session the package starts its log4j2 configuration
    (``log_config``): ``log4j2.properties`` under the project home, written there unless edited.
    Empty when Spark's conf directory holds a ``log4j2.properties`` of the user's own: the JVM reads
    that one from its classpath, as ``spark-submit`` does."""
    in_conf_dir = spark_conf_dir() / "log4j2.properties"
    if in_conf_dir.exists() and not written_by_the_package(in_conf_dir.read_text(encoding="utf-8")):
        return ""
    path = home / "log4j2.properties"
    write_unless_edited(path)
    return f" -Dlog4j2.configurationFile={path.as_uri()}"


def _launcher_session(app_name: str, wanted: dict[str, str]) -> SparkSession:
    from pyspark import SparkConf, SparkContext

    SparkContext._ensure_initialized()  # connects to the launcher's JVM; starts nothing
    given = SparkConf()  # what the launcher set: --master, --conf, spark-defaults.conf
    _require_delta_classes(SparkContext._jvm)
    master = given.get("spark.master", "local[*]")
    missing = {key: value for key, value in wanted.items() if not given.contains(key)}
    extensions = given.get("spark.sql.extensions", "")
    if extensions and DELTA_EXTENSION not in extensions.split(","):
        missing["spark.sql.extensions"] = f"{extensions},{DELTA_EXTENSION}"
    if not any(given.contains(key) for key in CATALOG_KEYS) and not _hive_site_on_classpath(SparkContext._jvm):
        missing.update(_embedded_catalog_conf())
        SparkContext._jvm.java.lang.System.setProperty("derby.system.home", str(project_home()))
        where = f"tables under {project_home()}"
    else:
        where = "the configured catalog"
    if master.startswith("local"):
        missing.update({k: v for k, v in _local_model_cache_conf().items() if not given.contains(k)})
    builder = SparkSession.builder
    if not given.contains("spark.app.name"):
        builder = builder.appName(app_name)
    for key, value in missing.items():
        builder = builder.config(key, value)
    log.info("using the Spark master %s from spark-submit, with %s", master, where)
    return builder.getOrCreate()


def _require_delta_classes(jvm) -> None:
    loader = jvm.java.lang.Thread.currentThread().getContextClassLoader()
    try:
        loader.loadClass(DELTA_EXTENSION)
    except Exception as exc:  # noqa: BLE001 - py4j wraps the ClassNotFoundException
        raise DeltaNotOnClasspathError(
            f"Delta Lake's classes ({DELTA_EXTENSION}) are not on the Spark classpath: the JVM was "
            f"started before this job could add them. Run `dolly-spark setup-spark` (it resolves Delta's "
            f"jars into {delta_jars_dir()} and names them in spark.jars of this environment's "
            f"spark-defaults.conf, {spark_conf_dir() / 'spark-defaults.conf'}), or add them to the command, "
            f"e.g. `spark-submit --packages {delta_package()} ...`."
        ) from exc


def _hive_site_on_classpath(jvm) -> bool:
    loader = jvm.java.lang.Thread.currentThread().getContextClassLoader()
    return loader.getResource("hive-site.xml") is not None


def generation_parallelism(spark: SparkSession) -> int:
    """How many generation tasks run at once by default: one per GPU on GPU executors (from the
    executor and task GPU resource settings and the executors registered now), else Spark's
    default parallelism (the executors' cores)."""
    try:
        context = spark.sparkContext
        conf = dict(context.getConf().getAll())
        return tasks_per_wave(conf, executor_count(spark), context.defaultParallelism)
    except Exception:  # noqa: BLE001 - Spark Connect sessions have no SparkContext
        return int(spark.conf.get("spark.default.parallelism", "8"))


def executor_kind(spark: SparkSession) -> str:
    """The kind of executors a run has, in words (``"2 CPU task slots"``, ``"8 GPU task slots"``):
    what a run's measured rate holds for, so an estimate uses the rates of runs on the same kind."""
    return f"{generation_parallelism(spark)} {'GPU' if has_gpu_executors(spark) else 'CPU'} task slots"


def has_gpu_executors(spark: SparkSession) -> bool:
    """Whether executors are given GPUs (``spark.executor.resource.gpu.amount``)."""
    try:
        return float(spark.sparkContext.getConf().get("spark.executor.resource.gpu.amount", "0") or 0) > 0
    except Exception:  # noqa: BLE001 - Spark Connect sessions have no SparkContext
        return False


def executor_count(spark: SparkSession) -> int:
    """The executors registered now (1 in local mode, where the driver runs the tasks)."""
    try:
        # getExecutorMemoryStatus lists the block managers: every executor and the driver.
        return max(1, spark.sparkContext._jsc.sc().getExecutorMemoryStatus().size() - 1)
    except Exception:  # noqa: BLE001 - Spark Connect sessions have no SparkContext
        return 1


def tasks_per_wave(conf: dict[str, str], executors: int, default_parallelism: int) -> int:
    """One task per GPU when executors have GPUs and each task takes some
    (``spark.executor.resource.gpu.amount`` / ``spark.task.resource.gpu.amount`` per executor);
    ``default_parallelism`` otherwise. ``spark.executor.instances``, when set, counts the
    executors still coming up."""
    executor_gpus = float(conf.get("spark.executor.resource.gpu.amount", 0) or 0)
    task_gpus = float(conf.get("spark.task.resource.gpu.amount", 0) or 0)
    if executor_gpus <= 0 or task_gpus <= 0:
        return default_parallelism
    executors = max(executors, int(conf.get("spark.executor.instances", 0) or 0))
    return max(1, executors * int(executor_gpus / task_gpus + 1e-9))
