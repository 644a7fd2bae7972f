"""The Spark installed in this environment: where it lives, its conf directory, and what its
``spark-defaults.conf`` holds. Read by the sessions the package starts and written by
``dolly-spark setup-spark`` (``install``)."""
from __future__ import annotations

import os
import re
from pathlib import Path


def spark_home() -> Path:
    """The Spark that ``spark-submit`` runs here: ``$SPARK_HOME``, or the pip-installed pyspark's."""
    from pyspark.find_spark_home import _find_spark_home

    return Path(_find_spark_home())


def spark_conf_dir() -> Path:
    """``$SPARK_CONF_DIR``, or the ``conf`` directory of the Spark that ``spark-submit`` runs."""
    if os.environ.get("SPARK_CONF_DIR"):
        return Path(os.environ["SPARK_CONF_DIR"])
    return spark_home() / "conf"


def read_defaults_line(line: str) -> tuple[str, str] | None:
    """The ``(key, value)`` of one line of a ``spark-defaults.conf`` file; None for a comment or
    a blank line."""
    line = line.strip()
    # Java properties: the key ends at the first blank, '=' or ':'; the value may hold them.
    match = re.match(r"([^\s=:]+)[\s=:]+(.*)", line)
    if match is None or line.startswith("#"):
        return None
    return match[1], match[2].strip()


def read_defaults(path: Path) -> dict[str, str]:
    """The settings of a ``spark-defaults.conf`` file (``key value`` or ``key=value`` lines)."""
    if not path.exists():
        return {}
    settings = (read_defaults_line(line) for line in path.read_text(encoding="utf-8").splitlines())
    return dict(setting for setting in settings if setting is not None)


def configured_defaults() -> dict[str, str]:
    """The settings of the ``spark-defaults.conf`` that Spark reads here (in ``spark_conf_dir()``)."""
    return read_defaults(spark_conf_dir() / "spark-defaults.conf")
