"""compressed-tensors weight formats decoded in numpy, to the values compressed-tensors 0.19's own
decompression gives (bit for bit, checked against the library): float-quantized (FP8), int-quantized /
naive-quantized, pack-quantized (INT4 / INT8 in int32 words, zero points packed along the output
dimension), nvfp4-pack-quantized and mxfp4-pack-quantized.

The library computes `(q - zero) * scale` in the scale's dtype S, rounding each step to S; the two fp4
formats decompress to bfloat16 (NVFP4: e2m1 x float32(scale / global scale), rounded to bf16 once).
Every function takes one row chunk of the stored tensors and returns float32 values of the library's dtype.
"""

from __future__ import annotations

import numpy as np

from quantkit.dtypes import round_to, to_float32
from quantkit.errors import QuantkitError
from quantkit.numerics import E8M0_VALUES, FP8_E4M3_VALUES, unpack_fp4

FORMATS = ("float-quantized", "int-quantized", "naive-quantized", "pack-quantized", "nvfp4-pack-quantized",
           "mxfp4-pack-quantized")  # fmt: skip
FP4_FORMATS = ("nvfp4-pack-quantized", "mxfp4-pack-quantized")


def unpack_int32(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """Rows of int32 words -> the stored unsigned fields [rows, cols] (element j at bit j * bits, lowest first,
    straddling words where 32 is not a multiple of bits)."""
    words = np.ascontiguousarray(packed).view(np.uint32)
    rows = words.shape[0]
    if 8 % bits == 0:  # fields never straddle a byte
        data = words.astype("<u4", copy=False).view(np.uint8)
        per_byte = 8 // bits
        out = np.empty((rows, data.shape[1] * per_byte), np.int32)
        for k in range(per_byte):
            out[:, k::per_byte] = (data >> (k * bits)) & ((1 << bits) - 1)
        return out[:, :cols]
    wide = np.concatenate([words, np.zeros((rows, 1), np.uint32)], axis=1).astype(np.uint64)
    bit = np.arange(cols, dtype=np.int64) * bits
    pairs = wide[:, bit // 32] | (wide[:, bit // 32 + 1] << np.uint64(32))
    return ((pairs >> (bit % 32).astype(np.uint64)) & np.uint64((1 << bits) - 1)).astype(np.int32)


def unpack_zero_points(packed: np.ndarray, bits: int, rows: int) -> np.ndarray:
    """Zero points packed along the output dimension [ceil(rows * bits / 32), groups] -> signed [rows, groups]."""
    return unpack_int32(np.ascontiguousarray(packed.T), bits, rows).T - (1 << (bits - 1))


def expand(scale: np.ndarray, rows: int, cols: int, args: dict, row_start: int) -> np.ndarray:
    """A scale (or zero point) of strategy tensor / channel / group / tensor_group / block, broadcast to
    [rows, cols] for the rows from `row_start` (scale rows already sliced for per-row strategies)."""
    strategy = args.get("strategy")
    if strategy == "block":
        height, width = args["block_structure"]
        band = scale[np.arange(row_start, row_start + rows) // height]
        return np.repeat(band, width, axis=1)[:, :cols]
    if strategy in ("group", "tensor_group") and scale.size > 1:
        return np.repeat(scale.reshape(rows, -1), args["group_size"], axis=1)[:, :cols]
    return scale.reshape(-1, 1) if scale.size == rows and scale.size > 1 else scale.reshape(1, 1)


def scale_grid(scale: np.ndarray, rows: int, cols: int, args: dict, name: str = "weight_scale") -> tuple[np.ndarray, tuple[int, int]]:
    """A whole scale as `expand` reads it, as a 2-D grid and the block each entry covers: the scale of
    element (r, c) is grid[r // block[0], c // block[1]] (for the native kernels, which take any chunk of rows)."""
    strategy = args.get("strategy")
    if strategy == "block":
        height, width = args["block_structure"]
        grid, block = (-(-rows // height), -(-cols // width)), (height, width)
    elif strategy in ("group", "tensor_group") and scale.size > 1:
        grid, block = (rows, -(-cols // args["group_size"])), (1, args["group_size"])
    elif scale.size == rows and scale.size > 1:
        grid, block = (rows, 1), (1, cols)
    else:
        grid, block = (1, 1), (max(rows, 1), cols)
    if scale.size != grid[0] * grid[1]:
        raise QuantkitError(f"{name} holds {scale.size} values where a {rows} x {cols} weight of strategy {strategy!r} "
                            f"has {grid[0] * grid[1]}")
    return scale.reshape(grid), block


def affine(q: np.ndarray, scale: np.ndarray, scale_dtype: str, zero: np.ndarray | None, args: dict, row_start: int) -> np.ndarray:
    """compressed-tensors' _dequantize in S: round_S(round_S(q - zero) * scale), q exact in S."""
    rows, cols = q.shape
    x = round_to(q, scale_dtype)
    if zero is not None:
        x = round_to(x - expand(round_to(zero, scale_dtype), rows, cols, args, row_start), scale_dtype)
    return round_to(x * expand(scale, rows, cols, args, row_start), scale_dtype)


def scale_values(fmt: str, scale: np.ndarray, parts: dict[str, np.ndarray], dtypes: dict[str, str]) -> np.ndarray:
    """The float32 factors of stored `scale` (all or some of a module's weight_scale): E8M0 powers of two
    (mxfp4), e4m3 values over the global scale (nvfp4), else values of the scale's dtype S."""
    if fmt == "mxfp4-pack-quantized":
        return E8M0_VALUES[scale]
    if fmt == "nvfp4-pack-quantized":
        values = FP8_E4M3_VALUES[scale]
        if "weight_global_scale" in parts:
            values = values / to_float32(parts["weight_global_scale"], dtypes["weight_global_scale"]).reshape(1, 1)
        return values
    return to_float32(scale, dtypes["weight_scale"])


def decode(fmt: str, parts: dict[str, np.ndarray], dtypes: dict[str, str], args: dict, cols: int, row_start: int) -> np.ndarray:
    """One row chunk of a module: `parts` holds its stored tensors (per-row ones sliced to the chunk, block
    scales and packed zero points whole), `dtypes` their safetensors dtypes."""
    scale = scale_values(fmt, parts["weight_scale"], parts, dtypes)
    if fmt in FP4_FORMATS:
        values = unpack_fp4(parts["weight_packed"])
        return round_to(values * expand(scale, values.shape[0], cols, args, row_start), "BF16")
    scale_dtype = dtypes["weight_scale"]
    zero = parts.get("zero")
    if fmt == "pack-quantized":
        bits = args["num_bits"]
        q = (unpack_int32(parts["weight_packed"], bits, cols) - (1 << (bits - 1))).astype(np.float32)
    elif dtypes["weight"] == "F8_E4M3":
        q = FP8_E4M3_VALUES[parts["weight"]]
    else:
        q = parts["weight"].astype(np.float32)
    return affine(q, scale, scale_dtype, zero, args, row_start)
