"""Legacy ggml types against gguf-py's own quantizer, and the Q8_0 kernel against the numpy reference."""

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit.dtypes import from_float32, to_float32
from quantkit.errors import QuantkitError
from quantkit.methods.gguf import types as ggml


def _rows(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((24, 512)) * rng.uniform(1e-3, 10, (24, 1))
    x[0] = 0  # all-zero blocks: d == 0
    x[1, :64] = 0.5  # ties for the rounding
    x[2] = np.arange(512) % 7 - 3.0  # negative and positive maxima of equal size
    x[3, :32] = np.float32(0.49999997)
    x[4] = rng.standard_t(1.2, 512)  # heavy tails
    return x.astype(np.float32)


@pytest.mark.parametrize("qtype", [*ggml.LEGACY_TYPES, Q.F16, Q.BF16, Q.F32])
def test_reference_matches_gguf_py(qtype):
    x = _rows()
    ours = ggml.quantize_reference(x, qtype)
    theirs = gguf.quants.quantize(x, qtype)
    assert ours.shape == theirs.shape
    assert ours.tobytes() == theirs.tobytes()


@pytest.mark.parametrize("qtype", [*ggml.LEGACY_TYPES, Q.F16, Q.F32])
def test_layout_agrees_with_quantize(qtype):
    x = _rows(1)
    dtype, shape = ggml.layout(qtype, x.shape)
    out = ggml.quantize(x, qtype)
    assert (out.dtype, out.shape) == (dtype, shape)


@pytest.mark.parametrize("seed", range(3))
def test_q8_0_kernel_equals_reference(seed):
    x = _rows(seed) * np.float32(10.0 ** (seed - 1))
    assert ggml.quantize(x, Q.Q8_0).tobytes() == ggml.quantize_reference(x, Q.Q8_0).tobytes()


@pytest.mark.parametrize("qtype", ggml.LEGACY_TYPES)
def test_gguf_py_decodes_ours(qtype):
    x = _rows(2)
    back = gguf.quants.dequantize(ggml.quantize(x, qtype), qtype)
    step = np.abs(x).reshape(-1, 32).max(axis=1, keepdims=True) / (7 if qtype in (Q.Q4_0, Q.Q4_1) else 15)
    assert np.all(np.abs(back - x).reshape(-1, 32) <= step + 1e-6)


def test_row_bytes_refuses_partial_blocks():
    assert ggml.row_bytes(Q.Q8_0, 64) == 68
    with pytest.raises(QuantkitError, match="Q8_0 blocks of 32"):
        ggml.row_bytes(Q.Q8_0, 48)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q6_K])
@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_stored_dtypes_quantize_like_their_float32(qtype, dtype):
    x = _rows(4)
    stored = from_float32(x, dtype)
    expected = ggml.quantize(to_float32(stored, dtype), qtype)
    assert ggml.quantize_stored(stored, dtype, qtype).tobytes() == expected.tobytes()


ALL_TYPES = [*ggml.LEGACY_TYPES, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.IQ4_NL, Q.IQ4_XS, Q.F16, Q.F32]


@settings(max_examples=40, deadline=None)
@given(qtype=st.sampled_from(ALL_TYPES), rows=st.integers(1, 3), blocks=st.integers(1, 3), seed=st.integers(0, 99))
def test_layout_is_what_quantize_returns(qtype, rows, blocks, seed):
    k = blocks * gguf.GGML_QUANT_SIZES[qtype][0] * (8 if qtype in ggml.LEGACY_TYPES else 1)
    x = np.random.default_rng(seed).standard_normal((rows, k)).astype(np.float32)
    out = ggml.quantize(x, qtype)
    assert (out.dtype, out.shape) == ggml.layout(qtype, x.shape)
    assert out.nbytes == rows * ggml.row_bytes(qtype, k)
