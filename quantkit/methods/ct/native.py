"""The compiled path for FP8_DYNAMIC: quantkit.native's `ct_fp8_channel` behind the contract of
schemes.fp8_channel, on stored bits (BF16 as uint16, F16, F32), giving the same bytes; tests compare them.
`AVAILABLE` is False where the extension was not built (or predates the kernel)."""

from __future__ import annotations

import numpy as np

from quantkit.native import kernels, stored, threads

AVAILABLE = kernels is not None and hasattr(kernels, "ct_fp8_channel")
INT_AVAILABLE = kernels is not None and hasattr(kernels, "ct_int_symmetric")
DTYPES = {"BF16": 0, "F16": 1, "F32": 2}


def fp8_channel(chunk: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(fp8 codes uint8 [rows, cols], scales float32 [rows, 1] holding values of `dtype`) of stored bits."""
    rows, cols = chunk.shape
    raw, _ = stored(chunk, dtype)
    codes = np.empty((rows, cols), np.uint8)
    scale = np.empty((rows, 1), np.float32)
    kernels.ct_fp8_channel(raw, DTYPES[dtype], cols, codes, scale, threads())
    return codes, scale


def int_symmetric(chunk: np.ndarray, dtype: str, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """(int32 words [rows, cols * bits / 32], scales float32 [rows, groups] holding values of `dtype`): the
    packed result of schemes.int_symmetric; None where a value is NaN or infinite (the reference decides)."""
    rows, cols = chunk.shape
    raw, _ = stored(chunk, dtype)
    packed = np.empty((rows, cols * bits // 32), np.int32)
    scale = np.empty((rows, cols // group_size), np.float32)
    finite = kernels.ct_int_symmetric(raw, DTYPES[dtype], cols, group_size, bits, packed, scale, threads())
    return (packed, scale) if finite else None
