"""Spark's console log as the package configures it: WARN and above, less the internal warnings
Spark, Hive and Delta print on every ordinary run of this package's jobs.

Quieted to ERROR (their errors still show): the Hive catalog's note that Delta tables have no
Hive SerDe (every ``saveAsTable``) and that it could not alter such a table's schema in Hive's
format, the embedded Derby metastore's and Hive session's start-up notes, Hadoop's missing
native library, Delta's UPDATE/DELETE note that a table has no statistics to validate record
counts, and the note that a locally checkpointed RDD's lineage was truncated. Every other
warning stays. ``rootLogger.level = info`` (or deleting a logger's lines) brings them back.
"""
from __future__ import annotations

QUIETED_LOGGERS = (
    "org.apache.spark.sql.hive.HiveExternalCatalog",
    "org.apache.hadoop.hive.metastore.ObjectStore",
    "org.apache.hadoop.hive.ql.session.SessionState",
    "org.apache.hadoop.hive.conf.HiveConf",
    "org.apache.hadoop.util.NativeCodeLoader",
    "org.apache.spark.sql.delta.commands.UpdateCommand",
    "org.apache.spark.sql.delta.commands.DeleteCommand",
    "org.apache.spark.rdd.MapPartitionsRDD",
)

HEADER = "# dolly-spark: Spark's console output at WARN, so jobs show their own progress."


def log4j2_properties() -> str:
    """The log4j2 configuration the package writes (see the module docstring)."""
    lines = [
        HEADER,
        "# Set rootLogger.level = info for Spark's full log; the loggers below print only errors.",
        "rootLogger.level = warn",
        "rootLogger.appenderRef.stdout.ref = console",
        "appender.console.type = Console",
        "appender.console.name = console",
        "appender.console.target = SYSTEM_ERR",
        "appender.console.layout.type = PatternLayout",
        "appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex",
    ]
    for index, name in enumerate(QUIETED_LOGGERS):
        lines += [f"logger.quiet{index}.name = {name}", f"logger.quiet{index}.level = error"]
    return "\n".join(lines) + "\n"


def written_by_the_package(text: str) -> bool:
    """True for a log4j2 file this package wrote (any version of it), which it may rewrite; a
    user's own file is never touched."""
    return text.startswith(("# dolly-spark setup-spark:", HEADER))
