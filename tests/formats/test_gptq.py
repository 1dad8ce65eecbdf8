"""GPTQ / AWQ packing against an unpacker written here from the published layout (not quantkit's),
v1 <-> v2 zero points, version inference, and the config dict loaders read."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from quantkit.errors import QuantkitError
from quantkit.methods.gptq import groupwise as gw
from quantkit.methods.gptq import layout as gptq


def spec_unpack_along_rows(words: np.ndarray, bits: int) -> np.ndarray:
    """GPTQ qweight: word [r, c] holds input rows r*f .. r*f+f-1 of column c, row r*f+k in bits k*bits.."""
    f = 32 // bits
    out = np.zeros((words.shape[0] * f, words.shape[1]), np.int64)
    for r in range(words.shape[0]):
        for c in range(words.shape[1]):
            word = int(words[r, c]) & 0xFFFFFFFF
            for k in range(f):
                out[r * f + k, c] = (word >> (k * bits)) & (2**bits - 1)
    return out


def spec_unpack_along_columns(words: np.ndarray, bits: int) -> np.ndarray:
    return spec_unpack_along_rows(words.T, bits).T


def spec_dequantize_gptq(t: dict, bits: int, version: str) -> np.ndarray:
    """w[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o]); v1 stores zero - 1."""
    q = spec_unpack_along_rows(t["qweight"], bits)
    zeros = spec_unpack_along_columns(t["qzeros"], bits) + (1 if version == "v1" else 0)
    scales = t["scales"].astype(np.float64)
    out = np.zeros((q.shape[1], q.shape[0]))
    for i in range(q.shape[0]):
        g = t["g_idx"][i]
        out[:, i] = scales[g] * (q[i] - zeros[g])
    return out


def pack(w: np.ndarray, bits: int, group_size: int, sym: bool, version: str) -> dict[str, np.ndarray]:
    q = gw.quantize(w, bits, group_size, sym, 1 if (version == "v1" and not sym) else 0)
    return {
        "qweight": gptq.pack_qweight(q.codes, bits),
        "qzeros": gptq.pack_qzeros(q.zeros, bits, version),
        "scales": q.scales.T.astype(np.float16),
        "g_idx": gptq.group_index(w.shape[1], group_size),
    }, q


@pytest.mark.parametrize("bits", gw.SUPPORTED_BITS)
@pytest.mark.parametrize("sym,version", [(True, "v1"), (True, "v2"), (False, "v1"), (False, "v2")])
def test_packed_layout_matches_the_spec(bits, sym, version):
    w = np.random.default_rng(bits).normal(0, 0.02, (32, 64)).astype(np.float32)
    tensors, q = pack(w, bits, 32, sym, version)
    assert tensors["qweight"].dtype == np.int32 and tensors["qweight"].shape == (64 * bits // 32, 32)
    assert np.array_equal(spec_unpack_along_rows(tensors["qweight"], bits), q.codes.T)
    stored = spec_unpack_along_columns(tensors["qzeros"], bits)
    assert np.array_equal(stored, q.zeros.T.astype(np.int64) - (1 if version == "v1" else 0))
    expected = (q.codes.astype(np.float64) - np.repeat(q.zeros, 32, axis=1)) * np.repeat(q.scales, 32, axis=1)
    assert np.array_equal(spec_dequantize_gptq(tensors, bits, version), expected)
    assert np.allclose(gptq.dequantize_gptq(tensors, bits, version, "m"), expected, rtol=0, atol=0)


def test_symmetric_zero_points_as_loaders_expect():
    tensors, _ = pack(np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32), 4, 32, True, "v1")
    assert np.all(spec_unpack_along_columns(tensors["qzeros"], 4) == 7)
    assert np.all(tensors["qzeros"].view(np.uint32) == 0x77777777)
    assert gptq.infer_version(tensors["qzeros"], 4, True) == "v1"
    v2 = gptq.convert_qzeros(tensors["qzeros"], 4, "v1", "v2", "m")
    assert np.all(v2.view(np.uint32) == 0x88888888)
    assert gptq.infer_version(v2, 4, True) == "v2"
    assert gptq.infer_version(gptq.pack_columns(np.full((2, 8), 3, np.uint8), 4), 4, True) is None


def test_act_order_g_idx_dequantizes_per_feature():
    rng = np.random.default_rng(1)
    tensors, _ = pack(rng.normal(size=(16, 64)).astype(np.float32), 4, 16, False, "v2")
    tensors["g_idx"] = rng.integers(0, 4, 64).astype(np.int32)  # act-order: any group per feature
    assert np.allclose(gptq.dequantize_gptq(tensors, 4, "v2", "m"), spec_dequantize_gptq(tensors, 4, "v2"), rtol=0, atol=0)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([2, 4, 8]), st.integers(1, 4), st.integers(1, 5), st.integers(0, 2**32 - 1))
def test_pack_unpack_round_trip(bits, words, cols, seed):
    rng = np.random.default_rng(seed)
    codes = rng.integers(0, 2**bits, (words * 32 // bits, cols)).astype(np.uint8)
    packed = gptq.pack_rows(codes, bits)
    assert np.array_equal(gptq.unpack_rows(packed, bits), codes)
    assert np.array_equal(spec_unpack_along_rows(packed, bits), codes)
    assert np.array_equal(gptq.unpack_columns(gptq.pack_columns(codes.T, bits), bits), codes.T)


@settings(max_examples=40, deadline=None)
@given(st.sampled_from([2, 4, 8]), st.booleans(), st.integers(0, 2**32 - 1))
def test_v1_v2_v1_is_byte_identical(bits, sym, seed):
    rng = np.random.default_rng(seed)
    zeros = rng.integers(1, 2**bits, (3, 32)).astype(np.uint8)
    v1 = gptq.pack_qzeros(zeros.T, bits, "v1")
    v2 = gptq.convert_qzeros(v1, bits, "v1", "v2", "m")
    assert np.array_equal(gptq.zero_points(v2, bits, "v2"), zeros)
    assert gptq.convert_qzeros(v2, bits, "v2", "v1", "m").tobytes() == v1.tobytes()
    assert gptq.convert_qzeros(v1, bits, "v1", "v1", "m") is v1


def test_v2_zero_point_zero_cannot_become_v1():
    zeros = np.full((2, 16), 5, np.uint8)
    zeros[1, 3] = 0
    v2 = gptq.pack_columns(zeros, 4)
    with pytest.raises(QuantkitError, match="model.layers.0.mlp.up_proj: a zero point is 0"):
        gptq.convert_qzeros(v2, 4, "v2", "v1", "model.layers.0.mlp.up_proj")
    with pytest.raises(QuantkitError, match="zero point of 0"):
        gptq.pack_qzeros(zeros.T, 4, "v1")


def test_v1_field_at_the_top_is_refused():
    v1 = gptq.pack_columns(np.full((1, 8), 15, np.uint8), 4)  # zero point 16 at 4 bits
    with pytest.raises(QuantkitError, match="down_proj"):
        gptq.convert_qzeros(v1, 4, "v1", "v2", "down_proj")
    assert gptq.infer_version(v1, 4, False) == "v2"


def spec_unpack_awq(words: np.ndarray) -> np.ndarray:
    """AWQ GEMM: word [r, c] holds columns c*8 + (0, 2, 4, 6, 1, 3, 5, 7) in nibbles 0..7."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    out = np.zeros((words.shape[0], words.shape[1] * 8), np.int64)
    for r in range(words.shape[0]):
        for c in range(words.shape[1]):
            word = int(words[r, c]) & 0xFFFFFFFF
            for k in range(8):
                out[r, c * 8 + order[k]] = (word >> (4 * k)) & 15
    return out


