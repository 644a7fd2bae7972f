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
from dolly_spark.spark.log_config import QUIETED_LOGGERS, log4j2_properties

NOISE = ("HiveExternalCatalog", "UpdateCommand", "DeleteCommand", "MapPartitionsRDD", "ObjectStore", "HiveConf")

ORDINARY_RUN = textwrap.dedent("""
    from dolly_spark.spark.sessions import get_spark

    spark = get_spark("quiet", master="local[1]", ui=False)
    spark.createDataFrame([(1, "open"), (2, "open")], "id INT, status STRING").write.format("delta").saveAsTable("t")
    spark.sql("UPDATE t SET status = 'closed' WHERE id = 1")
    spark.sql("DELETE FROM t WHERE id = 2")
    print(spark.read.table("t").localCheckpoint().count())
    # A real warning from a logger left alone: an unknown config key set at runtime.
    spark.sparkContext._jvm.org.apache.log4j.LogManager.getLogger("org.apache.spark.sql.execution").warn("still shown")
    spark.stop()
""")


@pytest.mark.slow
def test_a_session_the_package_starts_prints_no_internal_warnings(tmp_path):
    env = {**os.environ, "DOLLY_SPARK_HOME": str(tmp_path), "PYSPARK_PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                       os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, "-c", ORDINARY_RUN], env=env, cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("1"), run.stderr[-3000:]
    shown = [line for line in run.stderr.splitlines() if " WARN " in line]
    assert not [line for line in shown if any(f" WARN {name}:" in line for name in NOISE)], shown
    assert any("WARN execution: still shown" in line for line in shown), run.stderr[-3000:]


def test_setup_spark_quiets_the_same_loggers_and_upgrades_only_its_own_file(tmp_path):
    own, users = tmp_path / "own", tmp_path / "users"
    for directory in (own, users):
        directory.mkdir()
    (own / "log4j2.properties").write_text("# dolly-spark setup-spark: an earlier version\nrootLogger.level = warn\n")
    (users / "log4j2.properties").write_text("rootLogger.level = info\n")
    setup_spark(own)
    setup_spark(users)
    written = (own / "log4j2.properties").read_text()
    assert written == log4j2_properties() and "rootLogger.level = warn" in written
    assert all(f"= {name}\n" in written for name in QUIETED_LOGGERS)
    assert (users / "log4j2.properties").read_text() == "rootLogger.level = info\n"
