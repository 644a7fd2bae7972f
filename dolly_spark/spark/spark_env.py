"""The block ``dolly-spark setup-spark`` keeps in ``spark-env.sh`` of the Spark conf: a
``spark-submit`` on a local master binds to the loopback address unless the user chose an address.

Spark looks the machine's hostname up when ``spark-submit`` starts; where it resolves to a
loopback address (most Debian and Ubuntu machines map it to 127.0.1.1 or 127.0.0.1) Spark warns
twice and binds to another interface. That happens in the JVM before a job's Python runs, so only
the launcher's environment can prevent it: Spark's launch scripts source ``spark-env.sh`` with the
command's arguments, and this block exports ``SPARK_LOCAL_IP=127.0.0.1`` there when the command
is a ``spark-submit`` whose master is local (``--master``, ``--conf spark.master=`` or
``spark-defaults.conf``; local when none is given) and neither ``$SPARK_LOCAL_IP``,
``$SPARK_LOCAL_HOSTNAME``, ``spark.driver.host`` nor ``spark.driver.bindAddress`` is set. A
cluster master, and Spark's own daemons (a standalone master or worker), are left alone: their
peers must reach them. The rest of a ``spark-env.sh`` is the user's and is kept.
"""
from __future__ import annotations

import re
from pathlib import Path

BEGIN = "# dolly-spark setup-spark: begin"
END = "# dolly-spark setup-spark: end"

# Spark's load-spark-env.sh sources this with `set -a`: every variable set here is exported to the
# JVM unless unset, hence the unset at the end.
LOOPBACK_BLOCK = f"""{BEGIN}
# A spark-submit on a local master binds to the loopback address unless you chose an address
# (SPARK_LOCAL_IP, SPARK_LOCAL_HOSTNAME, spark.driver.host or spark.driver.bindAddress), instead of
# warning that the hostname resolves to a loopback address. Delete this block to keep Spark's choice.
if [ "$1" = "org.apache.spark.deploy.SparkSubmit" ] && [ -z "${{SPARK_LOCAL_IP}}${{SPARK_LOCAL_HOSTNAME}}" ]; then
  dolly_spark_defaults="${{SPARK_CONF_DIR}}/spark-defaults.conf"
  dolly_spark_master="$(sed -n 's/^[[:space:]]*spark\\.master[[:space:]=:]*//p' "$dolly_spark_defaults" 2>/dev/null | tail -n 1)"
  dolly_spark_chosen="$(grep -sE '^[[:space:]]*spark\\.driver\\.(host|bindAddress)[[:space:]=:]' "$dolly_spark_defaults")"
  dolly_spark_previous=""
  for dolly_spark_arg in "$@"; do
    case "$dolly_spark_previous" in
      --master) dolly_spark_master="$dolly_spark_arg" ;;
      --conf|-c) dolly_spark_arg="--conf=$dolly_spark_arg" ;;
    esac
    case "$dolly_spark_arg" in
      --master=*) dolly_spark_master="${{dolly_spark_arg#--master=}}" ;;
      --conf=spark.master=*) dolly_spark_master="${{dolly_spark_arg#--conf=spark.master=}}" ;;
      --conf=spark.driver.host=*|--conf=spark.driver.bindAddress=*) dolly_spark_chosen=yes ;;
    esac
    dolly_spark_previous="$dolly_spark_arg"
  done
  case "${{dolly_spark_master:-local}}" in
    local*) [ -n "$dolly_spark_chosen" ] || export SPARK_LOCAL_IP=127.0.0.1 ;;
  esac
  unset dolly_spark_defaults dolly_spark_master dolly_spark_chosen dolly_spark_previous dolly_spark_arg
fi
{END}
"""


def write_loopback_block(spark_env: Path) -> bool:
    """Put ``LOOPBACK_BLOCK`` into ``spark_env`` (``spark-env.sh``), replacing an earlier version
    of it and keeping every other line; True when the file changed."""
    text = spark_env.read_text(encoding="utf-8") if spark_env.exists() else ""
    block = re.compile(rf"^{re.escape(BEGIN)}\n.*?^{re.escape(END)}\n?", re.S | re.M)
    if block.search(text):
        updated = block.sub(lambda _: LOOPBACK_BLOCK, text, count=1)
    else:
        separator = "\n" if text and not text.endswith("\n") else ""
        updated = text + separator + LOOPBACK_BLOCK
    if updated == text:
        return False
    spark_env.write_text(updated, encoding="utf-8")
    return True