def test_awq_dequantize_matches_the_spec():
    rng = np.random.default_rng(2)
    codes = rng.integers(0, 16, (64, 24)).astype(np.uint8)  # [in, out]
    zeros = rng.integers(0, 16, (2, 24)).astype(np.uint8)
    scales = rng.uniform(0.001, 0.01, (2, 24)).astype(np.float16)
    tensors = {"qweight": gptq.pack_awq(codes), "qzeros": gptq.pack_awq(zeros), "scales": scales}
    assert np.array_equal(spec_unpack_awq(tensors["qweight"]), codes)
    assert np.array_equal(gptq.unpack_awq(tensors["qweight"]), codes)
    z = spec_unpack_awq(tensors["qzeros"])
    expected = ((codes - np.repeat(z, 32, axis=0)) * np.repeat(scales.astype(np.float32), 32, axis=0)).T
    assert np.array_equal(gptq.dequantize_awq(tensors, 32, "m"), expected.astype(np.float32))


def test_shape_problems_are_named():
    tensors, _ = pack(np.zeros((32, 64), np.float32), 4, 32, True, "v2")
    spec = {k: ({np.int32: "I32", np.float16: "F16"}[v.dtype.type], v.shape) for k, v in tensors.items()}
    assert gptq.companion_problem(spec, 4, 32) is None
    assert gptq.companion_problem({**spec, "scales": ("BF16", spec["scales"][1])}, 4, 32) is None
    assert "scales has shape" in gptq.companion_problem(spec, 4, 16)
    assert "qweight is F32, expected I32" in gptq.companion_problem({**spec, "qweight": ("F32", (8, 32))}, 4)
    assert "scales is I16, expected F16 or BF16 or F32" in gptq.companion_problem({**spec, "scales": ("I16", (2, 32))}, 4)
    assert gptq.companion_problem({k: v for k, v in spec.items() if k != "g_idx"}, 4) == "missing g_idx"
    with pytest.raises(QuantkitError, match="^proj: g_idx points outside"):
        gptq.dequantize_gptq({**tensors, "g_idx": np.full(64, 9, np.int32)}, 4, "v2", "proj")


