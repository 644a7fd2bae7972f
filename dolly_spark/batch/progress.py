"""Progress of a long run, chunk by chunk: a log line and MLflow metrics with ``step`` = chunk."""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import mlflow

log = logging.getLogger(__name__)


@dataclass
class ChunkProgress:
    """Rows done out of ``total``, the rate since the run's first chunk started, and the time left
    at that rate."""

    total: int
    chunks: int
    done: int = 0
    started: float = field(default_factory=time.perf_counter)

    def chunk_done(self, step: int, rows: int, detail: str = "") -> None:
        """Record that chunk ``step`` (0-based) finished ``rows`` rows: a log line, and metrics in
        the active MLflow run."""
        self.done += rows
        elapsed = max(time.perf_counter() - self.started, 1e-9)
        rate = self.done / elapsed
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        metrics = {"rows_done": float(self.done), "rows_total": float(self.total), "rows_per_second": rate,
                   "eta_seconds": eta, "chunks_done": float(step + 1)}
        if mlflow.active_run() is not None:
            mlflow.log_metrics(metrics, step=step)
        log.info("chunk %d/%d done: %d/%d rows (%.0f%%), %.1f rows/s, about %s left%s", step + 1, self.chunks,
                 self.done, self.total, 100.0 * self.done / max(self.total, 1), rate, _duration(eta),
                 f"; {detail}" if detail else "")


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
