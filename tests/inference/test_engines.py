"""The engine registry: names, and what "auto" resolves to where the model loads."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from dolly_spark.inference.engines import EngineConfig, engine_class, resolve_engine


def test_auto_is_vllm_only_on_a_cuda_device_with_vllm_installed(monkeypatch):
    assert resolve_engine("auto") == "hf"  # this machine: no CUDA device
    # A GPU executor (no GPU here: its presence is what is stood in for).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_engine("auto") == "vllm"  # vLLM is installed here
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "vllm" else real_find_spec(name, *args))
    assert resolve_engine("auto") == "hf"  # a GPU executor without vLLM
    assert (resolve_engine("hf"), resolve_engine("vllm")) == ("hf", "vllm")


def test_engines_by_name():
    assert engine_class("hf").__name__ == "InstructionEngine"
    assert engine_class("vllm").__name__ == "VllmEngine"
    assert EngineConfig().engine == "auto"
    with pytest.raises(ValueError, match="engine must be one of auto, hf, vllm, not 'tgi'"):
        EngineConfig(engine="tgi")
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        EngineConfig(gpu_memory_utilization=1.5)


def test_the_vllm_engine_sees_only_the_tasks_gpu(monkeypatch):
    """vLLM runs on the first visible GPU, so the task's address becomes the only visible one
    (an index into what the executor sees), unless CUDA has started in the process already.
    CUDA's state is stood in for: there is no GPU here."""
    from dolly_spark.inference.vllm_engine import _only_visible_gpu

    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    # Set before it is deleted, so the undo at the end removes what the calls below set even where
    # the variable was unset (a delenv of an unset variable records nothing to undo).
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    _only_visible_gpu(3)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    _only_visible_gpu(1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.warns(UserWarning, match="not necessarily the task's GPU 2"):
        _only_visible_gpu(2)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