def test_config_declares_both_format_keys():
    config = gptq.quantization_config(4, 128, False, "v2", ("model.layers.0.mlp.down_proj",))
    assert config["quant_method"] == "gptq" and config["desc_act"] is False and config["sym"] is False
    assert config["checkpoint_format"] == config["format"] == "gptq_v2"
    assert config["dynamic"] == {r"-:^model\.layers\.0\.mlp\.down_proj$": {}}
    back = gptq.read_config(config)
    assert (back.method, back.bits, back.group_size, back.sym, back.version) == ("gptq", 4, 128, False, "v2")
    v1 = gptq.with_version(config, "v1")
    assert v1["checkpoint_format"] == v1["format"] == "gptq" and gptq.read_config(v1).version == "v1"
    assert gptq.read_config({"quant_method": "bitsandbytes"}) is None
    awq = gptq.read_config({"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"})
    assert (awq.method, awq.sym, awq.version) == ("awq", False, None)
    with pytest.raises(QuantkitError, match="checkpoint_format"):
        gptq.read_config({**config, "checkpoint_format": "marlin"})


# ---- the C kernel that turns GPTQ modules back into dense rows --------------------------------------


def random_module(rng, bits: int, sym: bool, version: str, g_idx: str, scale_dtype: str, in_features: int = 320,
                  out_features: int = 80) -> dict[str, np.ndarray]:  # fmt: skip
    """GPTQ companions as the reader holds them (scales as float32 values of `scale_dtype`), every stored
    zero-point field used (v1's top field is a zero point of 2**bits), odd scales: negative, float16
    subnormal, large, an infinity and a NaN."""
    from quantkit import dtypes

    maxq = 2**bits - 1
    codes = rng.integers(0, maxq + 1, (in_features, out_features)).astype(np.uint8)
    size = {"whole": in_features, "128": 128, "32": 32}.get(g_idx, 32)
    groups = -(-in_features // size)  # a short last group where size does not divide in_features
    mid = 2 ** (bits - 1) - (1 if version == "v1" else 0)
    stored = np.full((groups, out_features), mid) if sym else rng.integers(0, maxq + 1, (groups, out_features))
    scales = rng.normal(0, 0.01, (groups, out_features)).astype(np.float32)
    scales.flat[:4] = [-3e-7, 7e3, np.inf, np.nan]
    group_of = (np.arange(in_features) // size).astype(np.int32)
    if g_idx == "act-order":
        group_of = rng.permutation(group_of).astype(np.int32)
    return {"qweight": gptq.pack_rows(codes, bits), "qzeros": gptq.pack_columns(stored.astype(np.uint8), bits),
            "scales": dtypes.to_float32(dtypes.from_float32(scales, scale_dtype), scale_dtype), "g_idx": group_of}  # fmt: skip


@pytest.mark.parametrize("bits", gw.SUPPORTED_BITS)
@pytest.mark.parametrize("sym,version", [(True, "v1"), (True, "v2"), (False, "v1"), (False, "v2")])
@pytest.mark.parametrize("g_idx", ["128", "whole", "act-order"])
def test_dense_kernel_gives_the_reference_bytes(bits, sym, version, g_idx):
    """native.dense_rows == dtypes.from_float32(layout.dequantize_gptq(...)) bit for bit: 320 inputs (not a
    multiple of 128: the last group of 128 is short), 80 outputs, rows taken 7 at a time from row 3 on, scales
    float16 and bfloat16 values, every output dtype; the NaN and infinity among the scales included."""
    from quantkit import dtypes
    from quantkit.methods.gptq import native

    if not native.DENSE_AVAILABLE:
        pytest.fail("the C extension is not built")
    rng = np.random.default_rng(bits * 10 + sym)
    for scale_dtype in ("F16", "BF16"):
        tensors = random_module(rng, bits, sym, version, g_idx, scale_dtype)
        with np.errstate(invalid="ignore", over="ignore"):  # inf * 0, and float16 overflow
            reference = gptq.dequantize_gptq(tensors, bits, version, "m")
        assert np.isnan(reference).any() and np.isinf(reference).any()
        for dtype in ("F32", "BF16", "F16"):
            with np.errstate(over="ignore"):
                want = dtypes.from_float32(reference, dtype)
            got = np.concatenate([native.dense_rows(tensors, bits, version, start, min(7, 80 - start), dtype)
                                  for start in range(3, 80, 7)])  # fmt: skip
            assert got.dtype == want.dtype and got.tobytes() == want[3:].tobytes(), (scale_dtype, dtype)


@pytest.mark.parametrize("bits", gw.SUPPORTED_BITS)
def test_dense_kernel_row_tiles_and_word_blocks(bits):
    """The kernel works 16 rows and 64 words of qweight at a time: 37 rows of 4352 inputs (a short row tile, a
    short word block), and groups of 32 in act-order, give the reference's bytes."""
    from quantkit import dtypes
    from quantkit.methods.gptq import native

    if not native.DENSE_AVAILABLE:
        pytest.fail("the C extension is not built")
    rng = np.random.default_rng(bits)
    for g_idx in ("32", "act-order"):
        tensors = random_module(rng, bits, False, "v2", g_idx, "F16", 4352, 48)
        with np.errstate(invalid="ignore"):
            reference = dtypes.from_float32(gptq.dequantize_gptq(tensors, bits, "v2", "m"), "BF16")
        assert native.dense_rows(tensors, bits, "v2", 11, 37, "BF16").tobytes() == reference[11:].tobytes(), g_idx


def test_dense_kernel_refuses_what_does_not_fit():
    from quantkit.methods.gptq import native

    if not native.DENSE_AVAILABLE:
        pytest.fail("the C extension is not built")
    tensors = random_module(np.random.default_rng(0), 4, True, "v2", "128", "F16")
    with pytest.raises(ValueError, match="outside the 3 groups"):
        native.dense_rows({**tensors, "g_idx": np.full(320, 3, np.int32)}, 4, "v2", 0, 8, "BF16")
    with pytest.raises(ValueError, match="the weight has 80"):
        native.dense_rows(tensors, 4, "v2", 75, 8, "BF16")
    with pytest.raises(ValueError, match="qzeros"):
        native.dense_rows({**tensors, "qzeros": tensors["qzeros"][:2]}, 4, "v2", 0, 8, "BF16")


@pytest.mark.parametrize("group_size,in_features", [(32, 320), (64, 320), (-1, 320), (128, 4352)])
def test_dense_kernel_gives_the_awq_reference_bytes(group_size, in_features):
    """AWQ GEMM through the same kernel (its own packing: along outputs, interleaved) ==
    dtypes.from_float32(layout.dequantize_awq(...)) bit for bit, scales float16 and bfloat16 with an infinity
    and a NaN among them, every output dtype, rows 5 at a time from row 2 on."""
    from quantkit import dtypes
    from quantkit.methods.gptq import native

    if not native.DENSE_AVAILABLE:
        pytest.fail("the C extension is not built")
    rng = np.random.default_rng(in_features + group_size)
    out_features = 56
    groups = 1 if group_size == -1 else in_features // group_size
    for scale_dtype in ("F16", "BF16"):
        scales = rng.normal(0, 0.01, (groups, out_features)).astype(np.float32)
        scales.flat[:3] = [-3e-7, np.inf, np.nan]
        tensors = {"qweight": gptq.pack_awq(rng.integers(0, 16, (in_features, out_features)).astype(np.uint8)),
                   "qzeros": gptq.pack_awq(rng.integers(0, 16, (groups, out_features)).astype(np.uint8)),
                   "scales": dtypes.to_float32(dtypes.from_float32(scales, scale_dtype), scale_dtype)}  # fmt: skip
        with np.errstate(invalid="ignore"):
            reference = gptq.dequantize_awq(tensors, group_size, "m")
        with_groups = {**tensors, "g_idx": gptq.group_index(in_features, group_size)}
        for dtype in ("F32", "BF16", "F16"):
            with np.errstate(over="ignore"):
                want = dtypes.from_float32(reference, dtype)
            got = np.concatenate([native.dense_rows(with_groups, 4, None, start, min(5, out_features - start), dtype, awq=True)
                                  for start in range(2, out_features, 5)])  # fmt: skip
            assert got.tobytes() == want[2:].tobytes(), (scale_dtype, dtype)
