"""vLLM's engine process and memory: a process of its own that dies with the Python worker that
started it, and a CPU KV cache sized from the model.

vLLM starts its engine core with ``multiprocessing`` (forked when CUDA has not started in the
parent, as ``devices.make_only_visible_gpu`` ensures). A Spark task that is killed takes its
Python worker with it, and an engine process left behind would hold the executor's GPU memory:
the child asks Linux to kill it when the thread that forked it ends (``PR_SET_PDEATHSIG``).
"""
from __future__ import annotations

import contextlib
import ctypes
import math
import os
import signal
from typing import Any, Iterator

# prctl's option number for "send me this signal when my parent dies" (linux/prctl.h).
PR_SET_PDEATHSIG = 1
# Full-length rows the CPU KV cache holds at once: vLLM refuses to start unless one fits, and
# rows shorter than the window share the rest.
KV_CACHE_WINDOWS = 2
GIB = 1024 ** 3

_forking_engine = False


def _die_with_parent() -> None:
    """In a child forked while an engine starts: end when the forking thread ends."""
    if _forking_engine:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_die_with_parent)


@contextlib.contextmanager
def dying_with_this_process() -> Iterator[None]:
    """Within the block, processes forked here (vLLM's engine core) are killed when this thread
    ends, however it ends; forks at other times are left alone. Forking is asked of vLLM."""
    global _forking_engine
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "fork")
    _forking_engine = True
    try:
        yield
    finally:
        _forking_engine = False


def cpu_kv_cache_gib(model_config: Any, window: int, dtype: Any) -> int:
    """GiB of KV cache for vLLM on a CPU: keys and values of every layer for ``KV_CACHE_WINDOWS``
    rows of the whole context window, at least 1 (dolly-v2-3b in fp32: 1.25 GiB a window)."""
    layers = getattr(model_config, "num_hidden_layers")
    heads = getattr(model_config, "num_attention_heads")
    kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
    element = 2 if str(dtype) in ("torch.bfloat16", "torch.float16") else 4
    per_token = 2 * layers * kv_heads * head_dim * element
    return max(1, math.ceil(per_token * window * KV_CACHE_WINDOWS / GIB))
