"""Make the pip-installed Spark of this environment ready for ``spark-submit`` with Delta Lake.

``spark-submit`` starts the JVM before a job's Python runs, so a job cannot add Delta's jars to
it any more. A real Spark installation keeps such settings in ``conf/spark-defaults.conf``;
``dolly-spark setup-spark`` writes them into the conf directory of the pyspark installed here
(``$SPARK_CONF_DIR`` when set), as a cluster's administrator would: Delta's package, its SQL
extension and catalog, and a log4j2 configuration that keeps Spark's console output at WARN, less
the internal warnings every run prints (``log_config``), so a job shows its own progress lines.
Settings already in ``spark-defaults.conf`` are kept, and so is a ``log4j2.properties`` of the
user's own (or one of the package's that was edited).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from dolly_spark.spark.log_config import write_unless_edited
from dolly_spark.spark.sessions import DELTA_CATALOG, DELTA_EXTENSION, delta_excludes, delta_package

log = logging.getLogger(__name__)

MARKER = "# dolly-spark setup-spark"


def spark_conf_dir() -> Path:
    """``$SPARK_CONF_DIR``, or the ``conf`` directory of the Spark that ``spark-submit`` runs."""
    if os.environ.get("SPARK_CONF_DIR"):
        return Path(os.environ["SPARK_CONF_DIR"])
    from pyspark.find_spark_home import _find_spark_home

    return Path(_find_spark_home()) / "conf"


def spark_defaults() -> dict[str, str]:
    """The settings a ``spark-submit`` of this package's jobs needs from the Spark conf."""
    return {
        "spark.jars.packages": delta_package(),
        "spark.jars.excludes": delta_excludes(),
        "spark.sql.extensions": DELTA_EXTENSION,
        "spark.sql.catalog.spark_catalog": DELTA_CATALOG,
    }


def read_defaults(path: Path) -> dict[str, str]:
    """The settings of a ``spark-defaults.conf`` file (``key value`` or ``key=value`` lines)."""
    settings = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            # Java properties: the key ends at the first blank, '=' or ':'; the value may hold them.
            match = re.match(r"([^\s=:]+)[\s=:]+(.*)", line)
            if match and not line.startswith("#"):
                settings[match[1]] = match[2].strip()
    return settings


def setup_spark(conf_dir: Path | None = None) -> Path:
    """Add the missing settings to ``spark-defaults.conf`` in ``conf_dir`` (default:
    ``spark_conf_dir()``) and the package's ``log4j2.properties`` unless the user has one there
    (an unedited earlier version of the package's is replaced); return the defaults file.
    Running it again changes nothing."""
    conf_dir = conf_dir or spark_conf_dir()
    conf_dir.mkdir(parents=True, exist_ok=True)
    defaults = conf_dir / "spark-defaults.conf"
    present = read_defaults(defaults)
    missing = {key: value for key, value in spark_defaults().items() if key not in present}
    if missing:
        lines = [f"{MARKER}: Delta Lake for jobs started with spark-submit"]
        lines += [f"{key} {value}" for key, value in missing.items()]
        existing = defaults.read_text(encoding="utf-8") if defaults.exists() else ""
        separator = "\n" if existing and not existing.endswith("\n") else ""
        defaults.write_text(existing + separator + "\n".join(lines) + "\n", encoding="utf-8")
        log.info("wrote %s to %s", ", ".join(missing), defaults)
    log4j = conf_dir / "log4j2.properties"
    if not write_unless_edited(log4j):
        log.info("kept %s, a log4j2 configuration of your own", log4j)
    stale = present.get("spark.jars.packages")
    if stale and delta_package() not in stale.split(","):
        log.warning("%s sets spark.jars.packages to %s, without %s that the installed delta-spark needs",
                    defaults, stale, delta_package())
    return defaults
