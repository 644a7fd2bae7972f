"""Spark's console log as the package configures it: WARN and above, less the internal warnings
Spark, Hive and Delta print on every ordinary run of this package's jobs.

Quieted to ERROR, one logger each (their errors still show, and so does every other logger's
warning): the Hive catalog's note that Delta tables have no Hive SerDe (every ``saveAsTable``, and
its note that it could not alter such a table's schema in Hive's format), the embedded Derby
metastore's and the Hive session's start-up notes, Hadoop's missing native library, Delta's
UPDATE/DELETE note that a table has no statistics to validate record counts, the note that a
locally checkpointed RDD (a MERGE's materialized source) was unpersisted, and the note that a
plan's string was truncated.

Silenced (FATAL only), because what they print at ERROR is part of that same ordinary run: the
Hive metastore's handlers, which log the failed Hive-format schema change of a Delta table that
is overwritten (a run's staging tables, chunk after chunk) before Spark stores the schema in its
own format. A metastore failure that matters still reaches the job: Spark raises it.

The same text goes into Spark's conf directory (``dolly-spark setup-spark``) and under the project
home for the sessions the package starts. A file the package wrote, unedited, is brought up to
date; any other file, including one of the package's that was edited, is kept: deleting a
``logger.quiet`` pair there brings that logger's warnings back.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

QUIETED_LOGGERS = (
    "org.apache.spark.sql.hive.HiveExternalCatalog",
    "org.apache.hadoop.hive.metastore.ObjectStore",
    "org.apache.hadoop.hive.ql.session.SessionState",
    "org.apache.hadoop.hive.conf.HiveConf",
    "org.apache.hadoop.util.NativeCodeLoader",
    "org.apache.spark.sql.delta.commands.UpdateCommand",
    "org.apache.spark.sql.delta.commands.DeleteCommand",
    "org.apache.spark.rdd.MapPartitionsRDD",
    "org.apache.spark.util.SparkStringUtils",
)
SILENCED_LOGGERS = (
    "org.apache.hadoop.hive.metastore.HiveAlterHandler",
    "org.apache.hadoop.hive.metastore.RetryingHMSHandler",
)

HEADER = "# dolly-spark: Spark's console output at WARN, so jobs show their own progress."
# How each console line looks: "26/12/05 11:56:37 WARN TaskSetManager: ...", then any stack trace.
CONSOLE_PATTERN = "%d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex"

# SHA-256 of the texts earlier versions of the package wrote, which it may replace.
EARLIER_VERSIONS = frozenset({
    "08fa9064aaa6e8cf909c5d0af66510a11ec4ccb2ee6c1dd805681c8e6be55e2b",
    "d1c9343892be5adfbd19746a35f55635383bf7bb8be67e17ba4f74b6ab8fbcb2",
    "2aadd3c805d3abafdd285989eb009eed222575304dd00196e20b70b91a108690",
})


def log4j2_properties() -> str:
    """The log4j2 configuration the package writes (see the module docstring)."""
    lines = [
        HEADER,
        "# Rewritten by dolly-spark when its version changes, unless you edit it. The loggers below",
        "# print only errors (the silent ones only fatal errors): delete a pair to see its warnings",
        "# again; rootLogger.level = info adds",
        "# Spark's full log.",
        "rootLogger.level = warn",
        "rootLogger.appenderRef.stdout.ref = console",
        "appender.console.type = Console",
        "appender.console.name = console",
        "appender.console.target = SYSTEM_ERR",
        "appender.console.layout.type = PatternLayout",
        f"appender.console.layout.pattern = {CONSOLE_PATTERN}",
    ]
    for prefix, level, names in (("quiet", "error", QUIETED_LOGGERS), ("silent", "fatal", SILENCED_LOGGERS)):
        for index, name in enumerate(names):
            lines += [f"logger.{prefix}{index}.name = {name}", f"logger.{prefix}{index}.level = {level}"]
    return "\n".join(lines) + "\n"


def written_by_the_package(text: str) -> bool:
    """True for a log4j2 file exactly as this package wrote it (this version or an earlier one);
    a user's own file, or one of the package's that was edited, is not."""
    return text == log4j2_properties() or hashlib.sha256(text.encode("utf-8")).hexdigest() in EARLIER_VERSIONS


def write_unless_edited(path: Path) -> bool:
    """Write the package's configuration to ``path`` when there is no file or an unedited one of
    the package's; True when ``path`` now holds it, False when a file of the user's was kept."""
    if path.exists():
        text = path.read_text(encoding="utf-8")
        if not written_by_the_package(text):
            return False
        if text == log4j2_properties():
            return True
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(log4j2_properties(), encoding="utf-8")
    return True
