"""Run the README's commands as a user types them: in a shell with the venv activated, from the
repository, against a project home of their own."""
from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

from dolly_spark.paths import USER_CACHE_ENV_VAR

REPO = Path(__file__).resolve().parents[1]
VENV_ACTIVATE = Path(sys.executable).parent / "activate"
# How each line of Spark's console log begins, in the package's log4j2 layout (``%d{yy/MM/dd HH:mm:ss} ``).
SPARK_LOG_STAMP = r"\d\d/\d\d/\d\d \d\d:\d\d:\d\d "


def job_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a user's shell: this machine's, without the test session's Spark and
    MLflow settings, with the project home. No Spark address is chosen (``SPARK_LOCAL_IP`` is
    unset, as in a new user's shell): a local session must bind to the loopback address itself,
    without Spark's warning that the hostname resolves to one. The user cache
    (``$DOLLY_SPARK_USER_CACHE``) is kept: a machine's, shared by its project homes."""
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("PYSPARK_", "SPARK_", "MLFLOW_", "DOLLY_SPARK_", "VIRTUAL_ENV"))
           or key == USER_CACHE_ENV_VAR}  # the machine's cache is the user's, not the session's
    env.update({"DOLLY_SPARK_HOME": str(home), **extra})
    return with_short_lived_jvm(env)


def with_short_lived_jvm(env: dict[str, str]) -> dict[str, str]:
    """``env`` for a command whose JVM lives for seconds to a couple of minutes: the JIT's first
    tier alone ran a summarize job here in 36-38 s against 45.6 s with both tiers, whose
    optimizing compiler spends more CPU than it saves in that time. (The long-lived test
    session's own JVM keeps both.) What a job computes does not change."""
    env.setdefault("JAVA_TOOL_OPTIONS", "-XX:TieredStopAtLevel=1")
    return env


def shell_command(command: str) -> list[str]:
    """``command`` as typed in a shell whose venv is activated (``source .venv/bin/activate``)."""
    return ["bash", "-c", f"source {VENV_ACTIVATE} && {command}"]


def run_command(command: str, home: Path, timeout: float = 600, **env: str) -> subprocess.CompletedProcess:
    """Run ``command`` from the repository root; return it with its output captured."""
    return subprocess.run(shell_command(command), cwd=REPO, env=job_env(home, **env), capture_output=True,
                          text=True, timeout=timeout)


@contextlib.contextmanager
def background_command(command: str, home: Path, log: Path, **env: str) -> Iterator[subprocess.Popen]:
    """Run ``command`` in the background, its output going to ``log``; whatever happens in the
    ``with`` block, it does not outlive it (its whole process group is killed)."""
    process = subprocess.Popen(shell_command(command), cwd=REPO, env=job_env(home, **env), stdout=open(log, "w"),
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def seed_home(home: Path, tiny_model_dir: Path) -> Path:
    """A clean project home holding what `make demo` leaves, with the tiny model as the champion."""
    home.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, str(REPO / "tests" / "seed_project_home.py"), str(tiny_model_dir)],
                            cwd=REPO, env=job_env(home), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return home


def home_registry(home: Path):
    """An MLflow client of ``home``'s own tracking store and model registry (its ``mlflow.db``)."""
    from mlflow import MlflowClient

    registry = f"sqlite:///{home / 'mlflow.db'}"
    return MlflowClient(tracking_uri=registry, registry_uri=registry)


def read_delta(spark, home: Path, table: str):
    """A table of ``home``'s warehouse, read by path (the test session has its own metastore)."""
    return spark.read.format("delta").load(str(home / "warehouse" / table))


def spark_log_lines(output: str, level: str) -> list[str]:
    """The lines of ``output`` that Spark's console log printed at ``level`` (INFO, WARN, ERROR),
    in the layout of the package's log4j2 configuration (``%d{yy/MM/dd HH:mm:ss} %p %c{1}: %m``)."""
    return re.findall(rf"^{SPARK_LOG_STAMP}{level} .*$", output, re.M)


def spark_log_records(output: str) -> list[str]:
    """``output`` cut into records, each from one line Spark's console log printed (in the layout
    of ``spark_log_lines``) up to the next: a record holds its message's stack trace, and
    whatever else was printed before the next record."""
    return re.split(rf"(?m)^(?={SPARK_LOG_STAMP})", output)


# How Ivy's dependency report begins its lines when Spark resolves ``spark.jars.packages``:
# ":: loading settings ::", ":: resolving dependencies ::", "confs: [default]", "found <module>",
# the artifacts table (tab-indented "|      default     |   12  | ... ||   12  |   0   |") and the
# cache's whereabouts.
IVY_REPORT_LINE = (r"^(::|\s*confs: \[|\s*found \S+#|\t\|.*\|\|.*\||\t-{20,}|Ivy Default Cache set to|"
                   r"The jars for the packages stored in|\S+#\S+ added as a dependency|\s*\S+#\S+;\S+ from \S+ in \[|"
                   r"\s*\d+ artifacts copied|\s*downloading https?://|\s*\[SUCCESSFUL \])")


def ivy_report_lines(output: str) -> list[str]:
    """The lines of ``output`` that Ivy printed while resolving Maven packages for Spark."""
    return [line for line in output.splitlines() if re.match(IVY_REPORT_LINE, line)]


# Spark's note that its web UI took the next port: the tests run commands side by side (and other
# Sparks may run on the machine), each with its UI, so all but the first find 4040 taken. A
# user's one command on a quiet machine does not print it.
UI_PORT_TAKEN = re.compile(r"WARN Utils: Service 'SparkUI' could not bind on port \d+\. Attempting port \d+\.$")


def quiet_start_problems(output: str) -> list[str]:
    """What a healthy command must not print: Ivy's resolution report, and any line Spark's
    console log printed below ERROR (a WARN, an INFO), but for ``UI_PORT_TAKEN``."""
    below_error = spark_log_lines(output, "WARN") + spark_log_lines(output, "INFO")
    return ivy_report_lines(output) + [line for line in below_error if not UI_PORT_TAKEN.search(line)]


def internal_warnings(output: str) -> list[str]:
    """The warnings in ``output`` from the loggers the package's log configuration quiets: Spark's,
    Hive's and Delta's notes on every ordinary run, which a session of the package never prints."""
    from dolly_spark.spark.log_config import QUIETED_LOGGERS

    names = {name.rsplit(".", 1)[1] for name in QUIETED_LOGGERS}
    return [line for line in spark_log_lines(output, "WARN") if line.split(" WARN ", 1)[1].split(":", 1)[0] in names]
