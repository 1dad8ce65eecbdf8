"""The compiled paths for plain round-to-nearest GPTQ (quantkit.native's kernel, the bytes of groupwise.py's
reference, packed straight into `qweight` columns) and for GPTQ codes <-> signed integers (integers.py)."""

from __future__ import annotations

import numpy as np

from quantkit.native import AVAILABLE, kernels, stored, threads

__all__ = ["AVAILABLE", "pack_signed", "quantize_rtn_into", "unpack_signed"]


def quantize_rtn_into(rows: np.ndarray, dtype: str, bits: int, size: int, sym: bool, min_zero: int, qweight: np.ndarray,
                      start: int, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:  # fmt: skip
    """Output rows `start ...` into `qweight` [in / f, out] (int32), `scales` (float32) and `zeros` (uint8)
    [out, groups]; returns each row's problem code (0, or groupwise's BAD_VALUES / TOO_WIDE)."""
    raw, bf16 = stored(rows, dtype)
    problems = np.zeros(raw.shape[0], np.uint8)
    kernels.gptq_rtn(raw, bf16, raw.shape[0], raw.shape[1], size, bits, sym, min_zero, qweight.shape[1], start,
                     qweight, scales, zeros, problems, threads())  # fmt: skip
    return problems


def unpack_signed(qweight: np.ndarray, turned: np.ndarray, bits: int, group: int) -> np.ndarray:
    """`qweight` [in / f, out] -> int8 [out, in]: code - mid, or mid - 1 - code where `turned` [out, groups]
    (the zero point mid - 1). `group` a multiple of 32 / bits."""
    out_features, in_features = qweight.shape[1], qweight.shape[0] * (32 // bits)
    q = np.empty((out_features, in_features), np.int8)
    kernels.gptq_unpack_signed(np.ascontiguousarray(qweight), np.ascontiguousarray(turned, np.uint8), bits, group,
                               in_features, out_features, q, threads())
    return q


def pack_signed(q: np.ndarray, turned: np.ndarray, bits: int, group: int) -> np.ndarray:
    """Inverse of `unpack_signed`: int8 [out, in] -> `qweight` int32 [in / f, out]."""
    out_features, in_features = q.shape
    qweight = np.empty((in_features // (32 // bits), out_features), np.int32)
    kernels.gptq_pack_signed(np.ascontiguousarray(q, np.int8), np.ascontiguousarray(turned, np.uint8), bits, group,
                             in_features, out_features, qweight, threads())
    return qweight
