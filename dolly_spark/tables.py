"""Spark sessions and Delta tables: the embedded local session, table checks and keyed MERGE."""
from __future__ import annotations

import logging
import os
import sys

from pyspark.sql import DataFrame, SparkSession

from dolly_spark.settings import project_home

log = logging.getLogger(__name__)

ARROW_BATCH_CONF = "spark.sql.execution.arrow.maxRecordsPerBatch"


def get_spark(
    app_name: str = "dolly_spark",
    master: str | None = None,
    arrow_batch_size: int = 1024,
    shuffle_partitions: int = 8,
    ui: bool = True,
    extra_conf: dict[str, str] | None = None,
) -> SparkSession:
    """The active Spark session, or a new local one with Delta Lake configured.

    An active session (Databricks, a notebook, spark-submit with its own config) is returned
    untouched. Otherwise a session runs on ``master`` (default ``$DOLLY_SPARK_MASTER`` or
    ``local[*]``) with the Delta extension and catalog, Arrow enabled, and its warehouse and
    Derby metastore under the project home, so ``saveAsTable`` tables persist across runs. Delta's
    jars come from Maven Central at the first start and from the local Ivy cache afterwards.
    """
    active = SparkSession.getActiveSession()
    if active is not None:
        return active

    from delta import configure_spark_with_delta_pip

    # Python workers must run this interpreter: a venv's python is not the python3 on PATH,
    # and workers started with another one cannot import pyarrow or this package.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)

    home = project_home()
    metastore = home / "metastore_db"
    conf = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        ARROW_BATCH_CONF: str(arrow_batch_size),
        "spark.sql.shuffle.partitions": str(shuffle_partitions),
        "spark.sql.warehouse.dir": str(home / "warehouse"),
        "spark.hadoop.javax.jdo.option.ConnectionURL": f"jdbc:derby:;databaseName={metastore};create=true",
        "spark.driver.extraJavaOptions": f"-Dderby.system.home={home}",
        "spark.ui.enabled": "true" if ui else "false",
        "spark.pyspark.python": sys.executable,
        "spark.python.worker.reuse": "true",
        # Delta replays its log over 50 partitions by default: far too many for one machine.
        "spark.databricks.delta.snapshotPartitions": "2",
        "spark.ui.showConsoleProgress": "false",
    }
    conf.update(extra_conf or {})
    master = master or os.environ.get("DOLLY_SPARK_MASTER", "local[*]")
    builder = SparkSession.builder.appName(app_name).master(master)
    for key, value in conf.items():
        builder = builder.config(key, value)
    builder = builder.enableHiveSupport()
    log.info("starting a local Spark session (%s) with Delta Lake; tables under %s", master, home)
    return configure_spark_with_delta_pip(builder).getOrCreate()


def table_exists(spark: SparkSession, table: str) -> bool:
    """True when ``table`` (a name in the catalog) exists."""
    return spark.catalog.tableExists(table)


def require_table(spark: SparkSession, table: str, role: str = "table") -> DataFrame:
    """The DataFrame of ``table``, or a ValueError that names it and says what to do."""
    if not table_exists(spark, table):
        raise ValueError(
            f"{role} {table!r} does not exist in the Spark catalog; create it or pass the right "
            "name (catalog.schema.table on Unity Catalog)."
        )
    return spark.read.table(table)


def require_columns(df: DataFrame, columns: dict[str, str], where: str) -> None:
    """Raise a ValueError naming ``where`` unless each column exists with a Spark string type.

    ``columns`` maps a role ("input column") to the column name.
    """
    types = dict(df.dtypes)
    for role, column in columns.items():
        if column not in types:
            raise ValueError(
                f"{role} {column!r} is not a column of {where}; its columns are {sorted(types)}."
            )
        if types[column] != "string":
            raise ValueError(
                f"{role} {column!r} of {where} has type {types[column]}, not string; cast it with "
                f"F.col({column!r}).cast('string') first."
            )


def delta_version(spark: SparkSession, table: str) -> int:
    """The latest Delta version of ``table``."""
    from delta.tables import DeltaTable

    return DeltaTable.forName(spark, table).history(1).collect()[0]["version"]


def merge_on_keys(spark: SparkSession, updates: DataFrame, target: str, keys: list[str]) -> None:
    """MERGE ``updates`` into Delta table ``target`` on ``keys``: update matches, insert the rest.

    The target is created from ``updates``'s schema when it does not exist yet, so a first run
    and a rerun go through the same idempotent path.
    """
    from delta.tables import DeltaTable

    if not table_exists(spark, target):
        updates.limit(0).write.format("delta").saveAsTable(target)
    condition = " AND ".join(f"t.`{k}` <=> s.`{k}`" for k in keys)
    (
        DeltaTable.forName(spark, target)
        .alias("t")
        .merge(updates.alias("s"), condition)
        .whenMatchedUpdateAll()
        .whenNotMatchedInsertAll()
        .execute()
    )
