"""A real Spark standalone cluster for tests: one master and N workers, each its own JVM started
with ``spark-class`` from the installed pyspark, bound to 127.0.0.1 on free ports, stopped by
their own process ids. Each worker has its own local directory, as each node of a cluster has its
own local disk."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

from dolly_spark.spark.log_config import log4j2_properties
from project_home import job_env

# The daemons bind ports the system picks (0), so no port probed free can be taken before a JVM
# binds it; the master's web UI address is read from its log: the package's log4j2 configuration
# with that one logger at INFO (the executors keep the Spark conf's own logging).
DAEMON_LOG_CONFIG = log4j2_properties() + (
    "logger.webui.name = org.apache.spark.deploy.master.ui.MasterWebUI\nlogger.webui.level = info\n")
WEB_UI_LINE = re.compile(r"Bound MasterWebUI to [^,]+, and started at (http://\S+)")


def spark_class() -> str:
    from pyspark.find_spark_home import _find_spark_home

    return str(Path(_find_spark_home()) / "bin" / "spark-class")


class StandaloneCluster:
    """``with StandaloneCluster(root, workers=2) as cluster: ... cluster.url ...``"""

    def __init__(self, root: Path, workers: int = 2, cores: int = 1, memory: str = "2g"):
        self.root = root
        self.url = ""  # spark://127.0.0.1:<port>, known once the master is up
        self.webui = ""  # http://127.0.0.1:<port>
        self.worker_count, self.cores, self.memory = workers, cores, memory
        self.master: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.local_dirs: list[Path] = []

    def __enter__(self) -> "StandaloneCluster":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _env(self, **extra: str) -> dict[str, str]:
        # Executors inherit their worker's environment: the venv first on PATH gives their
        # Python workers this interpreter, as an activated venv does on a real node.
        venv_bin = str(Path(os.sys.executable).parent)
        log_config = self.root / "daemon-log4j2.properties"
        # Every daemon on the loopback address, as on a single machine the docs say to export.
        return job_env(self.root / "unused-home", PATH=f"{venv_bin}:{os.environ['PATH']}", SPARK_LOCAL_IP="127.0.0.1",
                       SPARK_LOG_DIR=str(self.root / "logs"),
                       SPARK_DAEMON_JAVA_OPTS=f"-Dlog4j2.configurationFile={log_config}", **extra)

    def _start(self) -> None:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        (self.root / "daemon-log4j2.properties").write_text(DAEMON_LOG_CONFIG)
        master_log = logs / "master.log"
        self.master = subprocess.Popen(
            [spark_class(), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
             "--port", "0", "--webui-port", "0"],
            env=self._env(), stdout=open(master_log, "wb"), stderr=subprocess.STDOUT)
        self.webui = self._wait_for(lambda: WEB_UI_LINE.search(master_log.read_text(errors="replace")),
                                    "the master's web UI")[1]
        self.url = self._wait_for(self.status, "the master's status page")["url"]
        for index in range(self.worker_count):
            local_dir = self.root / f"node{index}" / "local"
            work_dir = self.root / f"node{index}" / "work"
            local_dir.mkdir(parents=True)
            work_dir.mkdir(parents=True)
            self.local_dirs.append(local_dir)
            self.workers.append(subprocess.Popen(
                [spark_class(), "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                 "--cores", str(self.cores), "--memory", self.memory, "--webui-port", "0",
                 "--work-dir", str(work_dir), self.url],
                env=self._env(SPARK_LOCAL_DIRS=str(local_dir)),
                stdout=open(logs / f"worker{index}.log", "wb"), stderr=subprocess.STDOUT))
        self._wait_for(lambda: len([w for w in self.status()["workers"] if w["state"] == "ALIVE"])
                       == self.worker_count, "the workers to register")

    def _wait_for(self, condition, what: str, timeout: float = 120):
        """``condition()``'s first true value, polled while every cluster process is alive."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in [self.master, *self.workers]:
                if process.poll() is not None:
                    raise RuntimeError(f"a cluster process exited with {process.returncode}; see {self.root / 'logs'}")
            try:
                found = condition()
                if found:
                    return found
            except (OSError, ValueError, TypeError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {what}; see {self.root / 'logs'}")

    def status(self) -> dict | None:
        """The master's JSON status page: workers, active and completed applications."""
        try:
            with urllib.request.urlopen(f"{self.webui}/json/", timeout=5) as page:
                return json.load(page)
        except OSError:
            return None

    def executor_pids(self) -> list[int]:
        """Process ids of the executor JVMs the workers launched."""
        pids = []
        for worker in self.workers:
            found = subprocess.run(["pgrep", "-P", str(worker.pid), "-f", "CoarseGrainedExecutorBackend"],
                                   capture_output=True, text=True)
            pids += [int(pid) for pid in found.stdout.split()]
        return pids

    def stop(self) -> None:
        for process in [*self.workers, self.master]:
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in [*self.workers, self.master]:
            if process is None:
                continue
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
