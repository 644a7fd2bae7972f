"""Device and dtype choice. The GPU cases stand in for hardware this machine lacks."""
from __future__ import annotations

import torch

from dolly_spark.inference.devices import is_out_of_memory, select_device, select_dtype


def test_cpu_gets_bf16_only_where_it_multiplies_bf16_natively(monkeypatch, tmp_path):
    from dolly_spark.inference import devices

    if not torch.cuda.is_available():
        assert select_device() == torch.device("cpu")
    for flags, expected in [("fpu avx2 avx512f avx512_bf16", torch.float32),  # AVX-512 bf16 only: fp32
                            ("fpu avx512f avx512_bf16 amx_bf16 amx_tile amx_int8", torch.bfloat16), ("", torch.float32)]:
        cpuinfo = tmp_path / "cpuinfo"
        cpuinfo.write_text(f"processor\t: 0\nmodel name\t: a CPU\nflags\t\t: {flags}\n\n")
        monkeypatch.setattr(devices, "CPUINFO", str(cpuinfo))
        devices.native_bf16_matmul.cache_clear()  # the real rule, read afresh from this CPU's flags
        assert select_dtype(torch.device("cpu")) is expected, flags
        assert select_dtype(torch.device("cpu"), "float32") is torch.float32  # the override
    assert devices.cpu_flags(str(tmp_path / "missing")) == set()
    devices.native_bf16_matmul.cache_clear()  # the next caller reads this machine's own flags


def test_gpu_dtype_follows_bf16_support(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert select_device(3) == torch.device("cuda", 3)
    assert select_device() == torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert select_dtype(torch.device("cuda", 0)) is torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a T4 or V100
    assert select_dtype(torch.device("cuda", 0)) is torch.float16


def test_requested_dtype_wins_and_is_checked():
    import pytest

    assert select_dtype(torch.device("cpu"), "bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="float32, bfloat16, float16"):
        select_dtype(torch.device("cpu"), "int4")


def test_out_of_memory_is_recognised():
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not is_out_of_memory(ValueError("bad value"))


def test_spark_task_without_gpu_resources_runs_on_cpu(spark):
    from dolly_spark.spark.udf import task_gpu_index

    assert spark.sparkContext.parallelize([0, 1], 2).map(lambda _: task_gpu_index()).collect() == [None, None]
