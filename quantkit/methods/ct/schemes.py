"""The compressed-tensors schemes llm-compressor's presets name (FP8_DYNAMIC, FP8_BLOCK, W4A16, W4A16_ASYM,
W8A16, NVFP4A16, MXFP4A16): their tensors, their quantization_config, and the weight arithmetic in numpy.

The arithmetic is what compressed-tensors 0.19 does in torch on CPU, re-derived: torch works in the weight's
own dtype S, so every step on bf16 / fp16 values is a float32 operation rounded to S (`round_to`), double
roundings included. Observers take min(min, 0) and max(max, 0) of the group, row or block; a zero scale
becomes finfo(S).eps (0.125 for an fp8 scale, 1 for an MX exponent). All functions take float32 rows
[rows, in] holding values of S and return the stored arrays of those rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantkit.dtypes import EPS, TINY, from_float32, round_to
from quantkit.numerics import FP8_E4M3_MAX, FP8_E4M3_VALUES, fp4_e2m1_codes, fp8_e4m3_bits, pack_fp4

CT_VERSION = "0.19.0"  # the compressed-tensors release whose config and arithmetic this matches
FP8_BLOCK = 128  # FP8_BLOCK's weight blocks are 128 x 128
FP4_MAX = np.float32(6.0)
NVFP4_GLOBAL = np.float32(448.0 * 6.0)  # fp8 max x fp4 max
NVFP4_EPS_CODE = np.uint8(0x20)  # 0.125 in e4m3: what a zero NVFP4 group scale becomes


@dataclass(frozen=True)
class Scheme:
    """One preset: the CLI method, the config group's name and format, its weight (and activation)
    arguments, the columns per scale (None: a row or a block), and the rows a chunk must hold whole."""

    method: str
    name: str
    format: str
    weights: dict
    input_activations: dict | None = None
    group_size: int | None = None
    row_unit: int = 1

    @property
    def bits(self) -> int:
        return self.weights["num_bits"]

    @property
    def symmetric(self) -> bool:
        return self.weights.get("symmetric", True)


def quantization_args(num_bits: int, type_: str, strategy: str, **fields: object) -> dict:
    """A QuantizationArgs as compressed-tensors 0.19 serialises it (every field, defaults included)."""
    args = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": None, "num_bits": num_bits,
            "observer": None, "observer_kwargs": {}, "scale_dtype": None, "strategy": strategy, "symmetric": True,
            "type": type_, "zp_dtype": None}  # fmt: skip
    args.update(fields)
    return args


def _int_weights(bits: int, group_size: int, symmetric: bool = True) -> dict:
    extra = {} if symmetric else {"symmetric": False, "zp_dtype": "torch.int8"}
    return quantization_args(bits, "int", "group", group_size=group_size, **extra)


SCHEMES = {s.method: s for s in (
    Scheme("fp8", "FP8_DYNAMIC", "float-quantized", quantization_args(8, "float", "channel"),
           quantization_args(8, "float", "token", dynamic=True)),
    Scheme("fp8-block", "FP8_BLOCK", "float-quantized",
           quantization_args(8, "float", "block", block_structure=[FP8_BLOCK, FP8_BLOCK]),
           quantization_args(8, "float", "group", dynamic=True, group_size=128), FP8_BLOCK, FP8_BLOCK),
    Scheme("w4a16", "W4A16", "pack-quantized", _int_weights(4, 128), None, 128),
    Scheme("w4a16-asym", "W4A16_ASYM", "pack-quantized", _int_weights(4, 128, symmetric=False), None, 128),
    Scheme("w8a16", "W8A16", "pack-quantized", _int_weights(8, 128), None, 128),
    Scheme("nvfp4a16", "NVFP4A16", "nvfp4-pack-quantized",
           quantization_args(4, "float", "tensor_group", group_size=16, scale_dtype="torch.float8_e4m3fn"), None, 16),
    Scheme("mxfp4a16", "MXFP4A16", "mxfp4-pack-quantized",
           quantization_args(4, "float", "group", group_size=32, scale_dtype="torch.uint8"), None, 32),
)}  # fmt: skip
INT_METHODS = ("w4a16", "w4a16-asym", "w8a16")  # the ones whose group size is a setting


def quantization_config(scheme: Scheme, group_size: int, ignore: list[str]) -> dict:
    """config.json's quantization_config, as llm-compressor 0.14 writes it for this preset."""
    weights = dict(scheme.weights, group_size=group_size) if scheme.method in INT_METHODS else scheme.weights
    return {
        "config_groups": {scheme.name: {"format": scheme.format, "input_activations": scheme.input_activations,
                                        "output_activations": None, "targets": ["Linear"], "weights": weights}},
        "format": scheme.format,
        "global_compression_ratio": None,
        "ignore": list(ignore),
        "kv_cache_scheme": None,
        "quant_method": "compressed-tensors",
        "quantization_status": "compressed",
        "transform_config": {},
        "version": CT_VERSION,
    }  # fmt: skip


