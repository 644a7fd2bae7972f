"""Decoding steps on a CPU multiply by weights packed once for MKL's kernel: the same numbers
to the last bit, so the same answers, and nothing left behind on the model."""
from __future__ import annotations

import pytest
import torch

from benchmarks.workload import INSTRUCTION, generate_tickets
from engine_helpers import bound_engine
from dolly_spark.inference import packed_weights
from dolly_spark.inference.devices import cpu_flags
from dolly_spark.inference.packed_weights import (MIN_STEPS, PackedWeights, _exact_shapes, mkl_packing_available,
                                                  packed_weights_for, shape_of)


def two_layers() -> torch.nn.Sequential:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(576, 1536), torch.nn.SiLU(), torch.nn.Linear(1536, 576, bias=False))


def packs_exactly(rows: int) -> bool:
    """Whether this CPU's MKL gives every weight of ``two_layers`` a packed product of ``rows``
    rows equal to the plain one (the probe the package itself runs)."""
    layers = two_layers()
    return mkl_packing_available() and len(_exact_shapes([layers[0], layers[2]], rows)) == 2


# What holds per CPU: on AVX-512 CPUs (Intel Xeons and AMD EPYCs alike) MKL's packed kernel is
# its plain one from 16 rows, so those steps must pack. Elsewhere the probe decides, and the
# tests that need packs in use say why they do not run.
AVX512 = "avx512f" in cpu_flags()
needs_exact_packs = pytest.mark.skipif(
    not (packs_exactly(16) and packs_exactly(20)),
    reason="this CPU's MKL has no packed product of 16 and 20 rows equal to the plain one: the package decodes "
           "unpacked here, which test_without_exact_packs_decoding_is_unpacked_and_answers_the_same covers")


@pytest.mark.skipif(not mkl_packing_available(), reason="torch built without MKL's packed GEMM (an ARM build)")
@pytest.mark.parametrize("rows", [1, 8, 16, 20, 64])
def test_packed_products_are_plain_ones_to_the_last_bit_and_the_layers_are_restored(rows):
    model = two_layers()
    inputs, other = torch.randn(rows, 576), torch.randn(3, 7, 576)  # a prefill-like shape too
    with torch.inference_mode():
        plain, plain_other = model(inputs), model(other)
        packed = PackedWeights(model)
        with packed.decoding(rows, steps=MIN_STEPS) as used:
            layers_packed = [shape_of(linear) in packed.exact_shapes[rows] for linear in packed.linears]
            assert len(packed.current.by_linear) == sum(layers_packed)
            patched = ["forward" in linear.__dict__ for linear in packed.linears]
            inside, inside_other = model(inputs), model(other)
    assert used == any(layers_packed)
    assert patched == layers_packed  # exactly the layers whose packed product is exact
    assert torch.equal(inside, plain) and torch.equal(inside_other, plain_other)
    assert not any("forward" in linear.__dict__ for linear in packed.linears)
    if AVX512 and rows in (16, 20, 64):
        assert all(layers_packed), f"an AVX-512 CPU's MKL must pack {rows}-row products exactly"


@needs_exact_packs
def test_a_second_micro_batch_of_as_many_rows_reuses_the_packs_and_another_row_count_replaces_them():
    packed = PackedWeights(two_layers())
    with packed.decoding(16, steps=32):
        first = packed.current.by_linear
    with packed.decoding(16, steps=32):
        assert packed.current.by_linear is first
    with packed.decoding(20, steps=32):
        assert packed.current.rows == 20 and not set(map(id, packed.current.by_linear.values())) & set(map(id, first.values()))


