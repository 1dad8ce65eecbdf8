"""The compiled paths for GGUF Q8_0, Q4_0 and for Q4_0 / Q8_0 blocks <-> their integers: quantkit.native's kernels,
the bytes of legacy.py's references."""

from __future__ import annotations

import numpy as np

from quantkit.native import AVAILABLE, kernels, stored, threads

__all__ = ["AVAILABLE", "blocks_of", "integers_of", "quantize_q4_0", "quantize_q8_0"]


def quantize_q8_0(rows: np.ndarray, dtype: str) -> np.ndarray:
    """GGUF Q8_0 of stored rows whose length is a multiple of 32: [blocks, 34] uint8, each block its
    float16 scale then its 32 codes."""
    raw, bf16 = stored(rows, dtype)
    blocks = np.empty((raw.size // 32, 34), np.uint8)
    kernels.q8_0(raw, bf16, blocks, threads())
    return blocks


def quantize_q4_0(rows: np.ndarray, dtype: str) -> np.ndarray | None:
    """GGUF Q4_0 of stored rows whose length is a multiple of 32: [blocks, 18] uint8; None when a block holds
    NaN or infinity (the reference decides those bytes)."""
    raw, bf16 = stored(rows, dtype)
    blocks = np.empty((raw.size // 32, 18), np.uint8)
    return None if kernels.q4_0(raw, bf16, blocks, threads()) else blocks


def blocks_of(q: np.ndarray, d: np.ndarray, bits: int) -> np.ndarray:
    """legacy.blocks_of: int8 codes [n, k] and float16 factors [n, k / 32] -> Q4_0 (bits 4) / Q8_0 (bits 8)
    rows [n, row bytes]."""
    n, k = q.shape
    out = np.empty((n, k // 32 * (2 + 32 * bits // 8)), np.uint8)
    kernels.q_blocks(np.ascontiguousarray(q, np.int8), np.ascontiguousarray(d, np.float16), bits, out, threads())
    return out


def integers_of(raw: np.ndarray, bits: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """legacy.integers_of: Q4_0 / Q8_0 rows [n, row bytes] of length k -> (int8 codes [n, k], float16 [n, k / 32])."""
    n = raw.shape[0]
    q, d = np.empty((n, k), np.int8), np.empty((n, k // 32), np.float16)
    kernels.q_integers(np.ascontiguousarray(raw), bits, q, d, threads())
    return q, d
