"""The C kernels (quantkit._kernels through native.py) give the numpy references' bytes: every blocksize,
odd lengths and partial blocks, zeros, denormals, NaN and infinity, each stored dtype, read-only input,
and the same bytes on 1, 2 or 3 threads. Q8_0 is also checked against gguf-py's own quantizer."""

from __future__ import annotations

import subprocess
import sys

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from quantkit import dtypes
from quantkit.errors import QuantkitError
from quantkit.methods.bnb import int8, native, nf4
from quantkit.methods.gguf import native as gguf_native
from quantkit.methods.gguf import types as ggml

DTYPES = ("BF16", "F16", "F32")
BLOCK_TYPES = (Q.Q4_0, Q.Q5_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K)  # native/gguf.c's gguf_blocks


def values(n: int, seed: int, scale: float = 0.02) -> np.ndarray:
    """Normal values with a zero stretch (whole zero blocks and rows) and hard cases near its end: denormals
    in float32 and float16, float16's normal/subnormal edge, and a tie for float16 rounding."""
    x = (np.random.default_rng(seed).standard_normal(n) * scale).astype(np.float32)
    x[: n // 4] = 0
    hard = np.array([1e-30, -3e-6, 1e-40, -1e-45, 6.1e-5, -6.103515625e-05, 5.9e-8, 1.00048828125], np.float32)
    x[n // 4 : n // 4 + len(hard)] = hard[: n - n // 4]
    return x


def stored(x: np.ndarray, dtype: str) -> np.ndarray:
    """x in `dtype`'s stored bits (beyond float16's range: infinity), read-only as a read-only map is."""
    with np.errstate(over="ignore"):
        raw = dtypes.from_float32(x, dtype)
    raw.setflags(write=False)
    return raw


def same(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


def test_the_kernels_are_built():
    assert native.AVAILABLE, "quantkit._kernels did not build: pip install -e . needs a C compiler"


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 128, 256, 512, 1024, 2048, 4096, 7, 100])
def test_4bit_equals_reference(quant_type, blocksize):
    for n in (1, 63, blocksize, 3 * blocksize + 1, 9 * blocksize - 2, 20_001):
        for dtype in DTYPES:
            raw = stored(values(n, n + blocksize, scale=2.0 if n % 2 else 0.02), dtype)
            packed, absmax = native.quantize_4bit(raw, dtype, blocksize, quant_type)
            expected = nf4.quantize_4bit(dtypes.to_float32(raw, dtype), blocksize, quant_type)
            assert same(packed, expected[0]) and same(absmax, expected[1]), (n, dtype)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_4bit_non_finite_block_gets_a_nan_absmax(bad):
    x = values(64 * 5 + 3, 1)
    x[64 * 2 + 5] = x[-1] = bad  # a full block and the partial last one
    packed, absmax = native.quantize_4bit(x, "F32", 64, "nf4")
    with np.errstate(invalid="ignore"):
        expected = nf4.quantize_4bit(x, 64, "nf4")
    assert np.isnan(absmax[[2, 5]]).all() and same(absmax[[0, 1, 3, 4]], expected[1][[0, 1, 3, 4]])
    assert same(packed[:64], expected[0][:64]) and same(packed[96:160], expected[0][96:160])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (33, 7), (64, 64), (256, 384), (17, 4099)])
def test_int8_equals_reference(dtype, shape):
    for scale in (0.02, 30.0, 1e-6):
        x = values(shape[0] * shape[1], shape[1], scale).reshape(shape)
        raw = stored(x, dtype)
        codes, scb = native.quantize_int8(raw, dtype)
        expected = int8.quantize_int8(dtypes.to_float32(raw, dtype))
        assert same(codes, expected[0]) and same(scb, expected[1]), scale


@pytest.mark.parametrize("bad", [np.nan, np.inf, 65520.0, -1e6])
def test_int8_non_finite_or_beyond_float16_rows_are_flagged_as_the_reference_does(bad):
    x = values(6 * 40, 2, scale=3.0).reshape(6, 40)
    x[4, 7] = bad
    codes, scb = native.quantize_int8(x, "F32")
    with np.errstate(over="ignore", invalid="ignore"):
        expected = int8.quantize_int8(x)
    assert np.array_equal(scb, expected[1], equal_nan=True) and not np.isfinite(scb[4])
    assert same(codes, expected[0])  # the flagged row is zeros, as 0 * inf and NaN give the reference


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [64, 4096, 7])
@pytest.mark.parametrize("dtype", [*DTYPES, "F64"])
def test_dequantize_ragged_ranges_equal_reference(quant_type, blocksize, dtype):
    x = values(3 * 4096 + 11, blocksize, scale=1.5)
    packed, absmax = nf4.quantize_4bit(x, blocksize, quant_type)
    table = nf4.decode_table(quant_type, x.shape)
    for first, count in ((0, x.size), (1, 2), (3, 0), (blocksize - 1, 2 * blocksize + 3), (4097, 5000), (x.size - 1, 1)):
        expected = dtypes.from_float32(nf4.dequantize_range(packed, absmax, table, blocksize, first, count), dtype)
        got = native.dequantize_4bit(packed, absmax, table, blocksize, first, count, dtype)
        assert same(got, expected), (first, count)


