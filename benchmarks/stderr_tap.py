"""Model loads in Spark's Python workers, counted from the lines they print.

Each load prints one line to the loading process's stderr (``dolly_spark: loaded <name> version
<version> with engine ... (host ..., pid ...)``, see ``dolly_spark.lifecycle.loader``). A Python
worker's stderr goes to the JVM, which copies it to its own stderr; the JVM is a child of this
process and inherits this process's file descriptor 2 when it starts. So a tap on descriptor 2,
set before the Spark session starts, sees every worker's load lines.

``StderrTap`` routes descriptor 2 through a pipe: a thread forwards everything to the original
stderr unchanged and keeps the lines that start with a given prefix. ``worker_stderr_reaches``
checks, once per session, that a line a worker prints arrives here; where it does not (a
cluster, a session started before the tap), counts would be zero for the wrong reason, so the
benchmark reports none.
"""
from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from typing import Callable

# Every line the package prints to stderr starts so; the tap keeps those.
PACKAGE_PREFIX = "dolly_spark: "
LOAD_PREFIX = PACKAGE_PREFIX + "loaded "


class StderrTap:
    """This process's descriptor 2 through a pipe; lines starting with ``prefix`` are kept.

    Use as a context manager, or ``start``/``close``. Between them, anything this process and
    the children it starts write to descriptor 2 reaches the original stderr through a thread.
    """

    def __init__(self, prefix: str = PACKAGE_PREFIX):
        self.prefix = prefix.encode()
        self.lines: list[str] = []
        self._last_arrival = 0.0
        self._lock = threading.Lock()
        self._original: int | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> "StderrTap":
        sys.stderr.flush()
        read_end, write_end = os.pipe()
        self._original = os.dup(2)
        os.dup2(write_end, 2)
        os.close(write_end)
        self._thread = threading.Thread(target=self._forward, args=(read_end, self._original),
                                        name="stderr-tap", daemon=True)
        self._thread.start()
        return self

    def close(self, drain_seconds: float = 1.0) -> None:
        """Give descriptor 2 back to the original stderr. Children started under the tap (the
        JVM) keep writing into the pipe, which the thread forwards while this process lives."""
        if self._original is None:
            return
        sys.stderr.flush()
        self.settle(quiet=0.2, limit=drain_seconds)
        os.dup2(self._original, 2)
        self._original = None

    def __enter__(self) -> "StderrTap":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def active(self) -> bool:
        return self._original is not None

    def _forward(self, read_end: int, original: int) -> None:
        pending = b""
        while True:
            try:
                chunk = os.read(read_end, 65536)
            except OSError:
                return
            if not chunk:
                return
            try:
                os.write(original, chunk)
            except OSError:
                pass  # the original stderr is gone; keep draining so no writer blocks on a full pipe
            *complete, pending = (pending + chunk).split(b"\n")
            kept = [line.decode("utf-8", "replace").rstrip("\r") for line in complete if line.startswith(self.prefix)]
            with self._lock:
                self.lines.extend(kept)
                self._last_arrival = time.monotonic()

    def settle(self, quiet: float = 0.5, limit: float = 5.0) -> None:
        """Wait until nothing has arrived for ``quiet`` seconds (counted from this call at the
        earliest, so a line still on its way through the JVM gets there), or ``limit`` seconds."""
        called = time.monotonic()
        deadline = called + limit
        while True:
            with self._lock:
                last = max(self._last_arrival, called)
            now = time.monotonic()
            if now - last >= quiet or now >= deadline:
                return
            time.sleep(min(0.05, quiet))

    def count(self, prefix: str) -> int:
        """Distinct kept lines starting with ``prefix`` so far, after the pipe settles. A load
        line names its host, its process and the process's load number, so a line repeated on
        its way here is not counted as another load."""
        self.settle()
        with self._lock:
            return len({line for line in self.lines if line.startswith(prefix)})

    def counter(self, prefix: str) -> Callable[[], int]:
        return lambda: self.count(prefix)

    def take(self, text: str) -> bool:
        """Whether a kept line holds ``text``; such lines are dropped."""
        with self._lock:
            found = [line for line in self.lines if text in line]
            self.lines[:] = [line for line in self.lines if text not in line]
        return bool(found)


def load_prefix(name: str, version: str) -> str:
    """The start of the line a load of model ``name`` version ``version`` prints."""
    return f"{LOAD_PREFIX}{name} version {version} "


def worker_stderr_reaches(spark, tap: StderrTap, partitions: int = 2) -> bool:
    """Whether a line Spark's Python workers print to stderr reaches ``tap``: each of
    ``partitions`` tasks prints a marker line that starts with the tap's prefix."""
    import pandas as pd

    marker = f"{tap.prefix.decode()}stderr check {uuid.uuid4().hex}"

    def say(batches):
        import sys as worker_sys

        for batch in batches:
            print(marker, file=worker_sys.stderr, flush=True)
            yield pd.DataFrame({"id": batch["id"]})

    spark.range(0, partitions, 1, numPartitions=partitions).mapInPandas(say, "id long").collect()
    tap.settle(quiet=0.5, limit=5.0)
    return tap.take(marker)