@needs_exact_packs
def test_packs_are_made_again_when_the_weights_change_and_dropped_when_the_model_leaves_fp32():
    model = two_layers()
    packed = PackedWeights(model)
    inputs = torch.randn(16, 576)
    with packed.decoding(16, steps=32):
        first = packed.current.by_linear
    with torch.no_grad():
        model[0].weight.mul_(2)  # trained in place: same tensor, new values
    with torch.inference_mode():
        plain = model(inputs)
        with packed.decoding(16, steps=32) as used:
            assert used and packed.current.by_linear is not first
            assert torch.equal(model(inputs), plain)
    model.to(torch.bfloat16)
    with packed.decoding(16, steps=32) as used:
        assert not used and not packed.current.by_linear


def test_engines_on_one_model_share_its_packs(tiny_llama):
    model, tokenizer = tiny_llama
    short, long = (bound_engine(model, tokenizer, "dolly", max_new_tokens=n) for n in (16, 32))
    assert short.static.packed_weights is long.static.packed_weights is packed_weights_for(model)


def test_short_generations_non_fp32_models_and_scarce_memory_decode_unpacked(monkeypatch):
    with PackedWeights(two_layers()).decoding(16, steps=MIN_STEPS - 1) as used:
        assert not used
    with PackedWeights(two_layers().to(torch.bfloat16)).decoding(16, steps=32) as used:
        assert not used

    class Scarce:
        available = 1024 ** 2  # 1 MiB: less than four times the 7 MB of weights

    monkeypatch.setattr(packed_weights.psutil, "virtual_memory", lambda: Scarce())
    with PackedWeights(two_layers()).decoding(16, steps=32) as used:
        assert not used


@pytest.fixture(params=["gpt_neox", "llama"])
def model_and_tokenizer(request, tiny_model, tiny_llama):
    return tiny_model if request.param == "gpt_neox" else tiny_llama


@needs_exact_packs
def test_greedy_answers_are_identical_with_packed_and_unpacked_weights(model_and_tokenizer, monkeypatch):
    tickets = [body for _, body in generate_tickets(20, seed=5)]

    def answers():
        engine = bound_engine(*model_and_tokenizer, "dolly", max_new_tokens=MIN_STEPS + 4, token_budget=100_000)
        results = engine.run([INSTRUCTION] * len(tickets), tickets)
        return engine.static.packed_weights, [(r.response, r.finish_reason, r.completion_tokens) for r in results]

    packed, with_packs = answers()
    assert packed.current.rows == len(tickets) and packed.current.by_linear  # one micro-batch of 20 rows, decoded packed
    monkeypatch.setattr(packed_weights, "MIN_STEPS", 10 ** 6)  # no generation is long enough to pack
    _, without = answers()
    assert with_packs == without
    assert len({response for response, *_ in with_packs}) > 1


@pytest.mark.parametrize("why", ["no MKL", "no exact packed product"])
def test_without_exact_packs_decoding_is_unpacked_and_answers_the_same(tiny_llama, monkeypatch, why):
    """Runs on every CPU: where torch has no MKL packing, or its packed products differ from the
    plain ones, decoding takes F.linear and the answers are those of plain decoding."""
    model, tokenizer = tiny_llama
    tickets = [body for _, body in generate_tickets(16, seed=5)]  # 16 rows: packed on AVX-512 CPUs otherwise
    packed_weights._shared.pop(model, None)  # no packs or probes left by earlier tests

    def answers():
        engine = bound_engine(model, tokenizer, "dolly", max_new_tokens=MIN_STEPS + 4, token_budget=100_000)
        return [(r.response, r.completion_tokens) for r in engine.run([INSTRUCTION] * len(tickets), tickets)]

    monkeypatch.setattr(packed_weights, "MIN_STEPS", 10 ** 6)
    plain = answers()
    monkeypatch.undo()
    if why == "no MKL":
        monkeypatch.setattr(packed_weights, "mkl_packing_available", lambda: False)
    else:
        monkeypatch.setattr(packed_weights, "_exact_shapes", lambda linears, rows: set())
    with PackedWeights(two_layers()).decoding(16, steps=32) as used:
        assert not used
    assert answers() == plain
    assert not packed_weights_for(model).current.by_linear
