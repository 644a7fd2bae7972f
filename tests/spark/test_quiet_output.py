"""The package's Spark sessions and spark-submit jobs print the package's progress, not Spark's
internal warnings of every ordinary run; real warnings stay."""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

from delta.tables import DeltaTable

from dolly_spark.spark.install import setup_spark
from dolly_spark.spark.log_config import (CONSOLE_PATTERN, QUIETED_LOGGERS, SILENCED_LOGGERS, log4j2_properties,
                                          written_by_the_package)
from dolly_spark.spark.sessions import _log_config_option
from project_home import internal_warnings, spark_log_lines


@contextlib.contextmanager
def console_log(spark) -> Iterator[Callable[[], str]]:
    """What the session's console log prints meanwhile, as a function that returns it so far: a
    second appender on the root logger, in the console's layout, sees exactly the events that
    pass the configured logger levels, as the console does."""
    jvm = spark.sparkContext._jvm
    core = jvm.org.apache.logging.log4j.core
    context = jvm.org.apache.logging.log4j.LogManager.getContext(False)
    root = context.getConfiguration().getRootLogger()
    writer = jvm.java.io.StringWriter()
    layout = core.layout.PatternLayout.newBuilder().withPattern(CONSOLE_PATTERN).build()
    appender = core.appender.WriterAppender.createAppender(layout, None, writer, "dolly_spark-test-console", False,
                                                           True)
    appender.start()
    root.addAppender(appender, None, None)
    context.updateLoggers()
    try:
        yield writer.toString
    finally:
        root.removeAppender("dolly_spark-test-console")
        context.updateLoggers()
        appender.stop()


def test_an_ordinary_run_prints_no_internal_warnings_and_real_ones_still_show(spark):
    """The test session's Spark was started by the package with no log4j2.properties in Spark's
    conf directory (see conftest): the package's configuration applies. Start-up's notes are
    checked on the README commands' own output."""
    with console_log(spark) as printed:
        spark.createDataFrame([(1, "open"), (2, "open")], "id INT, status STRING").write.format("delta") \
            .saveAsTable("quiet_ordinary_run")
        spark.sql("UPDATE quiet_ordinary_run SET status = 'closed' WHERE id = 1")
        spark.sql("DELETE FROM quiet_ordinary_run WHERE id = 2")
        # Overwritten as a run's staging tables are: the metastore's Hive-format schema change fails first.
        spark.read.table("quiet_ordinary_run").write.format("delta").mode("overwrite") \
            .option("overwriteSchema", "true").saveAsTable("quiet_ordinary_run")
        # A MERGE materializes its source with a local checkpoint and unpersists it afterwards.
        source = spark.createDataFrame([(1, "done"), (3, "new")], "id INT, status STRING")
        (DeltaTable.forName(spark, "quiet_ordinary_run").alias("t").merge(source.alias("s"), "t.id = s.id")
         .whenMatchedUpdateAll().whenNotMatchedInsertAll().execute())
        assert spark.read.table("quiet_ordinary_run").count() == 2
        # A real warning, from a sibling of the quieted Delta commands: it must still show.
        spark.sparkContext._jvm.org.apache.logging.log4j.LogManager.getLogger(
            "org.apache.spark.sql.delta.commands.MergeIntoCommand").warn("a real warning still shows")
        output = printed()
    assert not internal_warnings(output), output
    assert not spark_log_lines(output, "ERROR"), output
    # The one warning printed is the real one.
    assert [line.split(" WARN ", 1)[1] for line in spark_log_lines(output, "WARN")] == [
        "MergeIntoCommand: a real warning still shows"], output


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
