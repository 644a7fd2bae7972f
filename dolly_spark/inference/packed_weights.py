"""Decoding steps on a CPU multiply by weights packed once for MKL's GEMM kernel.

A decoding step multiplies a few rows, one per row of the micro-batch, by every weight matrix.
MKL's fp32 GEMM first copies its weight operand into its kernel's blocked layout, at every call.
For thousands of rows (a prefill) the copy is lost in the arithmetic; for a few it is a large
part of the call: 16-row products streamed the demo model's weights at about 6 GB/s, against
14 GB/s for one row (benchmarks/README.md, "What limits the CPU figures"). MKL's packed GEMM
makes the copy once: ``torch.ops.mkl._mkl_reorder_linear_weight`` packs a weight for a given
row count and ``torch.ops.mkl._mkl_linear`` multiplies by the pack, the pair torch.compile's CPU
backend uses for fp32 linear layers. Each pack serves one row count, so a micro-batch's packs
are made before its decoding steps and kept for the next micro-batch of as many rows.

The product comes from the same kernel, so the numbers are the same as ``F.linear``'s and
answers do not change. Where MKL takes another path for the unpacked product (on an AVX-512
Xeon: below 16 rows, and from 57 rows for a 1536-wide inner dimension) the two differ in the
last bits; a probe product per weight shape finds that out per row count, and those weights
stay unpacked.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
import weakref
from typing import Any, Callable, Iterator, NamedTuple

import psutil
import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

# Packing the demo model's weights took 0.2-0.45 s and saved about 20 ms a decoding step at 16
# rows (benchmarks/README.md): generations shorter than this do not pay it back.
MIN_STEPS = 12
# The packs are one more copy of the weights; they are made only while that copy leaves most of
# the memory free (a Spark executor's Python workers share the machine with the JVM).
MAX_SHARE_OF_AVAILABLE_MEMORY = 0.25


def mkl_packing_available() -> bool:
    """True where torch was built with MKL and has its packed GEMM ops (not on ARM builds)."""
    return (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")
            and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight"))


Shape = tuple[int, int, bool]  # a linear layer's out and in features, and whether it has a bias


def shape_of(linear: torch.nn.Linear) -> Shape:
    return linear.out_features, linear.in_features, linear.bias is not None


class Packs(NamedTuple):
    state: tuple  # the weights' state they were packed from (``_weight_state``, layer by layer)
    rows: int
    by_linear: dict[int, torch.Tensor]  # id(linear) -> its weight packed for ``rows`` rows


NO_PACKS = Packs((), 0, {})


class PackedWeights:
    """One model's linear weights packed for one row count at a time, shared by every engine
    on the model (``packed_weights_for``)."""

    def __init__(self, model: Any):
        # Plain linear layers only: a subclass (a quantized or adapter layer) computes something
        # else than F.linear, which the packed forward stands in for.
        self.plain_linears = [module for module in model.modules() if type(module) is torch.nn.Linear]
        self.current = NO_PACKS  # replaced whole, never changed in place
        self.exact_shapes: dict[int, set[Shape]] = {}  # row count -> shapes whose packed products are exact
        self._lock = threading.Lock()

    @property
    def linears(self) -> list[torch.nn.Linear]:
        """The layers that can be packed now: fp32 on the CPU (a model can be moved or cast
        after its first engine was built)."""
        return [linear for linear in self.plain_linears
                if linear.weight.device.type == "cpu" and linear.weight.dtype == torch.float32]

    @contextlib.contextmanager
    def decoding(self, rows: int, steps: int) -> Iterator[bool]:
        """For the duration of the block (one ``generate`` call of ``rows`` rows and at most
        ``steps`` new tokens), the model's linear layers multiply ``rows``-row inputs by packed
        weights; inputs of other shapes (a prompt's prefill) take ``F.linear`` as before. Yields
        whether packed weights are in use."""
        with self._lock:
            packs = self._packs(rows, steps)
        packed = [linear for linear in self.plain_linears if id(linear) in packs]
        forwards = {id(linear): _packed_forward(linear, packs[id(linear)], rows) for linear in packed}
        for linear in packed:
            linear.forward = forwards[id(linear)]
        try:
            yield bool(packed)
        finally:
            for linear in packed:
                # Only this block's own forward: another engine on the same model may have
                # installed its own since (it then decodes unpacked, with the same numbers).
                if linear.__dict__.get("forward") is forwards[id(linear)]:
                    del linear.forward

    def _packs(self, rows: int, steps: int) -> dict[int, torch.Tensor]:
        if steps < MIN_STEPS:
            return {}  # the packs stay for the next longer generation
        linears = self.linears
        if not linears or not mkl_packing_available():
            self.current = NO_PACKS
            return {}
        # A pack is a copy: weights changed since (trained in place, loaded over, moved) make it stale.
        state = tuple(_weight_state(linear.weight) for linear in linears)
        if (state, rows) == (self.current.state, self.current.rows):
            return self.current.by_linear
        self.current = NO_PACKS  # the previous packs go before new ones are made
        weight_bytes = sum(linear.weight.numel() * linear.weight.element_size() for linear in linears)
        if weight_bytes > MAX_SHARE_OF_AVAILABLE_MEMORY * psutil.virtual_memory().available:
            log.debug("decoding with unpacked weights: packing %.0f MB of weights would take more than %d%% of "
                     "the memory available", weight_bytes / 1e6, MAX_SHARE_OF_AVAILABLE_MEMORY * 100)
            return {}
        if rows not in self.exact_shapes:
            self.exact_shapes[rows] = _exact_shapes(linears, rows)
        started = time.perf_counter()
        with torch.inference_mode():
            packs = {id(linear): torch.ops.mkl._mkl_reorder_linear_weight(linear.weight, rows)
                     for linear in linears if shape_of(linear) in self.exact_shapes[rows]}
        self.current = Packs(state, rows, packs)
        log.debug("packed %d of %d weight matrices for %d-row decoding steps in %.2f s", len(packs),
                  len(linears), rows, time.perf_counter() - started)
        return packs


def _weight_state(weight: torch.Tensor) -> tuple:
    """What changes when a weight does: its storage, and the count of its in-place changes
    (tensors made under inference mode keep none; they cannot change outside it either)."""
    try:
        version = weight._version
    except RuntimeError:
        version = None
    return id(weight), weight.data_ptr(), version


def _exact_shapes(linears: list[torch.nn.Linear], rows: int) -> set[Shape]:
    """The weight shapes among ``linears`` whose packed products of ``rows`` rows equal
    ``F.linear``'s to the last bit on this CPU. MKL picks its kernel by the matrices' sizes: for
    a few rows, or for many rows and a long inner dimension, the unpacked product is not the
    packed one."""
    exact = set()
    with torch.inference_mode():
        for shape, linear in {shape_of(linear): linear for linear in linears}.items():
            probe = torch.randn(rows, linear.in_features, generator=torch.Generator().manual_seed(rows))
            packed = torch.ops.mkl._mkl_reorder_linear_weight(linear.weight, rows)
            if torch.equal(_packed_forward(linear, packed, rows)(probe), F.linear(probe, linear.weight, linear.bias)):
                exact.add(shape)
    return exact


def _packed_forward(linear: torch.nn.Linear, packed: torch.Tensor, rows: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """``linear``'s forward on ``packed``, its weight packed for ``rows`` rows; other inputs
    take ``F.linear``."""

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        if inputs.numel() != rows * linear.in_features:
            return F.linear(inputs, linear.weight, linear.bias)
        return torch.ops.mkl._mkl_linear(inputs, packed, linear.weight, linear.bias, rows)

    return forward


_shared: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its PackedWeights
_shared_lock = threading.Lock()


def packed_weights_for(model: Any) -> PackedWeights:
    """The one ``PackedWeights`` of ``model``: a Python worker caches an engine per settings,
    and its engines on one model hold one set of packs between them, not one each."""
    with _shared_lock:
        if model not in _shared:
            _shared[model] = PackedWeights(model)
        return _shared[model]
