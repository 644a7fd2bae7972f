"""Spark's Python worker daemon, with torch and transformers imported before it forks workers.

An executor starts one daemon (``spark.python.daemon.module``) and forks a Python worker from it
whenever a task needs one and no idle worker is left. Spark's own daemon imports next to nothing,
so every worker imported torch and transformers itself before it could load a model: about 4
CPU-seconds per worker here, paid again for each concurrent task, each executor and each job.
This daemon imports them once; the workers it forks share those pages and start at the model load.

Importing them starts no thread that a fork would lose (numpy's OpenBLAS pool re-creates itself in
the child), and it touches no GPU: CUDA is first initialized inside a worker, after the fork.
"""
from __future__ import annotations

import contextlib
import sys

# What every engine's worker imports before its model loads: torch, transformers and the hf
# engine. vLLM is left to the workers that use it: its import starts threads.
PRELOADED = ("dolly_spark.inference.engine",)


def preload() -> None:
    """Import ``PRELOADED``; a module that fails to import is reported on stderr and left to the
    worker that needs it, where the failure reaches the task's error."""
    for module in PRELOADED:
        # The daemon tells the executor its port on stdout: nothing else may be written there.
        with contextlib.redirect_stdout(sys.stderr):
            try:
                __import__(module)
            except Exception as error:  # noqa: BLE001 - any failure: the worker imports it again
                print(f"dolly_spark: the Python daemon could not import {module}: {error!r}", file=sys.stderr)


if __name__ == "__main__":
    preload()
    from pyspark.daemon import manager

    manager()
