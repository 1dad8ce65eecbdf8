"""The fine-grained FP8 number format: e4m3fn weights, one float32 `weight_scale_inv` per block of
128 x 128 (the grid is ceil(rows / 128) x ceil(cols / 128): edge blocks are ragged, nothing is padded).

Reading is transformers' CPU dequantization, `(float32(q) * float32(scale_inv)).to(dtype)`; a scale_inv
stored as bf16 / f16 widens exactly, one stored as uint8 is an e8m0 exponent (MXFP8 releases).
Writing is transformers' quantize-on-load (Fp8Quantize): per block scale = (1 / amax) * 448 in float32,
scale_inv = 1 / scale, codes = e4m3fn(clamp(w * scale, +-448)); an all-zero block gets scale 1.
"""

from __future__ import annotations

import math

import numpy as np

from quantkit import dtypes
from quantkit.numerics import FP8_E4M3_MAX, decode_e4m3fn, decode_e8m0, fp8_e4m3_bits

BLOCK = (128, 128)


def grid(shape: tuple[int, ...], block: tuple[int, int] = BLOCK) -> tuple[int, int]:
    """The scale grid of a [rows, cols] weight."""
    return math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])


def scale_values(scale_inv: np.ndarray, dtype: str) -> np.ndarray:
    """Stored scale_inv (bits of `dtype`) -> float32 multipliers."""
    return decode_e8m0(scale_inv) if dtype == "U8" else dtypes.to_float32(scale_inv, dtype)


def _per_column(scales: np.ndarray, cols: int, width: int) -> np.ndarray:
    """[bands, grid cols] block scales -> [bands, cols], each repeated over its (possibly ragged) block."""
    return np.repeat(scales, width, axis=1)[:, :cols]


def dequantize_band(codes: np.ndarray, scales: np.ndarray, first_row: int, block: tuple[int, int] = BLOCK) -> np.ndarray:
    """float32 values of weight rows `first_row ...` (e4m3fn codes) from the whole grid of float32 scales."""
    rows, cols = codes.shape
    row_scales = scales[np.arange(first_row, first_row + rows) // block[0]]
    return decode_e4m3fn(codes) * _per_column(row_scales, cols, block[1])


def quantize_band(values: np.ndarray, block: tuple[int, int] = BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """float32 weight rows (a whole number of block rows, or the last ragged ones) -> (e4m3fn codes,
    float32 scale_inv [ceil(rows / 128), ceil(cols / 128)])."""
    rows, cols = values.shape
    bands, columns = grid(values.shape, block)
    padded = np.zeros((bands * block[0], columns * block[1]), np.float32)
    padded[:rows, :cols] = np.abs(values)
    amax = padded.reshape(bands, block[0], columns, block[1]).max(axis=(1, 3))
    # torch evaluates `448 / amax` as reciprocal(amax) * 448: two roundings, kept here
    scale = np.where(amax > 0, (np.float32(1) / np.where(amax > 0, amax, np.float32(1))) * FP8_E4M3_MAX, np.float32(1))
    scale_inv = (np.float32(1) / scale).astype(np.float32)
    per_element = _per_column(np.repeat(scale, block[0], axis=0)[:rows], cols, block[1])
    codes = fp8_e4m3_bits(np.clip(values * per_element, -FP8_E4M3_MAX, FP8_E4M3_MAX))
    return codes, scale_inv
