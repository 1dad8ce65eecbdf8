"""The compiled paths for GGUF Q8_0 and the K-quants Q2_K, Q4_K, Q5_K, Q6_K: quantkit.native's kernels (native/gguf.c),
the bytes of legacy.py's and kquants.py's references."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantkit.native import AVAILABLE, kernels, stored, threads

__all__ = ["AVAILABLE", "K_QUANTS", "quantize_k", "quantize_q8_0"]

QType = GGMLQuantizationType
K_QUANTS = (QType.Q2_K, QType.Q4_K, QType.Q5_K, QType.Q6_K)


def quantize_q8_0(rows: np.ndarray, dtype: str) -> np.ndarray:
    """GGUF Q8_0 of stored rows whose length is a multiple of 32: [blocks, 34] uint8, each block its
    float16 scale then its 32 codes."""
    raw, bf16 = stored(rows, dtype)
    blocks = np.empty((raw.size // 32, 34), np.uint8)
    kernels.q8_0(raw, bf16, blocks, threads())
    return blocks


def quantize_k(rows: np.ndarray, dtype: str, qtype: QType) -> np.ndarray:
    """A K-quant (K_QUANTS) of stored rows whose length is a multiple of 256: [n, row bytes] uint8."""
    raw, bf16 = stored(rows, dtype)
    blocks = np.empty((raw.size // 256, GGML_QUANT_SIZES[qtype][1]), np.uint8)
    kernels.kquant(raw, bf16, int(qtype), blocks, threads())
    return blocks.reshape(rows.shape[0], -1)
