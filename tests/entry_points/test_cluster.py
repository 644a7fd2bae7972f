"""The summarize job on a real Spark standalone cluster, submitted exactly as the README says:
executors in their own JVMs, an executor killed mid-run, a Python worker killed mid-task, and the
model shipped from the driver for executors without registry access."""
from __future__ import annotations

import os
import re
import shutil
import signal
import time
from pathlib import Path

import pytest

from project_home import background_command, read_delta, run_command, seed_home
from standalone_cluster import StandaloneCluster

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("java") is None, reason="a Spark cluster needs Java 17+ on PATH"),
]

SUMMARIZE = "spark-submit --master {master} jobs/summarize_tickets.py --config conf/summarize_tickets.yaml"
SAMPLE_TICKETS = 40


@pytest.fixture(scope="module")
def home(tmp_path_factory, tiny_model_dir) -> Path:
    return seed_home(tmp_path_factory.mktemp("cluster") / "home", tiny_model_dir)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with StandaloneCluster(tmp_path_factory.mktemp("standalone"), workers=2) as running:
        yield running


def summarize(cluster, home: Path, *flags: str):
    result = run_command(" ".join([SUMMARIZE.format(master=cluster.url), *flags]), home)
    (home.parent / f"summarize-{len(list(home.parent.glob('summarize-*')))}.log").write_text(result.stdout + result.stderr)
    return result


def node_caches(cluster) -> list[Path]:
    """The model cache of each node that has one (under the root of its Spark local directory)."""
    return [d / "dolly_spark_model_cache" for d in cluster.local_dirs if (d / "dolly_spark_model_cache").exists()]


def executor_loads(cluster) -> list[str]:
    """Every model load the executors' Python workers printed to their executor's log."""
    return [line for stderr in cluster.root.glob("node*/work/app-*/*/stderr")
            for line in stderr.read_text(errors="replace").splitlines() if line.startswith("dolly_spark: loaded ")]


def one_row_per_ticket(spark, home: Path, table: str) -> dict[str, str]:
    rows = read_delta(spark, home, table).select("ticket_id", "response", "error").collect()
    ids = [row["ticket_id"] for row in rows]
    assert len(ids) == len(set(ids)) == SAMPLE_TICKETS, f"{len(ids)} rows, {len(set(ids))} distinct ids"
    return {row["ticket_id"]: row["response"] for row in rows}


def wait_for(condition, what: str, process, timeout: float = 600) -> None:
    # Generous: the first chunk on a fresh cluster (JVMs, Delta, the model load) takes minutes on
    # two busy cores; a job that dies fails at once through the poll below.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        assert process.poll() is None, f"the job ended (exit {process.returncode}) before {what}"
        time.sleep(0.02)
    raise TimeoutError(f"timed out waiting for {what}")


def test_summarize_job_runs_on_the_cluster_executors(spark, cluster, home):
    result = summarize(cluster, home)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"{SAMPLE_TICKETS} tickets summarized with support_dolly v1" in result.stdout
    # The master ran the application on its workers' executors.
    apps = cluster.status()["completedapps"]
    assert [app["name"] for app in apps] == ["summarize_tickets.py"], apps
    output = result.stdout + result.stderr
    assert "starting a local Spark session" not in output
    assert f"using the Spark master {cluster.url} from spark-submit" in output
    # Spark's console output stays at WARN: the job's own progress lines are what a user reads.
    assert not re.search(r"^\d\d/\d\d/\d\d \d\d:\d\d:\d\d INFO ", result.stderr, re.M), result.stderr[:3000]

    summaries = one_row_per_ticket(spark, home, "ticket_summaries")
    assert sum(1 for text in summaries.values() if text) >= SAMPLE_TICKETS - 1
    # Files came once to each node that ran tasks, into its own local disk; each executor
    # Python worker loaded the model once (a pid loading twice would appear twice).
    downloads = {cache: len(list(cache.glob("*/downloads.log"))) for cache in node_caches(cluster)}
    assert downloads and all(count == 1 for count in downloads.values()), downloads
    assert all(len((ledger).read_text().splitlines()) == 1 for cache in downloads for ledger in cache.glob("*/downloads.log"))
    loads = set(executor_loads(cluster))  # an executor's log may repeat a line: each load is numbered
    load_pids = [re.search(r"pid (\d+), load \d+ of this process\)$", line)[1] for line in loads]
    assert load_pids and all(line.endswith(", load 1 of this process)") for line in loads), loads
    assert len(load_pids) == len(set(load_pids)), loads
    assert not (home / "model_cache").exists() or not any((home / "model_cache").iterdir())


