"""The package's Spark sessions and spark-submit jobs print the package's progress, not Spark's
internal warnings of every ordinary run; real warnings stay."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from dolly_spark.spark.install import setup_spark
from project_home import spark_log_lines, with_short_lived_jvm
from dolly_spark.spark.log_config import (QUIETED_LOGGERS, SILENCED_LOGGERS, log4j2_properties,
                                          written_by_the_package)
from dolly_spark.spark.sessions import _log_config_option

REPO = Path(__file__).resolve().parents[2]

ORDINARY_RUN = textwrap.dedent("""
    from delta.tables import DeltaTable
    from dolly_spark.spark.sessions import get_spark

    spark = get_spark("quiet", master="local[1]", ui=False, shuffle_partitions=1)
    spark.createDataFrame([(1, "open"), (2, "open")], "id INT, status STRING").write.format("delta").saveAsTable("t")
    spark.sql("UPDATE t SET status = 'closed' WHERE id = 1")
    spark.sql("DELETE FROM t WHERE id = 2")
    # Overwritten as a run's staging tables are: the metastore's Hive-format schema change fails first.
    spark.read.table("t").write.format("delta").mode("overwrite").option("overwriteSchema", "true").saveAsTable("t")
    # A MERGE materializes its source with a local checkpoint and unpersists it afterwards.
    source = spark.createDataFrame([(1, "done"), (3, "new")], "id INT, status STRING")
    (DeltaTable.forName(spark, "t").alias("t").merge(source.alias("s"), "t.id = s.id")
     .whenMatchedUpdateAll().whenNotMatchedInsertAll().execute())
    print(spark.read.table("t").count())
    # A real warning, from a sibling of the quieted Delta commands: it must still show.
    logger = spark.sparkContext._jvm.org.apache.logging.log4j.LogManager.getLogger(
        "org.apache.spark.sql.delta.commands.MergeIntoCommand")
    logger.warn("a real warning still shows")
    spark.stop()
""")


@pytest.mark.slow
def test_a_session_the_package_starts_prints_no_internal_warnings(tmp_path):
    conf_dir = tmp_path / "spark_conf"  # no log4j2.properties of the user's: the package's applies
    conf_dir.mkdir()
    env = with_short_lived_jvm({
        **os.environ, "DOLLY_SPARK_HOME": str(tmp_path / "home"), "SPARK_CONF_DIR": str(conf_dir),
        "PYSPARK_PYTHON": sys.executable,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))})
    run = subprocess.run([sys.executable, "-c", ORDINARY_RUN], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=400)
    assert run.returncode == 0 and run.stdout.strip().endswith("2"), run.stderr[-3000:]
    warnings = [line for line in run.stderr.splitlines() if " WARN " in line]
    noise = [line for line in warnings
             if any(f" WARN {name.rsplit('.', 1)[1]}:" in line for name in QUIETED_LOGGERS)]
    assert not noise, "\n".join(noise)
    errors = spark_log_lines(run.stderr, "ERROR")
    assert not errors, "\n".join(errors)
    assert any("WARN MergeIntoCommand: a real warning still shows" in line for line in warnings), run.stderr[-3000:]


def test_the_configuration_quiets_only_those_loggers():
    text = log4j2_properties()
    assert "rootLogger.level = warn\n" in text
    named = [line.split(" = ")[1] for line in text.splitlines() if line.startswith("logger.") and ".name = " in line]
    assert named == [*QUIETED_LOGGERS, *SILENCED_LOGGERS]
    assert text.count(".level = error\n") == len(QUIETED_LOGGERS)
    assert text.count(".level = fatal\n") == len(SILENCED_LOGGERS)


EARLIER_VERSION = """\
# dolly-spark setup-spark: Spark's console output at WARN, so jobs show their own progress.
# Set rootLogger.level = info for Spark's full log.
rootLogger.level = warn
rootLogger.appenderRef.stdout.ref = console
appender.console.type = Console
appender.console.name = console
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = %d{yy/MM/dd HH:mm:ss} %p %c{1}: %m%n%ex
"""


def test_setup_spark_upgrades_only_its_own_unedited_file(tmp_path):
    own, edited, users, empty = (tmp_path / name for name in ("own", "edited", "users", "empty"))
    for directory in (own, edited, users, empty):
        directory.mkdir()
    (own / "log4j2.properties").write_text(EARLIER_VERSION)
    (edited / "log4j2.properties").write_text(EARLIER_VERSION.replace("level = warn", "level = info"))
    (users / "log4j2.properties").write_text("rootLogger.level = info\n")
    for directory in (own, edited, users, empty):
        setup_spark(directory)
    assert (own / "log4j2.properties").read_text() == log4j2_properties()
    assert (empty / "log4j2.properties").read_text() == log4j2_properties()
    assert "rootLogger.level = info" in (edited / "log4j2.properties").read_text()
    assert (users / "log4j2.properties").read_text() == "rootLogger.level = info\n"


def test_a_session_uses_the_users_log_config_when_spark_has_one(tmp_path, monkeypatch):
    conf_dir, home = tmp_path / "conf", tmp_path / "home"
    conf_dir.mkdir()
    monkeypatch.setenv("SPARK_CONF_DIR", str(conf_dir))
    option = _log_config_option(home)  # none in the conf dir: the package's, under the home
    assert option == f" -Dlog4j2.configurationFile={(home / 'log4j2.properties').as_uri()}"
    assert written_by_the_package((home / "log4j2.properties").read_text())
    setup_spark(conf_dir)  # the package's own in the conf dir: still the one under the home
    assert _log_config_option(home) == option
    (conf_dir / "log4j2.properties").write_text("rootLogger.level = info\n")
    assert _log_config_option(home) == ""  # the JVM reads the user's from the conf dir
