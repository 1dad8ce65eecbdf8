"""K-quants and IQ4: each numba kernel and each C kernel (native/gguf.c) against its numpy reference on rows
meant to hit the corner cases, gguf-py's decoder against both, and the importance-weighted quantizers' shapes
and errors.

Byte identity with llama.cpp itself (libggml's ggml_quantize_chunk / quantize_*) is checked in
tests/clients/test_llama_quantize.py.
"""

import gguf
import numpy as np
import pytest

from quantkit import dtypes
from quantkit.methods.gguf import kernels, native, weighted
from quantkit.methods.gguf import types as ggml

COMPILED = list(kernels.KERNELS)
KINDS = ["normal", "scaled", "heavy", "positive", "negative", "discrete", "sparse", "zeros", "negative_zeros",
         "constant", "tiny", "denormal", "huge", "ties", "with_inf", "with_nan"]


def _rows(kind: str, shape: tuple[int, int] = (8, 512)) -> np.ndarray:
    rng = np.random.default_rng(KINDS.index(kind))
    x = {
        "normal": lambda: rng.standard_normal(shape),
        "scaled": lambda: rng.standard_normal(shape) * np.exp(rng.uniform(-20, 8, (shape[0], 1))),
        "heavy": lambda: rng.standard_t(1.5, shape),
        "positive": lambda: np.abs(rng.standard_normal(shape)),
        "negative": lambda: -np.abs(rng.standard_normal(shape)),
        "discrete": lambda: rng.integers(-3, 4, shape) * 0.25,
        "sparse": lambda: rng.standard_normal(shape) * (rng.random(shape) < 0.05),
        "zeros": lambda: np.zeros(shape),
        "negative_zeros": lambda: np.full(shape, -0.0),
        "constant": lambda: np.repeat(rng.standard_normal((shape[0], 1)) * 10.0 ** rng.integers(-6, 6, (shape[0], 1)),
                                      shape[1], axis=1),
        "tiny": lambda: rng.standard_normal(shape) * 1e-30,
        "denormal": lambda: rng.standard_normal(shape) * 1e-40,
        "huge": lambda: rng.standard_normal(shape) * 1e30,
        "ties": lambda: rng.integers(-8, 9, shape) * 0.5,  # scaled codes land on halves: rounding ties
        "with_inf": lambda: np.where(rng.random(shape) < 0.01, np.inf, rng.standard_normal(shape)),
        "with_nan": lambda: np.where(rng.random(shape) < 0.01, np.nan, rng.standard_normal(shape)),
    }[kind]()
    with np.errstate(all="ignore"):
        return x.astype(np.float32)


@pytest.mark.parametrize("qtype", COMPILED, ids=lambda q: q.name)
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_equals_reference(qtype, kind):
    x = _rows(kind)
    with np.errstate(all="ignore"):
        assert kernels.quantize(x, qtype).tobytes() == ggml.TYPES[qtype].reference(x).tobytes()


@pytest.mark.parametrize("qtype", native.TYPES, ids=lambda q: q.name)
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16"])
def test_c_kernel_equals_reference(qtype, kind, dtype):
    """As stored (bfloat16 bits read by the kernel itself), 3 x 768: an odd number of super-blocks, which
    Q4_K and Q5_K take in pairs. (Q8_0, Q4_0, Q5_0: the legacy types, also here.)"""
    with np.errstate(all="ignore"):
        raw = dtypes.from_float32(_rows(kind, (3, 768)), dtype)
        expected = ggml.TYPES[qtype].reference(dtypes.to_float32(raw, dtype))
    assert native.quantize(raw, dtype, qtype).tobytes() == expected.tobytes()


@pytest.mark.parametrize("qtype", COMPILED, ids=lambda q: q.name)
def test_layout_and_decoding(qtype):
    x = _rows("normal")
    out = ggml.quantize(x, qtype)
    assert (out.dtype, out.shape) == ggml.layout(qtype, x.shape)
    back = gguf.quants.dequantize(out, qtype)
    rel = float(np.linalg.norm(back - x) / np.linalg.norm(x))
    assert rel < ggml.TYPES[qtype].error_bound / 2


@pytest.mark.parametrize("qtype", COMPILED, ids=lambda q: q.name)
def test_zero_blocks_decode_to_zero(qtype):
    assert not gguf.quants.dequantize(ggml.quantize(_rows("zeros"), qtype), qtype).any()


@pytest.mark.parametrize("qtype", list(weighted.QUANTIZERS), ids=lambda q: q.name)
def test_weighted_quantizers(qtype):
    """With importance weights: the plain layout, a close decoding, and the weights matter: columns weighted
    1000x come back closer than with flat weights."""
    x = _rows("normal", (16, 512))
    flat = weighted.QUANTIZERS[qtype](x, np.ones(512, np.float32))
    assert (flat.dtype, flat.shape) == ggml.layout(qtype, x.shape)
    importance = np.where(np.arange(512) % 8 == 0, 1000.0, 1.0).astype(np.float32)
    focused = weighted.QUANTIZERS[qtype](x, importance)

    def error(out: np.ndarray) -> float:
        back = gguf.quants.dequantize(out, qtype)
        return float(np.abs(back - x)[:, ::8].mean())

    assert float(np.linalg.norm(gguf.quants.dequantize(flat, qtype) - x) / np.linalg.norm(x)) < ggml.TYPES[qtype].error_bound
    assert error(focused) < error(flat)
