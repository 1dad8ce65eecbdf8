"""The compiled path for reading gpt-oss MXFP4: quantkit.native's `mxfp4_dense` behind the contract of
blocks.dequantize_groups (then transposed and stored), giving the same bits; tests compare them.
`AVAILABLE` is False where the extension was not built (or predates the kernel)."""

from __future__ import annotations

import numpy as np

from quantkit.native import DENSE, DENSE_STORAGE, kernels, threads

AVAILABLE = kernels is not None and hasattr(kernels, "mxfp4_dense")


def dense_groups(blocks: np.ndarray, scales: np.ndarray, first: int, count: int, dtype: str) -> np.ndarray:
    """Stored `dtype` bits [count * 32, rows] of groups first.. of one expert: blocks uint8 [rows, groups, 16],
    scales uint8 [rows, groups] (whole, C-contiguous)."""
    rows, groups = scales.shape
    dense = np.empty((count * 32, rows), DENSE_STORAGE[dtype])
    kernels.mxfp4_dense(blocks, scales, groups, first, DENSE[dtype], dense, threads())
    return dense