def test_kernels_read_a_read_only_memory_map(tmp_path):
    x = values(64 * 33, 4, scale=1.0)
    dtypes.bf16_bits(x).tofile(tmp_path / "bits")
    raw = np.memmap(tmp_path / "bits", np.uint16, mode="r")
    widened = dtypes.to_float32(raw, "BF16")
    assert all(map(same, native.quantize_4bit(raw, "BF16", 64, "nf4"), nf4.quantize_4bit(widened, 64, "nf4")))
    assert all(map(same, native.quantize_int8(raw.reshape(33, 64), "BF16"), int8.quantize_int8(widened.reshape(33, 64))))
    assert same(ggml.quantize_stored(raw.reshape(33, 64), "BF16", Q.Q8_0), ggml.quantize_reference(widened.reshape(33, 64), Q.Q8_0))


def test_dequantize_refuses_ranges_beyond_the_data():
    packed, absmax = nf4.quantize_4bit(values(128, 3), 64, "nf4")
    with pytest.raises(ValueError, match="packed bytes"):
        native.dequantize_4bit(packed[:-1], absmax, nf4.NF4_CODE, 64, 0, 128, "F32")
    with pytest.raises(ValueError, match="absmax"):
        native.dequantize_4bit(packed, absmax[:1], nf4.NF4_CODE, 64, 60, 10, "F32")


