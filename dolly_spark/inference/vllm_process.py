"""vLLM's engine process and memory: a process of its own that dies with the Python worker that
started it, and a CPU KV cache sized from the model.

vLLM starts its engine core with ``multiprocessing``, and that starts vLLM's model worker:
forked on a GPU whose CUDA has not started in the parent (``devices.make_only_visible_gpu``
ensures it), spawned on a CPU. A Spark task that is killed takes its Python worker with it, and
engine processes left behind would hold the executor's memory: each asks Linux to kill it when
the thread that started it ends (``PR_SET_PDEATHSIG``). A forked child does so from a fork
handler; a spawned one when it imports this module, which it does to unpickle the engine's
logits processor (``vllm_repetition``), with ``DIE_WITH_PARENT`` in the environment it inherited.
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

# In the environment of the processes an engine starts: they end when their parent does.
DIE_WITH_PARENT = "DOLLY_SPARK_DIE_WITH_PARENT"

_starting_engine = False


def _die_with_parent() -> None:
    """End this process when the thread that started it ends, or now if that has happened."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before the signal was asked for
        os._exit(1)


def _die_with_parent_if_forked_for_an_engine() -> None:
    if _starting_engine:
        _die_with_parent()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_die_with_parent_if_forked_for_an_engine)
if os.environ.get(DIE_WITH_PARENT) == "1":  # a process spawned by an engine's start (or by one of those)
    _die_with_parent()


@contextlib.contextmanager
def dying_with_this_process() -> Iterator[None]:
    """Within the block, the processes started here (vLLM's engine core, and through it its
    model worker) are killed when this thread ends, however it ends; processes started at other
    times are left alone."""
    global _starting_engine
    _starting_engine = True
    os.environ[DIE_WITH_PARENT] = "1"
    try:
        yield
    finally:
        _starting_engine = False
        os.environ.pop(DIE_WITH_PARENT, None)


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
