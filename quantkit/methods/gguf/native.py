"""The compiled paths for GGUF Q8_0, Q4_0, Q5_0 and the K-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: quantkit.native's
kernels (native/gguf.c), the bytes of legacy.py's and kquants.py's references."""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantkit.native import AVAILABLE, kernels, stored, threads

__all__ = ["AVAILABLE", "TYPES", "quantize"]

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
