"""The machine's measured fp32 matmul peak, the denominator of model FLOP utilization (MFU).

A datasheet peak means little on a shared, virtualised CPU, so the peak is measured: torch fp32
matmuls of ``size`` x ``size``, in the thread layouts the variants run in:

- one process with one thread (one Spark Python worker: Spark sets OMP_NUM_THREADS to
  spark.task.cpus, 1, in each worker),
- two processes with one thread each, at the same time (the two workers of local[2]; their sum
  is the peak apply_instruction can reach, and it differs from 2 x the single-thread figure when
  the cores share caches, memory bandwidth or turbo headroom),
- one process with all the threads torch uses by default (the bare engine in the driver).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import platform
import time
from typing import Any


def matmul_flops(size: int = 2048, threads: int = 1, seconds: float = 2.0, barrier: Any = None) -> float:
    """Measured fp32 FLOP/s of ``size`` x ``size`` matmuls on ``threads`` threads, over about
    ``seconds`` after a warm-up; ``barrier`` (a multiprocessing.Barrier) starts concurrent
    measurements together."""
    import torch

    torch.set_num_threads(threads)
    a = torch.randn(size, size, dtype=torch.float32)
    b = torch.randn(size, size, dtype=torch.float32)
    out = torch.empty(size, size, dtype=torch.float32)
    for _ in range(2):  # the first calls pick kernels and fault in the pages
        torch.matmul(a, b, out=out)
    if barrier is not None:
        barrier.wait()
    iterations, started = 0, time.perf_counter()
    while True:
        torch.matmul(a, b, out=out)
        iterations += 1
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return 2.0 * size**3 * iterations / elapsed


def _worker(size: int, seconds: float, barrier: Any, results: Any) -> None:
    results.put(matmul_flops(size, 1, seconds, barrier))


def concurrent_single_thread_flops(processes: int = 2, size: int = 2048, seconds: float = 2.0) -> list[float]:
    """FLOP/s of each of ``processes`` single-threaded processes measuring at the same time."""
    context = mp.get_context("spawn")  # a fresh interpreter, like a Spark worker, not a fork of our torch state
    barrier = context.Barrier(processes)
    results = context.Queue()
    workers = [context.Process(target=_worker, args=(size, seconds, barrier, results)) for _ in range(processes)]
    for worker in workers:
        worker.start()
    rates = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join()
    return rates


def measure_machine(size: int = 2048, seconds: float = 2.0) -> dict[str, Any]:
    """The machine description and its matmul peaks (FLOP/s) in each thread layout."""
    import torch

    default_threads = torch.get_num_threads()
    single = matmul_flops(size, 1, seconds)
    pair = concurrent_single_thread_flops(2, size, seconds)
    driver = matmul_flops(size, default_threads, seconds)
    torch.set_num_threads(default_threads)
    return {
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_driver": default_threads,
        "matmul_size": size,
        "peak_flops_1_thread": single,
        "peak_flops_2_workers_x_1_thread": sum(pair),
        "peak_flops_2_workers_each": pair,
        "peak_flops_driver_threads": driver,
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
