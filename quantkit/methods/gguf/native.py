"""The compiled paths for GGUF Q8_0, Q4_0, Q5_0 and the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K (the bytes of
legacy.py's and kquants.py's references), and Q4_0 / Q8_0 blocks <-> their integers: quantkit.native's kernels
(native/gguf.c)."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantkit.native import AVAILABLE, kernels, stored, threads

__all__ = ["AVAILABLE", "TYPES", "blocks_of", "integers_of", "quantize"]

QType = GGMLQuantizationType
TYPES = (QType.Q8_0, QType.Q4_0, QType.Q5_0, QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K)


def quantize(rows: np.ndarray, dtype: str, qtype: QType) -> np.ndarray:
    """Stored rows [n, k] (k whole blocks of `qtype`, one of TYPES) -> [n, row bytes] uint8."""
    raw, bf16 = stored(rows, dtype)
    values, size = GGML_QUANT_SIZES[qtype]
    blocks = np.empty((raw.size // values, size), np.uint8)
    if qtype == QType.Q8_0:
        kernels.q8_0(raw, bf16, blocks, threads())
    else:
        kernels.gguf_blocks(raw, bf16, int(qtype), blocks, threads())
    return blocks.reshape(rows.shape[0], -1)


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
