"""Delta tables: existence and column checks with actionable errors, versions."""
from __future__ import annotations

from pyspark.sql import DataFrame, SparkSession


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
