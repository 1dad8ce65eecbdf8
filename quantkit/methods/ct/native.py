"""The compiled paths: quantkit.native's `ct_*` kernels behind the contracts of schemes.fp8_channel,
fp8_block, int_symmetric, int_asymmetric, nvfp4 / mxfp4 and global_absmax (quantize, on stored bits: BF16 as uint16, F16,
F32) and formats.decode on integer and fp4 codes (dequantize), giving the same bytes; tests compare them. Each
`*AVAILABLE` is False where the extension was not built (or predates the kernel)."""

from __future__ import annotations

import numpy as np

from quantkit.native import DENSE_STORAGE, kernels, stored, threads

AVAILABLE = kernels is not None and hasattr(kernels, "ct_fp8_channel")
BLOCK_AVAILABLE = kernels is not None and hasattr(kernels, "ct_fp8_block")
INT_AVAILABLE = kernels is not None and hasattr(kernels, "ct_int_symmetric")
ASYM_AVAILABLE = kernels is not None and hasattr(kernels, "ct_int_asymmetric")
DENSE_AVAILABLE = kernels is not None and hasattr(kernels, "ct_int_dense")
FP4_AVAILABLE = kernels is not None and hasattr(kernels, "ct_fp4") and hasattr(kernels, "ct_peak")
DTYPES = {"BF16": 0, "F16": 1, "F32": 2}


def fp8_channel(chunk: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(fp8 codes uint8 [rows, cols], scales float32 [rows, 1] holding values of `dtype`) of stored bits."""
    rows, cols = chunk.shape
    raw, _ = stored(chunk, dtype)
    codes = np.empty((rows, cols), np.uint8)
    scale = np.empty((rows, 1), np.float32)
    kernels.ct_fp8_channel(raw, DTYPES[dtype], cols, codes, scale, threads())
    return codes, scale


def fp8_block(chunk: np.ndarray, dtype: str, block: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(fp8 codes uint8 [rows, cols], scales float32 [ceil(rows / block), ceil(cols / block)] holding values of
    `dtype`) of stored rows that start on a block boundary: schemes.fp8_block's; None where a value is NaN or
    infinite (the reference decides) or a row has more than 4096 blocks."""
    rows, cols = chunk.shape
    if not cols or -(-cols // block) > 4096:
        return None
    raw, _ = stored(chunk, dtype)
    codes = np.empty((rows, cols), np.uint8)
    scale = np.empty((-(-rows // block), -(-cols // block)), np.float32)
    finite = kernels.ct_fp8_block(raw, DTYPES[dtype], cols, block, block, codes, scale, threads())
    return (codes, scale) if finite else None


def int_symmetric(chunk: np.ndarray, dtype: str, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(int32 words [rows, cols * bits / 32], scales float32 [rows, groups] holding values of `dtype`): the
    packed result of schemes.int_symmetric; None where a value is NaN or infinite (the reference decides)."""
    return _int_groups(chunk, dtype, bits, group_size, symmetric=True)


def int_asymmetric(chunk: np.ndarray, dtype: str, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """As int_symmetric, for schemes.int_asymmetric: (words, scales, signed zero points int8 [rows, groups])."""
    return _int_groups(chunk, dtype, bits, group_size, symmetric=False)


def _int_groups(chunk: np.ndarray, dtype: str, bits: int, group_size: int, symmetric: bool) -> tuple[np.ndarray, ...] | None:
    rows, cols = chunk.shape
    raw, _ = stored(chunk, dtype)
    packed = np.empty((rows, cols * bits // 32), np.int32)
    scale = np.empty((rows, cols // group_size), np.float32)
    if symmetric:
        finite = kernels.ct_int_symmetric(raw, DTYPES[dtype], cols, group_size, bits, packed, scale, threads())
        return (packed, scale) if finite else None
    zero = np.empty((rows, cols // group_size), np.int8)
    finite = kernels.ct_int_asymmetric(raw, DTYPES[dtype], cols, group_size, bits, packed, scale, zero, threads())
    return (packed, scale, zero) if finite else None


def int_dense(codes: np.ndarray, bits: int, cols: int, scales: np.ndarray, zeros: np.ndarray | None, block: tuple[int, int],
              first_row: int, scale_dtype: str, dtype: str, e2m1: bool = False) -> np.ndarray:
    """Stored `dtype` bits of formats.decode on integer or fp4 codes: `codes` int32 words [rows, ceil(cols * bits / 32)]
    (pack-quantized, bits 4 or 8), int8 [rows, cols] (int-quantized, bits 0) or, with e2m1, fp4 bytes [rows, cols / 2]
    (cols a multiple of 8, bits 4, scale_dtype BF16), rows first_row.. of the weight; scales (and zero points, None:
    symmetric) float32 grids as formats.scale_grid gives them."""
    rows = codes.shape[0]
    dense = np.empty((rows, cols), DENSE_STORAGE[dtype])
    if rows:
        empty = np.empty(0, np.float32)
        kernels.ct_int_dense(np.ascontiguousarray(codes), bits, e2m1, cols, np.ascontiguousarray(scales, np.float32),
                             empty if zeros is None else np.ascontiguousarray(zeros, np.float32), block[0], block[1], first_row,
                             DTYPES[scale_dtype], DTYPES[dtype], dense, threads())
    return dense


def fp4(chunk: np.ndarray, dtype: str, mx: bool, global_scale: np.float32 | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(e2m1 codes two a byte uint8 [rows, cols / 2], scale codes uint8 [rows, groups]): schemes.mxfp4 (mx) or
    schemes.nvfp4 with its global scale, then pack_fp4; None where a value is NaN or infinite."""
    rows, cols = chunk.shape
    raw, _ = stored(chunk, dtype)
    packed = np.empty((rows, cols // 2), np.uint8)
    scale = np.empty((rows, cols // (32 if mx else 16)), np.uint8)
    finite = kernels.ct_fp4(raw, DTYPES[dtype], cols, mx, 1.0 if global_scale is None else float(global_scale), packed, scale, threads())
    return (packed, scale) if finite else None


def global_absmax(chunk: np.ndarray, dtype: str) -> float:
    """schemes.global_absmax of stored bits (max |w|; NaN where a value is NaN)."""
    raw, bf16 = stored(chunk, dtype)
    return kernels.ct_peak(raw, bf16, threads()) if raw.size else 0.0
