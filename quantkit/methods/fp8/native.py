"""The compiled path for the fine-grained FP8 writer: quantkit.native's `fp8_blocks` behind the contract of
blocks.quantize_band, on stored bits (BF16 as uint16, F16 widened, F32), giving the same bytes; tests
compare them. `AVAILABLE` is False where the extension was not built (or predates the kernel)."""

from __future__ import annotations

import numpy as np

from quantkit.native import kernels, stored, threads

AVAILABLE = kernels is not None and hasattr(kernels, "fp8_blocks")


def quantize_band(chunk: np.ndarray, dtype: str, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray] | None:
    """(e4m3 codes, float32 scale_inv per block) of stored weight rows (whole bands of block[0] rows, or
    the last ragged ones); None where a value is NaN or infinite."""
    rows, cols = chunk.shape
    raw, bf16 = stored(chunk, dtype)
    codes = np.empty((rows, cols), np.uint8)
    scale_inv = np.empty((-(-rows // block[0]), -(-cols // block[1])), np.float32)
    finite = kernels.fp8_blocks(raw, bf16, cols, block[0], block[1], codes, scale_inv, threads())
    return (codes, scale_inv) if finite else None