def layout(scheme: Scheme, shape: tuple[int, int], dtype: str, group_size: int) -> list[tuple[str, str, tuple[int, ...]]]:
    """(suffix, dtype, shape) of each tensor a [out, in] weight of dtype S becomes, in the order written:
    the row-streamed tensor first, then the companions."""
    rows, cols = shape
    if scheme.method == "fp8":
        return [("weight", "F8_E4M3", shape), ("weight_scale", dtype, (rows, 1))]
    if scheme.method == "fp8-block":
        return [("weight", "F8_E4M3", shape), ("weight_scale", dtype, (-(-rows // FP8_BLOCK), -(-cols // FP8_BLOCK)))]
    if scheme.method in INT_METHODS:
        parts = [("weight_packed", "I32", (rows, -(-cols * scheme.bits // 32))), ("weight_scale", dtype, (rows, cols // group_size)),
                 ("weight_shape", "I64", (2,))]  # fmt: skip
        if not scheme.symmetric:
            parts.append(("weight_zero_point", "I32", (-(-rows * scheme.bits // 32), cols // group_size)))
        return parts
    scale = ("weight_scale", "F8_E4M3" if scheme.method == "nvfp4a16" else "U8", (rows, cols // scheme.group_size))
    tail = [("weight_global_scale", "F32", (1,))] if scheme.method == "nvfp4a16" else []
    return [("weight_packed", "U8", (rows, cols // 2)), scale, *tail]


def unfit(scheme: Scheme, shape: tuple[int, int], group_size: int) -> str | None:
    """Why a [out, in] weight cannot take the scheme (None when it can); such a module stays dense."""
    columns = FP8_BLOCK if scheme.method == "fp8-block" else group_size if scheme.group_size else None
    if columns and shape[1] % columns:
        return f"input features not a multiple of {columns}"
    return None


# ------------------------------------------------------------------------------------------- arithmetic


def _absmax(x: np.ndarray, axis) -> np.ndarray:
    return np.maximum(-np.minimum(x.min(axis=axis), 0), np.maximum(x.max(axis=axis), 0))


def _nonzero(scale: np.ndarray, dtype: str) -> np.ndarray:
    return np.where(scale == 0, EPS[dtype], scale).astype(np.float32)


def _fp8(x: np.ndarray, scale: np.ndarray, dtype: str) -> np.ndarray:
    return fp8_e4m3_bits(np.clip(round_to(x / scale, dtype), -FP8_E4M3_MAX, FP8_E4M3_MAX))


def fp8_channel(w: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """FP8_DYNAMIC: scale = absmax(row) / 448 per output row; codes fp8(clamp(w / scale))."""
    scale = _nonzero(round_to(_absmax(w, 1) / FP8_E4M3_MAX, dtype), dtype)[:, None]
    return _fp8(w, scale, dtype), scale


def fp8_block(w: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """FP8_BLOCK on rows that start on a block boundary: one scale per 128 x 128 block (edge blocks ragged:
    torch pads with zeros, which change no absmax). Returns codes [rows, in] and scales [row blocks, col blocks]."""
    rows, cols = w.shape
    pad_rows, pad_cols = -rows % FP8_BLOCK, -cols % FP8_BLOCK
    padded = np.pad(w, ((0, pad_rows), (0, pad_cols))) if pad_rows or pad_cols else w
    blocks = padded.reshape(padded.shape[0] // FP8_BLOCK, FP8_BLOCK, padded.shape[1] // FP8_BLOCK, FP8_BLOCK)
    scale = _nonzero(round_to(_absmax(blocks, (1, 3)) / FP8_E4M3_MAX, dtype), dtype)
    codes = _fp8(blocks, scale[:, None, :, None], dtype).reshape(padded.shape)[:rows, :cols]
    return np.ascontiguousarray(codes), scale


def _grouped(w: np.ndarray, group_size: int) -> np.ndarray:
    return w.reshape(w.shape[0], w.shape[1] // group_size, group_size)


def int_symmetric(w: np.ndarray, dtype: str, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """W4A16 / W8A16: scale = absmax / (2**bits - 1) * 2; codes rint(clamp(w / scale)) in [-2**(b-1), 2**(b-1))."""
    groups = _grouped(w, group_size)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    scale = _nonzero(round_to(_absmax(groups, 2) / np.float32((qmax - qmin) / 2), dtype), dtype)
    codes = np.rint(np.clip(round_to(groups / scale[:, :, None], dtype), qmin, qmax)).astype(np.int8)
    return codes.reshape(w.shape), scale


def int_asymmetric(w: np.ndarray, dtype: str, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """W4A16_ASYM: scale = (max - min) / 15, zero point rint(-8 - min / scale) (from the scale before the eps
    substitution: an all-zero group gives NaN, stored as 0); codes rint(clamp(w / scale + zero point))."""
    groups = _grouped(w, group_size)
    qmin, qmax = np.float32(-(2 ** (bits - 1))), np.float32(2 ** (bits - 1) - 1)
    low, high = np.minimum(groups.min(axis=2), 0), np.maximum(groups.max(axis=2), 0)
    scale = round_to(round_to(high - low, dtype) / (qmax - qmin), dtype)
    with np.errstate(divide="ignore", invalid="ignore"):
        zero = np.rint(np.clip(round_to(qmin - round_to(low / scale, dtype), dtype), qmin, qmax))
    zero = np.where(np.isnan(zero), 0, zero).astype(np.int8)
    scale = _nonzero(scale, dtype)
    shifted = round_to(round_to(groups / scale[:, :, None], dtype) + zero[:, :, None], dtype)
    codes = np.rint(np.clip(shifted, qmin, qmax)).astype(np.int8)
    return codes.reshape(w.shape), scale, zero


def pack_int32(codes: np.ndarray, bits: int) -> np.ndarray:
    """compressed-tensors' pack_to_int32 along rows: codes + 2**(bits-1), element j of a row at bit
    (j * bits) % 32 of word (j * bits) // 32, rows zero-padded to whole words. bits: 4 or 8."""
    rows, cols = codes.shape
    per_word = 32 // bits
    stored = (codes.astype(np.int32) + (1 << (bits - 1))).astype(np.uint32)
    if cols % per_word:
        stored = np.pad(stored, ((0, 0), (0, -cols % per_word)))
    stored = stored.reshape(rows, -1, per_word) << (np.arange(per_word, dtype=np.uint32) * bits)
    return np.bitwise_or.reduce(stored, axis=2).view(np.int32)


def pack_zero_points(zero: np.ndarray, bits: int) -> np.ndarray:
    """Zero points [out, groups] packed along the output dimension: [ceil(out * bits / 32), groups]."""
    return np.ascontiguousarray(pack_int32(np.ascontiguousarray(zero.T), bits).T)


def nvfp4_global_scale(absmax: float, dtype: str) -> np.float32:
    """The tensor-wide NVFP4 scale 448 * 6 / absmax, as torch evaluates `2688.0 / t` in S: the reciprocal
    rounded to S, times 2688 rounded to S (absmax at least finfo(S).tiny; inf or NaN -> 1)."""
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        reciprocal = round_to(np.float32(1.0) / np.maximum(np.float32(absmax), TINY[dtype]), dtype)
        scale = np.float32(round_to(np.atleast_1d(reciprocal * NVFP4_GLOBAL), dtype)[0])
    return scale if np.isfinite(scale) else np.float32(1.0)


def nvfp4(w: np.ndarray, dtype: str, global_scale: np.float32) -> tuple[np.ndarray, np.ndarray]:
    """NVFP4A16: groups of 16, each an fp8 scale fp8(global * absmax / 6) (0 -> 0.125); values
    e2m1(clamp(w / (scale / global), +-6)) in float32."""
    groups = _grouped(w, 16)
    local = round_to(_absmax(groups, 2) / FP4_MAX, dtype)
    scale_codes = fp8_e4m3_bits(np.clip(global_scale * local, -FP8_E4M3_MAX, FP8_E4M3_MAX))
    scale_codes = np.where(scale_codes == 0, NVFP4_EPS_CODE, scale_codes)
    divisor = FP8_E4M3_VALUES[scale_codes] / global_scale
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.clip(groups / divisor[:, :, None], -FP4_MAX, FP4_MAX)
    return pack_fp4(fp4_e2m1_codes(values.reshape(w.shape))), scale_codes


def _round_to_power_2(x: np.ndarray, dtype: str) -> np.ndarray:
    """compressed-tensors' round_to_power_2 on S's bits: add half an fp4 mantissa step, keep sign and
    exponent (a mantissa of 0.75 or more carries into the next power of two)."""
    mantissa = {"BF16": 7, "F16": 10, "F32": 23}[dtype]
    bits = from_float32(x, dtype).view({"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32}[dtype]).astype(np.int64)
    bits = (bits + (1 << (mantissa - 2))) & ~((1 << mantissa) - 1)
    if dtype == "F32":
        return bits.astype(np.uint32).view(np.float32)
    stored = bits.astype(np.uint16)
    return (stored.astype(np.uint32) << 16).view(np.float32) if dtype == "BF16" else stored.view(np.float16).astype(np.float32)


def mxfp4(w: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """MXFP4A16: groups of 32, each a power-of-two scale 2**(floor(log2(round_to_power_2(absmax))) - 2)
    stored as its biased exponent (127 = 1); values e2m1(clamp(w / scale, +-6))."""
    groups = _grouped(w, 32)
    with np.errstate(divide="ignore"):
        exponent = np.floor(np.log2(_round_to_power_2(_absmax(groups, 2), dtype)))
    biased = np.clip(np.float32(125.0) + exponent, 0, 255).astype(np.int32)
    with np.errstate(over="ignore"):
        scale = round_to(np.ldexp(np.float32(1.0), biased - 127).astype(np.float32), dtype)
    scale = np.where(scale == 0, np.float32(1.0), scale)  # fp16 underflow: finfo(uint8).eps is 1
    values = np.clip(round_to(groups / scale[:, :, None], dtype), -FP4_MAX, FP4_MAX).reshape(w.shape)
    # The stored exponent is 127 + floor(log2(scale)) in int32, low byte kept: an fp16 scale that
    # overflowed to inf casts to INT_MIN and stores 127.
    with np.errstate(divide="ignore", over="ignore"):
        log2 = np.floor(np.log2(scale.astype(np.float64)))
    stored = np.where(np.isfinite(log2), log2, -(2.0**31)).astype(np.int64) + 127
    return pack_fp4(fp4_e2m1_codes(values)), (stored & 0xFF).astype(np.uint8)


def global_absmax(w: np.ndarray) -> float:
    """max |w| of a chunk (NVFP4's global scale takes it over a fused set: q/k/v, gate/up)."""
    return float(_absmax(w, None)) if w.size else 0.0