def test_run_survives_a_killed_executor(spark, cluster, home, tmp_path):
    log = tmp_path / "job.log"
    command = " ".join([SUMMARIZE.format(master=cluster.url), "--target-table", "summaries_executor_loss",
                        "--chunk-rows", "10"])
    with background_command(command, home, log) as job:
        first_merge = home / "warehouse" / "summaries_executor_loss" / "_delta_log" / "00000000000000000001.json"
        wait_for(first_merge.exists, "the first chunk was merged", job)
        executors = cluster.executor_pids()
        assert len(executors) == 2, executors
        os.kill(executors[0], signal.SIGKILL)
        assert job.wait(timeout=600) == 0, log.read_text()[-4000:]
    output = log.read_text()
    assert f"{SAMPLE_TICKETS} tickets summarized" in output
    assert re.search(r"Lost executor|Executor lost|removed executor|Removing executor", output, re.I), output[-3000:]
    assert executors[0] not in cluster.executor_pids()
    one_row_per_ticket(spark, home, "summaries_executor_loss")


def test_killed_python_worker_is_retried_with_the_same_greedy_answers(spark, cluster, home, tmp_path):
    loads_before = set(executor_loads(cluster))
    log = tmp_path / "job.log"
    command = " ".join([SUMMARIZE.format(master=cluster.url), "--target-table", "summaries_worker_kill"])
    with background_command(command, home, log) as job:
        # A worker prints its load to the executor's log, then starts generating its first batch: kill it there.
        wait_for(lambda: set(executor_loads(cluster)) - loads_before, "a Python worker loaded the model", job)
        (first_load, *_) = set(executor_loads(cluster)) - loads_before
        os.kill(int(re.search(r"pid (\d+), load", first_load)[1]), signal.SIGKILL)
        assert job.wait(timeout=600) == 0, log.read_text()[-4000:]
    output = log.read_text()
    assert re.search(r"Lost task .*Python worker exited unexpectedly|Lost task .*crashed", output, re.S), output[-3000:]
    disturbed = one_row_per_ticket(spark, home, "summaries_worker_kill")
    undisturbed = one_row_per_ticket(spark, home, "ticket_summaries")
    assert disturbed == undisturbed


def test_shared_model_dir_keeps_executors_off_the_registry(spark, cluster, home, tmp_path):
    shared = tmp_path / "volume"
    caches_before = {path for cache in node_caches(cluster) for path in cache.iterdir()}
    loads_before = set(executor_loads(cluster))
    result = summarize(cluster, home, "--target-table", "summaries_shared", "--shared-model-dir", str(shared))
    assert result.returncode == 0, result.stderr[-4000:]
    one_row_per_ticket(spark, home, "summaries_shared")
    # The driver downloaded once into the shared directory ...
    downloads = [line for ledger in shared.glob("*/downloads.log") for line in ledger.read_text().splitlines()]
    assert len(downloads) == 1, downloads
    # ... and the executors loaded from it, downloading nothing to their nodes.
    new_entries = {path for cache in node_caches(cluster) for path in cache.iterdir()} - caches_before
    assert not any((entry / "downloads.log").exists() for entry in new_entries if entry.is_dir())
    assert not any((entry / "files").exists() for entry in new_entries if entry.is_dir())
    assert set(executor_loads(cluster)) - loads_before, "no executor loaded the model"