def q8_0_rows(seed: int) -> np.ndarray:
    """Rows [24, 512] with the blocks that matter for Q8_0: zeros, ties, equal +/- maxima, heavy tails,
    denormals (whose 1/d overflows), non-finite values, and scales d that are float16 subnormals, beyond
    float16's range, or halfway between two float16 values (both ways of rounding to even)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((24, 512)) * rng.uniform(1e-3, 10, (24, 1))
    x[0] = 0
    x[1, :64] = 0.5
    x[2] = np.arange(512) % 7 - 3.0
    x[3, :32] = np.float32(0.49999997)
    x[4] = rng.standard_t(1.2, 512)
    x[5] *= 1e-39
    x[6, :32] = np.linspace(-127.5, 127.5, 32) * 1e-3
    x[7, 3], x[7, 40], x[7, 70] = np.nan, np.inf, -np.inf
    x[8] *= 1e-5 / np.abs(x[8]).max()
    x[9] *= 1e7 / np.abs(x[9]).max()
    x[10, :64] = np.tile(np.linspace(-1, 1, 32), 2) * np.repeat([127 * (1 + 2**-11), 127 * (1 + 3 * 2**-11)], 32)
    return x.astype(np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(3))
def test_q8_0_equals_gguf_py(dtype, seed):
    raw = stored(q8_0_rows(seed), dtype)
    with np.errstate(all="ignore"):
        expected = gguf.quants.quantize(dtypes.to_float32(raw, dtype), Q.Q8_0)
    assert same(ggml.quantize_stored(raw, dtype, Q.Q8_0), expected)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", range(3))
def test_q4_0_equals_the_reference_and_gguf_py(dtype, seed):
    """The same rows (a NaN / infinity block goes to the reference), plus blocks of signed zeros and of
    maxima tied in magnitude with opposite signs (the first one wins)."""
    rows = q8_0_rows(seed)
    rows[11, :32] = -0.0
    rows[11, 32:64] = np.where(np.arange(32) % 2, 0.0, -0.0)
    rows[12, :32] = np.where(np.arange(32) == 5, -2.0, np.where(np.arange(32) == 9, 2.0, 0.5))
    raw = stored(rows, dtype)
    widened = dtypes.to_float32(raw, dtype)
    fast = ggml.quantize_stored(raw, dtype, Q.Q4_0)
    assert same(fast, ggml.quantize_reference(widened, Q.Q4_0))
    finite = np.isfinite(widened).all(axis=1)
    with np.errstate(all="ignore"):
        assert same(fast[finite], gguf.quants.quantize(widened[finite], Q.Q4_0))
    assert native.AVAILABLE and same(gguf_native.quantize(raw, dtype, Q.Q4_0), fast)  # the C kernel, NaN rows too


def big(n: int = 3 << 20) -> np.ndarray:
    """Enough elements (3M, odd) that the kernels split the work over threads."""
    return stored(values(n - 1, 7, scale=1.0), "BF16")


@pytest.fixture(scope="module")
def by_threads():
    """Every kernel's output on `big()`, for 1, 2 and 3 threads."""
    raw = big()
    rows = raw[: raw.size // 1024 * 1024].reshape(-1, 1024)
    packed, absmax = nf4.quantize_4bit(dtypes.to_float32(raw, "BF16"), 64, "nf4")
    outputs = {}
    with pytest.MonkeyPatch.context() as patch:
        for threads in (1, 2, 3):
            patch.setenv("QUANTKIT_THREADS", str(threads))
            outputs[threads] = [*native.quantize_4bit(raw, "BF16", 64, "fp4"), *native.quantize_4bit(raw, "BF16", 100, "nf4"),
                                *native.quantize_int8(rows, "BF16"), ggml.quantize_stored(rows, "BF16", Q.Q8_0),
                                native.dequantize_4bit(packed, absmax, nf4.NF4_CODE, 64, 1, raw.size - 2, "BF16"),
                                *(ggml.quantize_stored(rows, "BF16", q) for q in BLOCK_TYPES)]
    return raw, rows, packed, absmax, outputs


def test_threads_give_the_same_bytes(by_threads):
    *_, outputs = by_threads
    for threads in (2, 3):
        assert all(same(a, b) for a, b in zip(outputs[1], outputs[threads], strict=True)), threads


def test_threaded_output_equals_reference(by_threads):
    raw, rows, packed, absmax, outputs = by_threads
    widened = dtypes.to_float32(raw, "BF16")
    expected = [*nf4.quantize_4bit(widened, 64, "fp4"), *nf4.quantize_4bit(widened, 100, "nf4"),
                *int8.quantize_int8(dtypes.to_float32(rows, "BF16")), ggml.quantize_reference(dtypes.to_float32(rows, "BF16"), Q.Q8_0),
                dtypes.bf16_bits(nf4.dequantize_range(packed, absmax, nf4.NF4_CODE, 64, 1, raw.size - 2))]
    # the K-quants' numpy references take ~10 s on all these rows: every 97th row, from every thread's share
    some = dtypes.to_float32(rows, "BF16")[::97]
    expected += [ggml.quantize_reference(some, q) for q in BLOCK_TYPES]
    threaded = outputs[2][: -len(BLOCK_TYPES)] + [out[::97] for out in outputs[2][-len(BLOCK_TYPES):]]
    assert all(same(a, b) for a, b in zip(threaded, expected, strict=True))


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_bad_thread_count_is_refused(monkeypatch, value):
    monkeypatch.setenv("QUANTKIT_THREADS", value)
    with pytest.raises(QuantkitError, match="QUANTKIT_THREADS"):
        native.quantize_int8(np.zeros((2, 2), np.float32), "F32")


def test_compiled_paths_do_not_import_numba(tmp_path):
    """numba's import costs ~0.4 s: NF4, int8 and GGUF Q8_0, Q4_0, Q5_0 and the K-quants must not pay it."""
    script = """
import sys
import numpy as np
from gguf import GGMLQuantizationType as Q
from quantkit.methods.bnb import quantizer as bnb
from quantkit.methods.bnb.quantizer import BnbOptions as QuantOptions
from quantkit.methods.gguf import native as gguf_native
from quantkit.methods.gguf import types as ggml
x = np.ones((4, 256), np.float32)
bnb.nf4_kernel(QuantOptions(method="nf4"))(x, "F32", 64, "nf4")
bnb.int8_kernel(QuantOptions(method="int8"))(x, "F32")
for qtype in (Q.Q8_0, Q.Q4_0, Q.Q5_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.F16, Q.BF16, Q.F32):
    ggml.quantize_stored(x, "F32", qtype)
assert "numba" not in sys.modules
"""
    subprocess.run([sys.executable, "-c", script], check=True)


def test_without_the_kernels_numpy_runs_after_one_line_on_stderr():
    script = """
import sys
sys.modules["quantkit.native._kernels"] = None  # as if the extension had not been built
import numpy as np
from gguf import GGMLQuantizationType as Q
from quantkit.methods.bnb import quantizer as bnb
from quantkit.methods.bnb.quantizer import BnbOptions as QuantOptions
from quantkit.methods.bnb import nf4
from quantkit.methods.gguf import native as gguf_native
from quantkit.methods.gguf import types as ggml
x = np.ones((4, 64), np.float32)
assert np.array_equal(bnb.nf4_kernel(QuantOptions(method="nf4"))(x, "F32", 64, "nf4")[0], nf4.quantize_4bit(x, 64, "nf4")[0])
bnb.int8_kernel(QuantOptions(method="int8"))(x, "F32")
assert ggml.quantize_stored(x, "F32", Q.Q8_0).tobytes() == ggml.quantize_reference(x, Q.Q8_0).tobytes()
rows = np.linspace(-1, 1, 512, dtype=np.float32).reshape(2, 256)
assert ggml.quantize_stored(rows, "F32", Q.Q4_K).tobytes() == ggml.quantize_reference(rows, Q.Q4_K).tobytes()  # numba
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert len(result.stderr.splitlines()) == 1 and "numpy path" in result.stderr, result.stderr


def test_backend_c_without_the_kernels_is_refused(monkeypatch):
    from quantkit.methods.bnb import quantizer as bnb
    from quantkit.methods.bnb.quantizer import BnbOptions as QuantOptions

    monkeypatch.setattr(native, "AVAILABLE", False)
    with pytest.raises(QuantkitError, match="--backend c: .* not built"):
        bnb.BitsAndBytes().check(QuantOptions(method="nf4", backend="c"))
