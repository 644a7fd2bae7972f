"""The engine registry: names, and what "auto" resolves to where the model loads."""
from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from dolly_spark.inference.devices import make_only_visible_gpu
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


def test_the_vllm_engine_sees_only_the_tasks_gpu(monkeypatch, capfd):
    """vLLM runs on the first visible GPU, so the task's address becomes the only visible one
    (an index into what the executor sees), unless CUDA has started in the process already.
    CUDA's state is stood in for: there is no GPU here."""
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    # Set before it is deleted, so the undo at the end removes what the calls below set even where
    # the variable was unset (a delenv of an unset variable records nothing to undo).
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "")  # undone at the end, as the package sets it
    make_only_visible_gpu(3)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6")
    make_only_visible_gpu(1)
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    make_only_visible_gpu(2)
    assert "not necessarily the task's GPU 2" in capfd.readouterr().err
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "5"


class VllmStoppedHere(RuntimeError):
    """Where the stand-in for vLLM ends a load: a driver too old for the GPU, say."""


@pytest.mark.parametrize("engine", ["vllm", "auto"])
def test_the_tasks_gpu_is_the_only_visible_one_before_anything_asks_cuda(engine, tiny_model_dir, monkeypatch,
                                                                           capfd):
    """On every path that runs vLLM, CUDA is first asked after the task's GPU (address 1 of the
    executor's 0,1) became the only visible one. A GPU executor is stood in for (no GPU here):
    each CUDA query records what was visible, and vLLM's load stops with the error an old driver
    gives. Under "vllm" the task fails naming the model, the cause and engine="hf"; under
    "auto" the hf engine answers instead, after one warning line."""
    from dolly_spark.inference import vllm_engine
    from dolly_spark.lifecycle import loader
    from dolly_spark.request import ModelSpec

    seen = []  # what was visible at each query that starts CUDA (one asked of NVML does not)

    def cuda_query(answer):
        def query(*args):
            if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") != "1":
                seen.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
            return answer
        return query

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    monkeypatch.setenv("PYTORCH_NVML_BASED_CUDA_CHECK", "")  # undone at the end, as the package sets it
    monkeypatch.delenv("PYTORCH_NVML_BASED_CUDA_CHECK")
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    for name, answer in (("is_available", engine == "auto"), ("device_count", 2)):
        monkeypatch.setattr(torch.cuda, name, cuda_query(answer))

    def old_driver(*args, **kwargs):
        seen.append(os.environ.get("CUDA_VISIBLE_DEVICES"))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the hf engine then runs on the CPU
        raise VllmStoppedHere("CUDA driver version is insufficient for CUDA runtime version")

    monkeypatch.setattr(vllm_engine, "start_llm", old_driver)
    spec = ModelSpec("local", str(tiny_model_dir), "tiny_dolly", "7")
    config = EngineConfig(engine=engine, dtype="float32")
    if engine == "vllm":
        with pytest.raises(RuntimeError) as failure:
            loader.load_engine(spec, config, gpu_index=1)
        message = str(failure.value)
        assert "tiny_dolly version 7" in message and "CUDA driver version is insufficient" in message
        assert 'engine="hf"' in message
    else:
        loaded = loader.load_engine(spec, config, gpu_index=1)
        assert loaded.name == "hf"
        warnings = [line for line in capfd.readouterr().err.splitlines() if "vLLM could not load" in line]
        assert len(warnings) == 1 and "VllmStoppedHere: CUDA driver version is insufficient" in warnings[0]
        loader.forget_model(spec, config, gpu_index=1)
    assert seen and set(seen) == {"1"}, seen


def test_the_cpu_kv_cache_holds_a_whole_context_window_of_the_model():
    """vLLM refuses to start unless one row of the whole window fits its KV cache: a fixed 1 GiB
    holds no window of dolly-v2-3b in fp32 (1.25 GiB), so the cache is sized from the model."""
    from transformers import GPTNeoXConfig

    from dolly_spark.inference.vllm_process import GIB, cpu_kv_cache_gib

    dolly_3b = GPTNeoXConfig(hidden_size=2560, num_hidden_layers=32, num_attention_heads=32,
                             max_position_embeddings=2048)
    one_window = 2 * 32 * 2560 * 4 * 2048  # keys and values, every layer, fp32
    assert cpu_kv_cache_gib(dolly_3b, 2048, torch.float32) * GIB >= 2 * one_window > GIB
    assert cpu_kv_cache_gib(dolly_3b, 2048, torch.bfloat16) * GIB >= one_window
    tiny = GPTNeoXConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=512)
    assert cpu_kv_cache_gib(tiny, 512, torch.float32) == 1


def test_vllm_reads_a_registered_models_config_and_tokenizer_from_one_directory(tiny_model_dir, tmp_path):
    """An MLflow model keeps its tokenizer apart (``components/tokenizer``); vLLM reads the model's
    config beside the tokenizer, so the engine gives it one directory of links to both."""
    import shutil

    from transformers import AutoConfig, AutoTokenizer

    from dolly_spark.inference.vllm_engine import _one_directory

    model, tokenizer = tmp_path / "model", tmp_path / "components" / "tokenizer"
    model.mkdir()
    tokenizer.mkdir(parents=True)
    for item in tiny_model_dir.iterdir():
        tokenizer_file = item.name.startswith(("tokenizer", "special_tokens", "chat_template"))
        shutil.copy(item, (tokenizer if tokenizer_file else model) / item.name)
    assert _one_directory(str(model), None) == str(model) == _one_directory(str(model), str(model))
    view = _one_directory(str(model), str(tokenizer))
    assert AutoConfig.from_pretrained(view).model_type == "gpt_neox"
    assert len(AutoTokenizer.from_pretrained(view)) == len(AutoTokenizer.from_pretrained(tiny_model_dir))
    with pytest.raises((OSError, ValueError)):  # what vLLM met before: no model config beside the tokenizer
        AutoConfig.from_pretrained(tokenizer)
