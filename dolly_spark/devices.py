"""Which device and dtype a model runs on."""
from __future__ import annotations

import torch


def select_device(gpu_index: int | None = None) -> torch.device:
    """The CUDA device ``gpu_index`` (the first when None) if CUDA is available, else the CPU."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", gpu_index if gpu_index is not None else 0)


def select_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on the CPU."""
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def is_out_of_memory(exc: BaseException) -> bool:
    """True for a GPU out-of-memory error, however the backend spells it."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()
