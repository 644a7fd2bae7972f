"""A real Spark standalone cluster for tests: one master and N workers, each its own JVM started
with ``spark-class`` from the installed pyspark, bound to 127.0.0.1 on free ports, stopped by
their own process ids. Each worker has its own local directory, as each node of a cluster has its
own local disk."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from project_home import job_env

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def spark_class() -> str:
    from pyspark.find_spark_home import _find_spark_home

    return str(Path(_find_spark_home()) / "bin" / "spark-class")


class StandaloneCluster:
    """``with StandaloneCluster(root, workers=2) as cluster: ... cluster.url ...``"""

    def __init__(self, root: Path, workers: int = 2, cores: int = 1, memory: str = "2g"):
        self.root = root
        self.port, self.webui_port = free_port(), free_port()
        self.url = f"spark://127.0.0.1:{self.port}"
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
        return job_env(self.root / "unused-home", PATH=f"{venv_bin}:{os.environ['PATH']}",
                       SPARK_LOG_DIR=str(self.root / "logs"), **extra)

    def _start(self) -> None:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        self.master = subprocess.Popen(
            [spark_class(), "org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
             "--port", str(self.port), "--webui-port", str(self.webui_port)],
            env=self._env(), stdout=open(logs / "master.log", "wb"), stderr=subprocess.STDOUT)
        self._wait_for(lambda: self.status() is not None, "the master's status page")
        for index in range(self.worker_count):
            local_dir = self.root / f"node{index}" / "local"
            work_dir = self.root / f"node{index}" / "work"
            local_dir.mkdir(parents=True)
            work_dir.mkdir(parents=True)
            self.local_dirs.append(local_dir)
            self.workers.append(subprocess.Popen(
                [spark_class(), "org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                 "--cores", str(self.cores), "--memory", self.memory, "--webui-port", str(free_port()),
                 "--work-dir", str(work_dir), self.url],
                env=self._env(SPARK_LOCAL_DIRS=str(local_dir)),
                stdout=open(logs / f"worker{index}.log", "wb"), stderr=subprocess.STDOUT))
        self._wait_for(lambda: len([w for w in self.status()["workers"] if w["state"] == "ALIVE"])
                       == self.worker_count, "the workers to register")

    def _wait_for(self, condition, what: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in [self.master, *self.workers]:
                if process.poll() is not None:
                    raise RuntimeError(f"a cluster process exited with {process.returncode}; see {self.root / 'logs'}")
            try:
                if condition():
                    return
            except (OSError, ValueError, TypeError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"timed out waiting for {what}; see {self.root / 'logs'}")

    def status(self) -> dict | None:
        """The master's JSON status page: workers, active and completed applications."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.webui_port}/json/", timeout=5) as page:
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
