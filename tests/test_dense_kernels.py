"""The native FP8 kernels (native.fp8_dense, the fine-grained writer's fp8.native) and the finite check
(native.nonfinite) give what the numpy references give, bit for bit: every e4m3 code (NaN and subnormals
included), every scale dtype and output dtype, ragged blocks, chunks that start inside a block row. The references themselves are checked
against transformers and compressed-tensors in test_fp8_mxfp4.py and test_quantize_ct.py."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit import dtypes, native
from quantkit.methods.ct import formats, schemes
from quantkit.methods.ct import native as ct_native
from quantkit.methods.fp8 import blocks
from quantkit.numerics import FP8_E4M3_VALUES

pytestmark = pytest.mark.skipif(not native.DENSE_KERNELS, reason="the C extension was not built")
DENSE = ("BF16", "F16", "F32")


def scales_of(rng, shape, dtype: str) -> np.ndarray:
    """float32 values of `dtype`, over many magnitudes (float16 ones overflow past 65504: infinity is an output too)."""
    values = np.exp2(rng.uniform(-20, 14, shape)).astype(np.float32) * rng.choice([1, -1], shape).astype(np.float32)
    return dtypes.round_to(values, dtype) if dtype != "F32" else values


@pytest.mark.filterwarnings("ignore:overflow encountered")
@pytest.mark.parametrize("scale_dtype", DENSE)
@pytest.mark.parametrize("dtype", DENSE)
@pytest.mark.parametrize("block", [(128, 128), (1, 200), (1, 32), (300, 200), (7, 5)])
def test_fp8_dense_equals_the_ct_reference(scale_dtype, dtype, block):
    rng = np.random.default_rng(sum(map(ord, scale_dtype + dtype)) + block[0])
    rows, cols = 300, 200
    codes = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    codes[0, :256 if cols >= 256 else cols] = np.arange(min(256, cols), dtype=np.uint8)
    codes[1, : 256 - cols] = np.arange(cols, 256, dtype=np.uint8)
    grid = scales_of(rng, (-(-rows // block[0]), -(-cols // block[1])), scale_dtype)
    args = {"strategy": "block", "block_structure": list(block)}
    for start, stop in [(0, rows), (0, 128), (128, 300), (37, 299)]:
        reference = dtypes.from_float32(formats.affine(FP8_E4M3_VALUES[codes[start:stop]], grid, scale_dtype, None, args, start), dtype)
        ours = native.fp8_dense(codes[start:stop], grid, block, start, scale_dtype, dtype)
        assert ours.dtype == reference.dtype and np.array_equal(ours.view(np.uint8), reference.view(np.uint8)), (start, stop)


@pytest.mark.parametrize("strategy", ["channel", "tensor", "group"])
def test_scale_grid_covers_every_strategy(strategy):
    rng = np.random.default_rng(1)
    rows, cols = 70, 96
    shape = {"channel": (rows, 1), "tensor": (1,), "group": (rows, 3)}[strategy]
    scale = scales_of(rng, shape, "BF16")
    args = {"strategy": strategy, "group_size": 32}
    codes = rng.integers(0, 126, (rows, cols), dtype=np.uint8)
    grid, block = formats.scale_grid(scale, rows, cols, args)
    for start, stop in [(0, rows), (13, 50)]:
        sliced = scale[start:stop] if strategy != "tensor" else scale
        reference = dtypes.from_float32(formats.affine(FP8_E4M3_VALUES[codes[start:stop]], sliced, "BF16", None, args, start), "BF16")
        assert np.array_equal(native.fp8_dense(codes[start:stop], grid, block, start, "BF16", "BF16"), reference)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 300), cols=st.integers(1, 300), first=st.integers(0, 2), seed=st.integers(0, 2**16))
def test_fp8_dense_equals_the_fine_grained_reference(rows, cols, first, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    start = first * 128
    grid = scales_of(rng, (-(-(start + rows) // 128), -(-cols // 128)), "F32")
    reference = dtypes.from_float32(blocks.dequantize_band(codes, grid, start), "BF16")
    assert np.array_equal(native.fp8_dense(codes, grid, (128, 128), start, "F32", "BF16"), reference)


@pytest.mark.parametrize("dtype", DENSE)
def test_nonfinite_finds_each_nan_and_infinity(dtype):
    values = np.linspace(-3, 3, 5000, dtype=np.float32)
    stored = dtypes.from_float32(values, dtype)
    assert dtypes.all_finite(stored, dtype)
    for special in (np.inf, -np.inf, np.nan):
        for where in (0, 2500, 4999):
            damaged = values.copy()
            damaged[where] = special
            assert not dtypes.all_finite(dtypes.from_float32(damaged, dtype), dtype), (special, where)


def test_the_kernels_refuse_wrong_lengths():
    codes = np.zeros((4, 8), np.uint8)
    with pytest.raises(ValueError, match="scales"):
        native.kernels.fp8_dense(codes, 8, np.zeros(1, np.float32), 1, 8, 0, 0, 0, np.zeros(32, np.uint16), 1)
    with pytest.raises(ValueError, match="dense"):
        native.kernels.fp8_dense(codes, 8, np.zeros(4, np.float32), 1, 8, 0, 0, 0, np.zeros(31, np.uint16), 1)
    with pytest.raises(ValueError, match="kind"):
        native.kernels.nonfinite(np.zeros(3, np.uint8), 0, 1)


@pytest.mark.parametrize("dtype", DENSE)
@pytest.mark.parametrize("shape", [(300, 200), (128, 128), (1, 7), (257, 1000)])
def test_fine_grained_fp8_writer_kernel_equals_the_reference(dtype, shape):
    from quantkit.methods.fp8 import native as fp8_native

    rng = np.random.default_rng(shape[0] + shape[1])
    low, high = (-12, 6) if dtype == "F16" else (-30, 12)  # float16 overflows beyond 65504
    values = (rng.standard_normal(shape) * np.exp(rng.uniform(low, high, (shape[0], 1)))).astype(np.float32)
    values[: min(128, shape[0]), : min(128, shape[1])] = 0  # an all-zero block: scale 1
    if shape[1] > 5:
        values[-1, 5] = -0.0
    stored = dtypes.from_float32(values, dtype)
    assert dtypes.all_finite(stored, dtype)
    reference = blocks.quantize_band(dtypes.to_float32(stored, dtype))
    ours = fp8_native.quantize_band(stored, dtype, blocks.BLOCK)
    assert np.array_equal(ours[0], reference[0]) and np.array_equal(ours[1].view(np.uint32), reference[1].view(np.uint32))
    for special in (np.nan, np.inf):
        damaged = values.copy()
        damaged[-1, -1] = special
        assert fp8_native.quantize_band(dtypes.from_float32(damaged, dtype), dtype, blocks.BLOCK) is None


@pytest.mark.parametrize("dtype", DENSE)
def test_mxfp4_kernel_equals_the_reference(dtype):
    from quantkit.methods.mxfp4 import blocks as mx
    from quantkit.methods.mxfp4 import native as mx_native

    rng = np.random.default_rng(5)
    rows, groups = 70, 12
    packed = rng.integers(0, 256, (rows, groups, 16), dtype=np.uint8)
    scales = rng.integers(100, 140, (rows, groups), dtype=np.uint8)
    scales.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)  # every e8m0 code, 0 and 255 included
    for first, count in [(0, groups), (5, 4), (11, 1)]:
        with np.errstate(over="ignore"):
            values = mx.dequantize_groups(packed[:, first : first + count], scales[:, first : first + count])
            reference = dtypes.from_float32(np.ascontiguousarray(values.T), dtype)
        ours = mx_native.dense_groups(packed, scales, first, count, dtype)
        assert ours.dtype == reference.dtype and np.array_equal(ours.view(np.uint8), reference.view(np.uint8)), (first, count)


def int_module(rng, rows: int, cols: int, bits: int, strategy: str, group: int, scale_dtype: str, asymmetric: bool):
    """A random integer module as a reader holds it: (codes as stored, scale bits, signed zero points or None,
    the config's weight args); every field value, all-zero and NaN / infinite / zero scales included."""
    grid = {"group": (rows, -(-cols // max(group, 1))), "channel": (rows, 1), "tensor": (1,)}[strategy]
    if bits:
        fields = rng.integers(0, 1 << bits, (rows, cols), dtype=np.int32)
        fields[0, : min(cols, 1 << bits)] = np.arange(min(cols, 1 << bits))
        fields[1] = 1 << (bits - 1)  # an all-zero row of codes
        codes = schemes.pack_int32(fields - (1 << (bits - 1)), bits)
    else:
        codes = rng.integers(-128, 128, (rows, cols), dtype=np.int8)
    scale = scales_of(rng, grid, scale_dtype)
    flat = scale.reshape(-1)
    flat[: min(4, flat.size)] = [0.0, np.nan, np.inf, -(2.0**-20)][: min(4, flat.size)]
    zero = rng.integers(-(1 << (max(bits, 8) - 1)), 1 << (max(bits, 8) - 1), grid) if asymmetric else None
    args = {"strategy": strategy, "group_size": group if strategy == "group" else None, "num_bits": bits or 8,
            "symmetric": not asymmetric}  # fmt: skip
    return codes, dtypes.from_float32(scale, scale_dtype), zero, args


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
@pytest.mark.parametrize("scale_dtype", DENSE)
@pytest.mark.parametrize("dtype", DENSE)
@pytest.mark.parametrize("bits,strategy,group", [(4, "group", 128), (4, "group", 32), (8, "group", 64), (4, "channel", 0),
                                                 (8, "tensor", 0), (0, "group", 32), (0, "channel", 0), (4, "group", 96)])  # fmt: skip
@pytest.mark.parametrize("asymmetric", [False, True])
def test_int_dense_equals_the_ct_reference(scale_dtype, dtype, bits, strategy, group, asymmetric):
    """ct.native.int_dense against formats.decode (the library's arithmetic, checked in test_quantize_ct.py):
    widths 576 and 200 (a last group that is ragged), chunks that start and end anywhere."""
    rng = np.random.default_rng(bits + group + len(strategy) + asymmetric + sum(map(ord, scale_dtype + dtype)))
    rows = 131
    for cols in (576, 200):
        codes, scale, zero, args = int_module(rng, rows, cols, bits, strategy, group, scale_dtype, asymmetric)
        fmt, main = ("pack-quantized", "weight_packed") if bits else ("int-quantized", "weight")
        kinds = {main: "I32" if bits else "I8", "weight_scale": scale_dtype}
        grid, block = formats.scale_grid(dtypes.to_float32(scale, scale_dtype), rows, cols, args)
        zeros = None if zero is None else formats.scale_grid(zero.astype(np.float32), rows, cols, args)[0]
        for start, stop in [(0, rows), (0, 1), (37, 130), (129, 131)]:
            per_row = strategy != "tensor"
            parts = {main: codes[start:stop], "weight_scale": scale[start:stop] if per_row else scale}
            if zero is not None:
                parts["zero"] = zero[start:stop] if per_row else zero
            reference = dtypes.from_float32(formats.decode(fmt, parts, kinds, args, cols, start), dtype)
            ours = ct_native.int_dense(codes[start:stop], bits, cols, grid, zeros, block, start, scale_dtype, dtype)
            assert ours.dtype == reference.dtype and np.array_equal(ours.view(np.uint8), reference.view(np.uint8)), (cols, start)


def test_int_dense_refuses_wrong_lengths():
    words, scales = np.zeros((4, 2), np.int32), np.zeros((4, 1), np.float32)
    with pytest.raises(ValueError, match="scales"):
        native.kernels.ct_int_dense(words, 4, False, 16, np.zeros(3, np.float32), np.zeros(0, np.float32), 1, 16, 0, 0, 0,
                                    np.zeros(64, np.uint16), 1)  # fmt: skip
    with pytest.raises(ValueError, match="zeros"):
        native.kernels.ct_int_dense(words, 4, False, 16, scales, np.zeros(3, np.float32), 1, 16, 0, 0, 0, np.zeros(64, np.uint16), 1)
    with pytest.raises(ValueError, match="dense"):
        native.kernels.ct_int_dense(words, 4, False, 16, scales, np.zeros(0, np.float32), 1, 16, 0, 0, 0, np.zeros(63, np.uint16), 1)
    with pytest.raises(ValueError, match="e2m1"):
        native.kernels.ct_int_dense(words, 8, True, 16, scales, np.zeros(0, np.float32), 1, 16, 0, 0, 0, np.zeros(64, np.uint16), 1)
    with pytest.raises(ValueError, match="bits"):
        native.kernels.ct_int_dense(words, 2, False, 16, scales, np.zeros(0, np.float32), 1, 16, 0, 0, 0, np.zeros(64, np.uint16), 1)


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
@pytest.mark.parametrize("dtype", DENSE)
@pytest.mark.parametrize("fmt", ["nvfp4-pack-quantized", "mxfp4-pack-quantized"])
def test_fp4_dense_equals_the_ct_reference(dtype, fmt):
    """ct.native.int_dense on fp4 bytes (every nibble, every scale code: NaN e4m3, e8m0 0 and 255) against
    formats.decode; width 576, chunks from any row."""
    rng = np.random.default_rng(len(fmt) + len(dtype))
    rows, cols, group = 300, 576, 16 if fmt.startswith("nv") else 32
    packed = rng.integers(0, 256, (rows, cols // 2), dtype=np.uint8)
    packed[0, :256] = np.arange(256)
    codes = rng.integers(0, 256, (rows, cols // group), dtype=np.uint8)
    codes[:, 0] = np.arange(rows) % 256
    parts = {"weight_packed": packed, "weight_scale": codes}
    kinds = {"weight_packed": "U8", "weight_scale": "F8_E4M3" if fmt.startswith("nv") else "U8", "weight_global_scale": "F32"}
    if fmt.startswith("nv"):
        parts["weight_global_scale"] = np.array([np.float32(448 * 6) / np.float32(3.7)], np.float32)
    args = {"strategy": "tensor_group" if fmt.startswith("nv") else "group", "group_size": group}
    for start, stop in [(0, rows), (37, 299), (299, 300)]:
        chunk = {**parts, "weight_packed": packed[start:stop], "weight_scale": codes[start:stop]}
        reference = dtypes.from_float32(formats.decode(fmt, chunk, kinds, args, cols, start), dtype)
        scales = formats.scale_values(fmt, codes[start:stop], parts, kinds)
        ours = ct_native.int_dense(packed[start:stop].view(np.uint32), 4, cols, scales, None, (1, group), 0, "BF16", dtype, e2m1=True)
        assert np.array_equal(ours.view(np.uint8), reference.view(np.uint8)), (start, stop)
