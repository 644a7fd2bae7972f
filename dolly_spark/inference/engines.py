"""The engine seam: how rows are run (``EngineConfig``), what an engine does (``Engine.run``),
and the registry of named engines.

An engine turns rows and a ``Request`` into one ``InstructionResult`` per row, in order, and
never raises for a row's own problem (those become error results). Engines are registered by
name with the module and class that implement them, imported only when asked for, so a machine
without an engine's packages never imports them. A new engine is one module plus one line in
``ENGINES``.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, Sequence

from dolly_spark.request import Request

STRATEGIES = ("static", "continuous")
# name -> "module:class" of a class that implements ``Engine``.
ENGINES = {
    "hf": "dolly_spark.inference.engine:InstructionEngine",
    "vllm": "dolly_spark.inference.vllm_engine:VllmEngine",
}
# Not an engine: which one runs is decided where the model loads (``resolve_engine``).
AUTO = "auto"
ENGINE_CHOICES = (AUTO, *ENGINES)


@dataclass(frozen=True)
class EngineConfig:
    """How rows are run; never what they answer, so none of it enters a request's fingerprint.

    ``engine`` names an entry of ``ENGINES``, or is "auto": vLLM where the model loads on a
    CUDA device and vLLM is installed, the "hf" engine otherwise (``resolve_engine``; decided on
    each executor, whose GPUs the driver may not have). ``token_budget`` bounds each
    micro-batch: rows × (longest prompt + max_new_tokens), the tokens its KV cache holds at the
    end; a row over it runs alone (it never cuts or refuses a row: that is the request's and the
    model's to say). ``max_batch_rows`` caps a micro-batch's rows. Within a micro-batch,
    prompts are prefilled in groups of similar length: a row shorter than ``min_length_ratio``
    of its group's longest prompt starts a new group (0 prefills the micro-batch as one group).
    ``strategy``: "static" (the preallocated cache) or "continuous" (transformers'
    ``generate_batch``, greedy only). ``reuse_prefix``: the prompt tokens every row of a
    micro-batch shares are prefilled once. ``dtype`` overrides the device's default precision.
    The "vllm" engine takes ``max_batch_rows`` as its most concurrent rows, ``token_budget`` as
    its most tokens per scheduler step, and ``gpu_memory_utilization`` as the share of the GPU's
    memory it may hold (weights and KV cache); it batches continuously, whatever ``strategy``.
    """

    engine: str = AUTO
    token_budget: int = 16384
    max_batch_rows: int = 64
    min_length_ratio: float = 0.75
    strategy: str = "static"
    reuse_prefix: bool = True
    dtype: str | None = None
    gpu_memory_utilization: float = 0.85

    def __post_init__(self):
        if self.engine not in ENGINE_CHOICES:
            raise ValueError(f"engine must be one of {', '.join(ENGINE_CHOICES)}, not {self.engine!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], not {self.gpu_memory_utilization}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, not {self.strategy!r}")
        if self.token_budget < 2 or self.max_batch_rows < 1:
            raise ValueError(f"need token_budget >= 2 and max_batch_rows >= 1; got {self.token_budget} and "
                             f"{self.max_batch_rows}")


class Rows(NamedTuple):
    """The rows of one call: an instruction each (None or blank gets an error), and optionally
    an input (context) and a key (a sampling row's seed derives from it) each."""

    instructions: Sequence[str | None]
    contexts: Sequence[str | None] | None = None
    keys: Sequence[Any] | None = None


class Engine(Protocol):
    """What an engine is: loaded from files by the lifecycle layer (once per Python worker), run
    by the Spark layer and the jobs."""

    device: Any  # where it runs, for logs

    @classmethod
    def from_pretrained(cls, model_path: str, tokenizer_path: str | None, prompt_format: str | None,
                        config: EngineConfig, gpu_index: int | None) -> "Engine": ...

    def with_config(self, config: EngineConfig) -> "Engine":
        """An engine on the same loaded model under another configuration of the same dtype."""

    def run(self, rows: Rows, request: Request) -> list:
        """One ``InstructionResult`` per row, in order; raises only for what is not a row's own
        problem, so the Spark task fails and is retried."""


def resolve_engine(name: str) -> str:
    """The engine "auto" stands for here: "vllm" when this process sees a CUDA device and can
    import vLLM (on GPUs vLLM is many times faster), "hf" otherwise (on CPUs ours loads in
    seconds and gives the same answers; benchmarks/README.md compares their speed there). Any
    other name is itself."""
    if name != AUTO:
        return name
    return "vllm" if cuda_device_visible() and importlib.util.find_spec("vllm") is not None else "hf"


def cuda_device_visible() -> bool:
    """Whether this process sees a CUDA device, asked of NVML, not of CUDA: starting CUDA here
    would fix the visible devices before the vllm engine makes the task's GPU the only one
    (``devices.make_only_visible_gpu``)."""
    import os

    import torch

    os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")
    return torch.cuda.is_available()


def engine_class(name: str) -> Any:
    """The class registered as engine ``name`` ("auto" resolved here), imported now."""
    name = resolve_engine(name)
    if name not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINE_CHOICES)}, not {name!r}")
    module, attribute = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), attribute)
