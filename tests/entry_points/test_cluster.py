"""The summarize job on a real Spark standalone cluster, submitted as the README says: executors
in their own JVMs; then, in one run on the "vllm" engine, a Python worker killed mid-task, an
executor killed mid-run, and the model shipped from the driver for executors without registry
access."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from project_home import background_command, read_delta, run_command
from standalone_cluster import StandaloneCluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="a Spark cluster needs Java 17+ on PATH"),
]

# Version 1 by number: the home is shared with the README's commands, which may promote another.
SUMMARIZE = ("spark-submit --master {master} jobs/summarize_tickets.py --config conf/summarize_tickets.yaml "
             "--model-uri models:/support_dolly/1")
SAMPLE_TICKETS = 40


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with StandaloneCluster(tmp_path_factory.mktemp("standalone"), workers=2) as running:
        yield running


def node_caches(cluster) -> list[Path]:
    """The model cache of each node that has one (under the root of its Spark local directory)."""
    return [d / "dolly_spark_model_cache" for d in cluster.local_dirs if (d / "dolly_spark_model_cache").exists()]


def executor_loads(cluster, app_id: str) -> list[str]:
    """Every model load the executors' Python workers printed to their executor's log, in the
    application ``app_id``."""
    return [line for stderr in cluster.root.glob(f"node*/work/{app_id}/*/stderr")
            for line in stderr.read_text(errors="replace").splitlines() if line.startswith("dolly_spark: loaded ")]


def loading_pids(loads: set[str]) -> list[str]:
    """The process id of each load line: a process that loaded twice appears twice."""
    return [re.search(r"pid (\d+), load \d+ of this process\)$", line)[1] for line in loads]


def python_workers(cluster) -> list[int]:
    """Process ids of the Python workers the executors' daemons forked. A worker is forked when
    a task asks for one and no idle worker is left: a new one is inside its task, importing the
    package and loading the model for seconds before it generates."""
    workers = []
    for executor in cluster.executor_pids():
        daemons = subprocess.run(["pgrep", "-P", str(executor), "-f", "pyspark.daemon"], capture_output=True,
                                 text=True).stdout.split()
        for daemon in daemons:
            workers += [int(pid) for pid in subprocess.run(["pgrep", "-P", daemon], capture_output=True,
                                                           text=True).stdout.split()]
    return workers


def one_row_per_ticket(spark, home: Path, table: str) -> dict[str, str]:
    rows = read_delta(spark, home, table).select("ticket_id", "response", "error").collect()
    ids = [row["ticket_id"] for row in rows]
    assert len(ids) == len(set(ids)) == SAMPLE_TICKETS, f"{len(ids)} rows, {len(set(ids))} distinct ids"
    return {row["ticket_id"]: row["response"] for row in rows}


def wait_for(condition, what: str, process, timeout: float = 600):
    # Generous: the first chunk on a fresh cluster (JVMs, Delta, the model load) takes minutes on
    # two busy cores; a job that dies fails at once through the poll below.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = condition()
        if found:
            return found
        assert process.poll() is None, f"the job ended (exit {process.returncode}) before {what}"
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


@dataclass
class Run:
    app_id: str
    answers: dict[str, str]  # ticket id -> summary


@pytest.fixture(scope="module")
def undisturbed(spark, cluster, seeded_home) -> Run:
    """The first run on the cluster, untouched."""
    result = run_command(f"{SUMMARIZE.format(master=cluster.url)} --target-table cluster_summaries", seeded_home)
    (cluster.root / "undisturbed.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"{SAMPLE_TICKETS} tickets summarized with support_dolly v1" in result.stdout
    output = result.stdout + result.stderr
    assert "starting a local Spark session" not in output
    assert f"using the Spark master {cluster.url} from spark-submit" in output
    # Spark's console output stays at WARN: the job's own progress lines are what a user reads.
    assert not re.search(r"^\d\d/\d\d/\d\d \d\d:\d\d:\d\d INFO ", result.stderr, re.M), result.stderr[:3000]
    (app,) = cluster.status()["completedapps"]  # the master ran it on its workers' executors
    assert app["name"] == "summarize_tickets.py", app
    return Run(app["id"], one_row_per_ticket(spark, seeded_home, "cluster_summaries"))


def test_summarize_job_runs_on_the_cluster_executors(cluster, seeded_home, undisturbed):
    assert sum(1 for text in undisturbed.answers.values() if text) >= SAMPLE_TICKETS - 1
    # Files came once to each node that ran tasks, into its own local disk; each executor
    # Python worker loaded the model once (a pid loading twice would appear twice).
    downloads = {cache: len(list(cache.glob("*/downloads.log"))) for cache in node_caches(cluster)}
    assert downloads and all(count == 1 for count in downloads.values()), downloads
    assert all(len((ledger).read_text().splitlines()) == 1 for cache in downloads for ledger in cache.glob("*/downloads.log"))
    loads = set(executor_loads(cluster, undisturbed.app_id))  # an executor's log may repeat a line: each load is numbered
    load_pids = loading_pids(loads)
    assert load_pids and all(line.endswith(", load 1 of this process)") for line in loads), loads
    assert len(load_pids) == len(set(load_pids)), loads
    assert not (seeded_home / "model_cache").exists() or not any((seeded_home / "model_cache").iterdir())


def test_a_killed_python_worker_and_a_killed_executor_lose_nothing_and_change_no_answer(
        spark, cluster, seeded_home, undisturbed, tmp_path):
    """One run, chunked, on the "vllm" engine, loading the model from a shared directory, meets
    both faults: a Python worker killed inside its task, then an executor killed after the first
    chunk was merged. Its answers are the undisturbed run's, which the "hf" engine gave."""
    shared = tmp_path / "volume"
    caches_before = {path for cache in node_caches(cluster) for path in cache.iterdir()}
    workers_before = set(python_workers(cluster))  # none: executors belong to their application
    log = tmp_path / "job.log"
    command = (f"{SUMMARIZE.format(master=cluster.url)} --target-table summaries_faults --chunk-rows 20 "
               f"--shared-model-dir {shared} --engine vllm")
    with background_command(command, seeded_home, log) as job:
        (worker, *_) = wait_for(lambda: sorted(set(python_workers(cluster)) - workers_before),
                                "an executor forked a Python worker", job)
        os.kill(worker, signal.SIGKILL)
        first_merge = seeded_home / "warehouse" / "summaries_faults" / "_delta_log" / "00000000000000000001.json"
        wait_for(first_merge.exists, "the first chunk was merged", job)
        executors = cluster.executor_pids()
        assert len(executors) == 2, executors
        os.kill(executors[0], signal.SIGKILL)
        assert job.wait(timeout=600) == 0, log.read_text()[-4000:]
    output = log.read_text()
    assert f"{SAMPLE_TICKETS} tickets summarized" in output
    assert re.search(r"Lost task .*Python worker exited unexpectedly|Lost task .*crashed", output, re.S), output[-3000:]
    assert re.search(r"Lost executor|Executor lost|removed executor|Removing executor", output, re.I), output[-3000:]
    assert executors[0] not in cluster.executor_pids()
    # One row per ticket, each the greedy answer the undisturbed run gave.
    assert one_row_per_ticket(spark, seeded_home, "summaries_faults") == undisturbed.answers
    engines = read_delta(spark, seeded_home, "summaries_faults").groupBy("engine").count().collect()
    assert {row["engine"]: row["count"] for row in engines} == {"vllm": SAMPLE_TICKETS}
    # One vLLM engine per Python worker: each worker that loaded, loaded once.
    (faults,) = [app for app in cluster.status()["completedapps"] if app["id"] != undisturbed.app_id]
    executor_stderr = "".join(path.read_text(errors="replace") for path in
                              cluster.root.glob(f"node*/work/{faults['id']}/*/stderr"))
    assert "Error parsing config" not in executor_stderr  # vLLM finds the registered model's config beside its tokenizer
    loads = set(executor_loads(cluster, faults["id"]))
    assert loads and all(" with engine vllm on cpu " in line for line in loads), loads
    load_pids = loading_pids(loads)
    assert len(load_pids) == len(set(load_pids)), loads

    # The driver downloaded once into the shared directory, and the executors (the replacement
    # too) loaded from it, downloading nothing to their nodes.
    downloads = [line for ledger in shared.glob("*/downloads.log") for line in ledger.read_text().splitlines()]
    assert len(downloads) == 1, downloads
    new_entries = {path for cache in node_caches(cluster) for path in cache.iterdir()} - caches_before
    assert not any((entry / "downloads.log").exists() for entry in new_entries if entry.is_dir())
    assert not any((entry / "files").exists() for entry in new_entries if entry.is_dir())
