"""The machine's measured limits: matmul peak (the denominator of MFU) and weight-read bandwidth.

A datasheet figure means little on a shared, virtualised CPU, so both are measured, with torch,
in each precision the run uses and in the thread layouts the variants run in:

- ``1_thread``: one process with one thread (one Spark Python worker: Spark sets
  OMP_NUM_THREADS to spark.task.cpus, 1, in each worker), for reference;
- ``workers``: two processes with one thread each, at the same time (the two workers of
  local[2]; their sum is what apply_instruction can reach, and it differs from 2 x the
  single-thread figure when the cores share caches, memory bandwidth or turbo headroom);
- ``driver``: one process with all the threads torch uses by default (the bare engine).

The peak: ``size`` x ``size`` matmuls (smaller in a precision the CPU multiplies slowly, such
as bf16 without matrix units, so the measurement stays short). The bandwidth: how fast a decoding step can read weights,
measured two ways over a weight matrix far larger than any cache (``BANDWIDTH_MIB`` per process):
a one-row ``linear`` (a matrix-vector product, what a decoding step does with one row per
weight matrix) and a plain sum of the matrix. The faster of the two is the layout's bandwidth;
both are reported, since a slow matrix-vector kernel in one precision is a software limit, not
the memory's.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import platform
import time
from typing import Any, Callable, Sequence

BANDWIDTH_MIB = 256
READ_METHODS = ("matvec", "sum")
WORKERS, DRIVER, SINGLE = "workers", "driver", "1_thread"


def _dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]


def _rate(step: Callable[[], Any], work: float, seconds: float, barrier: Any) -> float:
    """``work`` units per second of ``step``, over about ``seconds`` after two warm-up calls (they
    pick kernels and fault in the pages); ``barrier`` starts concurrent measurements together."""
    for _ in range(2):
        step()
    if barrier is not None:
        barrier.wait()
    iterations, started = 0, time.perf_counter()
    while True:
        step()
        iterations += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return work * iterations / elapsed


def matmul_flops(size: int = 2048, threads: int = 1, seconds: float = 2.0, barrier: Any = None,
                 precision: str = "fp32") -> tuple[float, int]:
    """Measured FLOP/s of square matmuls in ``precision`` on ``threads`` threads, and their size:
    ``size``, or less where one call would take over a quarter of ``seconds`` (a CPU without
    bf16 matrix units multiplies bf16 a hundred times slower than fp32)."""
    import torch

    torch.set_num_threads(threads)
    dtype = _dtype(precision)
    used = 256
    while used < size:
        a = torch.randn(used, used).to(dtype)
        started = time.perf_counter()
        torch.matmul(a, a)
        if 8 * (time.perf_counter() - started) > seconds / 4:  # doubling the size costs 8 times the time
            break
        used *= 2
    a, b = torch.randn(used, used).to(dtype), torch.randn(used, used).to(dtype)
    out = torch.empty(used, used, dtype=dtype)
    return _rate(lambda: torch.matmul(a, b, out=out), 2.0 * used**3, seconds, barrier), used


def read_bandwidth(method: str, threads: int = 1, seconds: float = 1.0, barrier: Any = None,
                   precision: str = "fp32", mebibytes: int = BANDWIDTH_MIB) -> float:
    """Measured bytes/s read from a ``mebibytes`` weight matrix in ``precision``: ``matvec``
    (``linear`` of one row, as a decoding step) or ``sum``."""
    import torch

    torch.set_num_threads(threads)
    dtype = _dtype(precision)
    columns = 4096
    element = torch.empty((), dtype=dtype).element_size()
    rows = mebibytes * 2**20 // (columns * element)
    weight = torch.full((rows, columns), 0.5, dtype=dtype)  # filled, so every page is resident
    x = torch.full((1, columns), 0.5, dtype=dtype)
    step = {"matvec": lambda: torch.nn.functional.linear(x, weight), "sum": weight.sum}[method]
    return _rate(step, float(weight.numel() * element), seconds, barrier)


def layout_figures(threads: int, precisions: Sequence[str], size: int = 2048, seconds: float = 2.0,
                   bandwidth_seconds: float = 1.0, barrier: Any = None) -> dict[str, dict[str, float]]:
    """One process's figures on ``threads`` threads: per precision, ``peak_flops`` and the
    read bandwidth of each method (bytes/s), and the matmul size the peak was measured at."""
    figures = {}
    for precision in precisions:
        peak, used = matmul_flops(size, threads, seconds, barrier, precision)
        figures[precision] = {"peak_flops": peak, "matmul_size": used}
        for method in READ_METHODS:
            figures[precision][method] = read_bandwidth(method, threads, bandwidth_seconds, barrier, precision)
    return figures


def _worker(precisions: Sequence[str], size: int, seconds: float, bandwidth_seconds: float, barrier: Any,
            results: Any) -> None:
    results.put(layout_figures(1, precisions, size, seconds, bandwidth_seconds, barrier))


def concurrent_single_thread(processes: int, precisions: Sequence[str], size: int = 2048, seconds: float = 2.0,
                             bandwidth_seconds: float = 1.0) -> list[dict[str, dict[str, float]]]:
    """``layout_figures`` of each of ``processes`` single-threaded processes measuring at the
    same time (each measurement starts together in all of them)."""
    context = mp.get_context("spawn")  # a fresh interpreter, like a Spark worker, not a fork of our torch state
    barrier = context.Barrier(processes)
    results = context.Queue()
    workers = [context.Process(target=_worker, args=(precisions, size, seconds, bandwidth_seconds, barrier, results))
               for _ in range(processes)]
    for worker in workers:
        worker.start()
    figures = [results.get(timeout=300) for _ in workers]
    for worker in workers:
        worker.join()
    return figures


def combine(each: Sequence[dict[str, dict[str, float]]]) -> dict[str, dict[str, Any]]:
    """The roofs of one layout from the figures of its processes (one or more, measured at once):
    per precision, the summed peak and read rates, ``bandwidth`` the faster read method, and,
    for several processes, each one's figures."""
    roofs: dict[str, dict[str, Any]] = {}
    for precision in each[0]:
        total = {key: sum(figures[precision][key] for figures in each) for key in ("peak_flops", *READ_METHODS)}
        roof = {"peak_flops": total["peak_flops"], "bandwidth": max(total[m] for m in READ_METHODS),
                **{f"bandwidth_{m}": total[m] for m in READ_METHODS},
                "matmul_size": min(figures[precision]["matmul_size"] for figures in each)}
        if len(each) > 1:
            roof["each"] = [figures[precision] for figures in each]
        roofs[precision] = roof
    return roofs


