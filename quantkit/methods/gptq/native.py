"""The compiled path for plain round-to-nearest GPTQ: quantkit.native's kernel, the bytes of groupwise.py's
reference, packed straight into `qweight` columns."""

from __future__ import annotations

import numpy as np

from quantkit.native import AVAILABLE, kernels, stored, threads

__all__ = ["AVAILABLE", "quantize_rtn_into"]


def quantize_rtn_into(rows: np.ndarray, dtype: str, bits: int, size: int, sym: bool, min_zero: int, qweight: np.ndarray,
                      start: int, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:  # fmt: skip
    """Output rows `start ...` into `qweight` [in / f, out] (int32), `scales` (float32) and `zeros` (uint8)
    [out, groups]; returns each row's problem code (0, or groupwise's BAD_VALUES / TOO_WIDE)."""
    raw, bf16 = stored(rows, dtype)
    problems = np.zeros(raw.shape[0], np.uint8)
    kernels.gptq_rtn(raw, bf16, raw.shape[0], raw.shape[1], size, bits, sym, min_zero, qweight.shape[1], start,
                     qweight, scales, zeros, problems, threads())  # fmt: skip
    return problems
