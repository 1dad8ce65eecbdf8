"""NF4 / FP4 / double quant / int8 and torch's float32 mean: numpy reference == bitsandbytes == fast paths."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit import dtypes
from quantkit import numerics as torchsum
from quantkit.methods.bnb import int8, nf4, torch_path
from quantkit.methods.bnb import native as fast  # the compiled (C) path

SHAPES = [(64, 64), (33, 7), (3, 5), (256, 384), (1, 1), (1000, 77)]


def sample(shape, seed, scale=0.02):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * scale).astype(np.float32)
    if seed % 3 == 0:
        x[: max(1, shape[0] // 4)] = 0  # all-zero blocks and rows
    if seed % 4 == 1:
        x.flat[0], x.flat[-1] = 1e-30, -3e-6  # tiny values near code boundaries
    return x


def test_code_tables_match_bitsandbytes():
    import bitsandbytes.functional as F

    for quant_type in ("nf4", "fp4"):
        assert np.array_equal(F.get_4bit_type(quant_type, "cpu").numpy().view(np.uint32), nf4.CODES[quant_type].view(np.uint32))
    assert np.array_equal(F.create_dynamic_map().numpy().view(np.uint32), nf4.DYNAMIC_MAP.view(np.uint32))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(4))
def test_4bit_reference_equals_bitsandbytes(quant_type, shape, seed):
    import bitsandbytes.functional as F
    import torch

    weight = torch.from_numpy(sample(shape, seed)).to(torch.bfloat16)
    packed, state = F.quantize_4bit(weight, blocksize=64, compress_statistics=True, quant_type=quant_type)
    ours, absmax = nf4.quantize_4bit(weight.float().numpy(), 64, quant_type)
    assert np.array_equal(ours, packed.numpy())
    codes, nested_absmax, offset = nf4.double_quantize(absmax)
    assert np.array_equal(codes, state.absmax.numpy())
    assert np.array_equal(nested_absmax, state.state2.absmax.numpy())
    assert float(offset) == state.offset.item()
    restored = nf4.dequantize_absmax(codes, nested_absmax, nf4.DYNAMIC_MAP, float(offset))
    dense = nf4.dequantize_4bit(ours, restored, shape, 64, quant_type)
    expected = F.dequantize_4bit(packed, state).to(torch.float32).numpy()
    assert np.array_equal(dtypes.bf16_bits(dense), dtypes.bf16_bits(expected))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(4))
def test_int8_reference_equals_bitsandbytes(shape, seed):
    import bitsandbytes.functional as F
    import torch

    weight = torch.from_numpy(sample(shape, seed, scale=30.0 if seed % 2 else 0.02)).to(torch.bfloat16)
    codes, scb, _ = F.int8_vectorwise_quant(weight.to(torch.float16))
    ours, our_scb = int8.quantize_int8(weight.float().numpy())
    assert np.array_equal(ours, codes.numpy()) and np.array_equal(our_scb, scb.numpy())
    assert np.array_equal(int8.dequantize_int8(ours, our_scb), F.int8_vectorwise_dequant(codes, scb).numpy())


@pytest.mark.parametrize("dtype", ["BF16", "F16", "F32"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("seed", range(3))
def test_fast_paths_equal_reference(dtype, shape, seed):
    values = sample(shape, seed, scale=2.0 if seed == 2 else 0.02)
    raw = dtypes.from_float32(values, dtype)
    widened = dtypes.to_float32(raw, dtype)
    for quant_type in ("nf4", "fp4"):
        expected = nf4.quantize_4bit(widened, 64, quant_type)
        for kernel in (fast.quantize_4bit, torch_path.quantize_4bit):
            got = kernel(raw, dtype, 64, quant_type)
            assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]), kernel
    expected = int8.quantize_int8(widened)
    for kernel in (fast.quantize_int8, torch_path.quantize_int8):
        got = kernel(raw, dtype)
        assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]), kernel


def test_fast_paths_flag_non_finite_values():
    values = sample((8, 64), 1)
    values[3, 5] = np.nan
    assert np.isnan(fast.quantize_4bit(values, "F32", 64, "nf4")[1]).any()
    values[3, 5] = 70000.0  # beyond float16: LLM.int8 cannot hold it
    assert not np.isfinite(fast.quantize_int8(values, "F32")[1]).all()


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 70), double_quant=st.booleans())
def test_layout_agrees_with_quantize(rows, cols, double_quant):
    """The data-free layout (used by the plan and inspect) predicts exactly what quantize returns."""
    values = sample((rows, cols), rows * cols)
    layout = nf4.layout((rows, cols), 64, double_quant)
    packed, absmax = nf4.quantize_4bit(values, 64, "nf4")
    assert packed.shape == layout[""][1]
    if double_quant:
        codes, nested_absmax, _ = nf4.double_quantize(absmax)
        assert codes.shape == layout[".absmax"][1] and nested_absmax.shape == layout[".nested_absmax"][1]
    else:
        assert absmax.shape == layout[".absmax"][1]
    codes, scb = int8.quantize_int8(values)
    assert (codes.shape, scb.shape) == (int8.layout((rows, cols))["weight"][1], int8.layout((rows, cols))["SCB"][1])


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("n", [1, 7, 8, 33, 255, 4097, 32767, 32768, 100003, 704512])
def test_torch_mean_reproduced(n, threads):
    import torch

    x = np.abs(np.random.default_rng(n).standard_normal(n)).astype(np.float32) * np.float32(0.02)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        expected = torch.from_numpy(x).mean().item()
    finally:
        torch.set_num_threads(previous)
    assert float(torchsum.torch_mean_f32(x, torchsum.cpu_vector_width(), threads)) == expected


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", ["BF16", "F32", "F16"])
def test_fast_dequantize_equals_reference(quant_type, dtype):
    values = sample((96, 70), 5, scale=1.0)
    packed, absmax = nf4.quantize_4bit(values, 64, quant_type)
    table = nf4.decode_table(quant_type, values.shape)
    for first, count in ((0, values.size), (128, 640), (values.size - 17, 17)):
        expected = dtypes.from_float32(nf4.dequantize_range(packed, absmax, table, 64, first, count), dtype)
        assert np.array_equal(fast.dequantize_4bit(packed, absmax, table, 64, first, count, dtype), expected)


def test_thread_and_lane_counts_match_this_torch():
    """The defaults the offset emulation assumes are what torch itself uses here."""
    import torch

    assert torchsum.torch_threads() == torch.get_num_threads()
    assert torchsum.cpu_vector_width() == (16 if torch.backends.cpu.get_cpu_capability() == "AVX512" else 8)