def measure_machine(size: int = 2048, seconds: float = 2.0, bandwidth_seconds: float = 1.0,
                    worker_precisions: Sequence[str] = ("fp32",)) -> dict[str, Any]:
    """The machine description and its roofs: ``roofs[precision][layout]`` holds ``peak_flops``
    (FLOP/s) and ``bandwidth`` (bytes/s). fp32 is measured in every layout, the other
    ``worker_precisions`` in the workers' layout only (the precisions apply_instruction runs in)."""
    import torch

    default_threads = torch.get_num_threads()
    layouts = {
        SINGLE: combine([layout_figures(1, ["fp32"], size, seconds, bandwidth_seconds)]),
        WORKERS: combine(concurrent_single_thread(2, list(dict.fromkeys(["fp32", *worker_precisions])), size,
                                                  seconds, bandwidth_seconds)),
        DRIVER: combine([layout_figures(default_threads, ["fp32"], size, seconds, bandwidth_seconds)]),
    }
    torch.set_num_threads(default_threads)
    roofs: dict[str, dict[str, Any]] = {}
    for layout, by_precision in layouts.items():
        for precision, roof in by_precision.items():
            roofs.setdefault(precision, {})[layout] = roof
    fp32 = roofs["fp32"]
    return {
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_driver": default_threads,
        "matmul_size": size,
        "bandwidth_mib": BANDWIDTH_MIB,
        "roofs": roofs,
        # The fp32 peaks under their earlier names, for readers of older reports.
        "peak_flops_1_thread": fp32[SINGLE]["peak_flops"],
        "peak_flops_2_workers_x_1_thread": fp32[WORKERS]["peak_flops"],
        "peak_flops_2_workers_each": [each["peak_flops"] for each in fp32[WORKERS]["each"]],
        "peak_flops_driver_threads": fp32[DRIVER]["peak_flops"],
    }


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
