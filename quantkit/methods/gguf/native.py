"""The compiled path for GGUF Q8_0: quantkit.native's kernel, the bytes of legacy.py's reference."""

from __future__ import annotations

import numpy as np

from quantkit.native import AVAILABLE, kernels, stored, threads

__all__ = ["AVAILABLE", "quantize_q8_0"]


def quantize_q8_0(rows: np.ndarray, dtype: str) -> np.ndarray:
    """GGUF Q8_0 of stored rows whose length is a multiple of 32: [blocks, 34] uint8, each block its
    float16 scale then its 32 codes."""
    raw, bf16 = stored(rows, dtype)
    blocks = np.empty((raw.size // 32, 34), np.uint8)
    kernels.q8_0(raw, bf16, blocks, threads())
    return blocks
