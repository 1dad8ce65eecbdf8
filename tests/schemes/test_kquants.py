"""Q4_K / Q6_K: kernels against the numpy reference, gguf-py's decoder against both.

Byte identity with llama.cpp's own quantize_row_q*_K_ref is checked in tests/clients/test_llamacpp.py.
"""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from quantkit.methods.gguf import kquants
from quantkit.methods.gguf import types as ggml

KTYPES = [Q.Q4_K, Q.Q6_K]


def _rows(kind: str) -> np.ndarray:
    rng = np.random.default_rng(KINDS.index(kind))
    shape = (8, 512)
    x = {
        "normal": rng.standard_normal(shape),
        "scaled": rng.standard_normal(shape) * np.exp(rng.uniform(-20, 8, (8, 1))),
        "heavy": rng.standard_t(1.5, shape),
        "positive": np.abs(rng.standard_normal(shape)),
        "negative": -np.abs(rng.standard_normal(shape)),
        "discrete": rng.integers(-3, 4, shape) * 0.25,
        "sparse": rng.standard_normal(shape) * (rng.random(shape) < 0.05),
        "zeros": np.zeros(shape),
        "constant": np.full(shape, 0.3),
    }[kind]
    return x.astype(np.float32)


KINDS = ["normal", "scaled", "heavy", "positive", "negative", "discrete", "sparse", "zeros", "constant"]


@pytest.mark.parametrize("qtype", KTYPES)
@pytest.mark.parametrize("kind", KINDS)
def test_kernel_equals_reference(qtype, kind):
    x = _rows(kind)
    assert kquants.quantize(x, qtype).tobytes() == kquants.REFERENCE[qtype](x).tobytes()


@pytest.mark.parametrize("qtype", KTYPES)
def test_layout_and_decoding(qtype):
    x = _rows("normal")
    out = kquants.REFERENCE[qtype](x)
    assert (out.dtype, out.shape) == ggml.layout(qtype, x.shape)
    back = gguf.quants.dequantize(out, qtype)
    rel = np.abs(back - x).mean() / np.abs(x).mean()
    assert rel < (0.1 if qtype == Q.Q4_K else 0.03)


def test_zero_and_constant_blocks_decode_exactly():
    for qtype in KTYPES:
        assert not gguf.quants.dequantize(kquants.quantize(_rows("zeros"), qtype), qtype).any()
    const = gguf.quants.dequantize(kquants.quantize(_rows("constant"), Q.Q6_K), Q.Q6_K)
    assert np.allclose(const, 0.3, rtol=1e-3)
