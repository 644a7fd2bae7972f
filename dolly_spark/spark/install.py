"""Make the pip-installed Spark of this environment ready for ``spark-submit`` with Delta Lake.

``spark-submit`` starts the JVM before a job's Python runs, so a job cannot add Delta's jars to
it any more. A real Spark installation keeps such settings in ``conf/spark-defaults.conf``;
``dolly-spark setup-spark`` writes them into the conf directory of the pyspark installed here
(``$SPARK_CONF_DIR`` when set), as a cluster's administrator would: Delta's jars, resolved once
into a local folder (``delta_jars``) and named in ``spark.jars``, so no submission resolves
anything or prints Ivy's report; its SQL extension and catalog; and a log4j2 configuration that
keeps Spark's console output at WARN, less the internal warnings every run prints
(``log_config``), so a job shows its own progress lines; and a block of ``spark-env.sh`` that binds
a ``spark-submit`` on a local master to the loopback address unless the user chose an address
(``spark_env``). Settings already in
``spark-defaults.conf`` are kept (the package's own earlier ``spark.jars.packages`` lines are
replaced), and so is a ``log4j2.properties`` of the user's own (or one of the package's that was
edited).
"""
from __future__ import annotations

import logging
from pathlib import Path

from dolly_spark.spark.delta_jars import (DELTA_CATALOG, DELTA_EXTENSION, delta_excludes, delta_jars_root,
                                          resolve_delta_jars)
from dolly_spark.spark.log_config import write_unless_edited
from dolly_spark.spark.spark_conf import read_defaults, read_defaults_line, spark_conf_dir
from dolly_spark.spark.spark_env import write_loopback_block

log = logging.getLogger(__name__)

MARKER = "# dolly-spark setup-spark"


def spark_defaults() -> dict[str, str]:
    """The settings a ``spark-submit`` of this package's jobs needs from the Spark conf, with
    Delta's jars resolved (``resolve_delta_jars``, once)."""
    return {
        "spark.jars": ",".join(str(jar) for jar in resolve_delta_jars()),
        "spark.sql.extensions": DELTA_EXTENSION,
        "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
    }


def delta_setting_of_the_package(key: str, value: str) -> bool:
    """True for a ``spark-defaults.conf`` setting of Delta's jars that this package wrote, this
    version or an earlier one (which resolved Delta at every start with ``spark.jars.packages``)."""
    if key == "spark.jars.packages":
        return value.startswith("io.delta:delta-spark_") and "," not in value
    if key == "spark.jars.excludes":
        return value == delta_excludes()
    if key == "spark.jars":
        return all(Path(jar).parent.parent == delta_jars_root() for jar in value.split(","))
    return False


def setup_spark(conf_dir: Path | None = None) -> Path:
    """Resolve Delta's jars once and add the missing settings to ``spark-defaults.conf`` in
    ``conf_dir`` (default: ``spark_conf_dir()``), replacing the package's own earlier settings of
    Delta's jars; keep the loopback block in its ``spark-env.sh``; write the package's
    ``log4j2.properties`` unless the user has one there (an unedited earlier version of the
    package's is replaced); return the defaults file. Running it
    again changes nothing. Raises DeltaJarsUnresolvedError, saying what to do, when the jars
    cannot be resolved (no Java, no route to Maven Central)."""
    conf_dir = conf_dir or spark_conf_dir()
    conf_dir.mkdir(parents=True, exist_ok=True)
    defaults = conf_dir / "spark-defaults.conf"
    wanted = spark_defaults()
    present = {key: value for key, value in read_defaults(defaults).items()
               if not (delta_setting_of_the_package(key, value) and value != wanted.get(key))}
    missing = {key: value for key, value in wanted.items() if key not in present}
    if missing:
        kept = [line for line in _lines(defaults) if _kept(line, present)]
        lines = kept + [f"{MARKER}: Delta Lake for jobs started with spark-submit"]
        lines += [f"{key} {value}" for key, value in missing.items()]
        defaults.write_text("\n".join(lines) + "\n", encoding="utf-8")
        log.info("wrote %s to %s", ", ".join(missing), defaults)
    if write_loopback_block(conf_dir / "spark-env.sh"):
        log.info("wrote the loopback address for local spark-submit runs to %s", conf_dir / "spark-env.sh")
    log4j = conf_dir / "log4j2.properties"
    if not write_unless_edited(log4j):
        log.info("kept %s, a log4j2 configuration of your own", log4j)
    if present.get("spark.jars", wanted["spark.jars"]) != wanted["spark.jars"]:
        log.warning("%s sets spark.jars to %s, without Delta's jars %s: add them to it", defaults,
                    present["spark.jars"], wanted["spark.jars"])
    return defaults


def _lines(defaults: Path) -> list[str]:
    return defaults.read_text(encoding="utf-8").splitlines() if defaults.exists() else []


def _kept(line: str, present: dict[str, str]) -> bool:
    """Whether a line of ``spark-defaults.conf`` stays: comments and blank lines other than the
    package's marker, and the settings in ``present``."""
    if line.startswith(MARKER):
        return False
    setting = read_defaults_line(line)
    return setting is None or present.get(setting[0]) == setting[1]
