"""Which device and dtype a model runs on."""
from __future__ import annotations

import contextlib
import functools
import os
import sys
from typing import ContextManager

import torch


def select_device(gpu_index: int | None = None) -> torch.device:
    """The CUDA device ``gpu_index`` (the first when None) if CUDA is available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", gpu_index if gpu_index is not None else 0)


def make_only_visible_gpu(gpu_index: int) -> None:
    """Make the task's GPU the only one this process sees, for an engine that runs on the first
    visible one (vLLM). CUDA reads the setting when it starts, so this must come before any CUDA
    call of the process; where CUDA has started already (a Python worker that ran the "hf"
    engine on a GPU), it cannot change, which is said on stderr (the executor's log)."""
    # From here on, asking whether CUDA is available does not start it (PyTorch asks NVML).
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if torch.cuda.is_initialized() and visible != str(gpu_index):
        sys.stderr.write(f"dolly_spark: WARNING CUDA is already started in this process (pid {os.getpid()}), so "
                         f"vLLM runs on its first visible GPU, not necessarily the task's GPU {gpu_index}; run one "
                         "engine per cluster, or restart the executor's Python workers\n")
        return
    # The task's address is an index into the devices visible to the executor.
    devices = visible.split(",") if visible else None
    os.environ["CUDA_VISIBLE_DEVICES"] = devices[gpu_index] if devices and gpu_index < len(devices) else str(gpu_index)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """The torch dtype called ``name``, or a ValueError listing the choices."""
    if name not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {name!r}")
    return DTYPES[name]


def select_dtype(device: torch.device, requested: str | None = None) -> torch.dtype:
    """``requested`` ("float32", "bfloat16" or "float16") when given; otherwise bf16 on GPUs
    that support it, fp16 on older GPUs; on a CPU, bf16 where it multiplies bf16 matrices
    natively (AMX), fp32 elsewhere."""
    if requested is not None:
        return parse_dtype(requested)
    if device.type != "cuda":
        return torch.bfloat16 if native_bf16_matmul() else torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


@functools.lru_cache(maxsize=None)
def native_bf16_matmul() -> bool:
    """True on a CPU with AMX's bf16 tiles (the ``amx_bf16`` flag). There bf16 matmuls ran about
    twice as fast as fp32 and answered as well (benchmarks/README.md, "Precision"); without AMX,
    AVX-512 bf16 instructions or none, bf16 runs no faster than fp32 or much slower."""
    return "amx_bf16" in cpu_flags()


CPUINFO = "/proc/cpuinfo"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags as Linux reports them in ``cpuinfo`` (``CPUINFO`` when None);
    empty where it does not."""
    try:
        with open(cpuinfo or CPUINFO, encoding="utf-8") as info:
            for line in info:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a GPU out-of-memory error, however the backend spells it."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def variable_shape_attention(device: torch.device) -> ContextManager:
    """On a GPU, SDPA without the cuDNN backend for the duration of the block. The engine's
    attention shapes change with every micro-batch and every decoding step (the ragged
    attention reads a growing slice of the cache), and cuDNN builds an execution plan for each
    new shape: profiled on an H100, most of a first pass over 24 rows went into those plans.
    Flash and memory-efficient attention need no per-shape plan. Elsewhere, nothing changes."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])
