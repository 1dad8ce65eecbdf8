"""The compiled paths for plain round-to-nearest GPTQ (quantkit.native's kernel, the bytes of groupwise.py's
reference, packed straight into `qweight` columns), for GPTQ codes <-> signed integers (integers.py), and for
GPTQ weights back to dense rows (the bytes of layout.dequantize_gptq then dtypes.from_float32).
`DENSE_AVAILABLE` is False where the extension was not built (or predates that kernel)."""

from __future__ import annotations

import numpy as np

from quantkit.native import AVAILABLE, DENSE, DENSE_STORAGE, kernels, stored, threads

__all__ = ["AVAILABLE", "DENSE_AVAILABLE", "dense_rows", "pack_signed", "quantize_rtn_into", "unpack_signed"]

DENSE_AVAILABLE = AVAILABLE and hasattr(kernels, "gptq_dense")


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


def dense_rows(tensors: dict[str, np.ndarray], bits: int, version: str | None, first: int, rows: int, dtype: str,
               awq: bool = False) -> np.ndarray:  # fmt: skip
    """Stored `dtype` bits (a key of quantkit.native.DENSE) of output rows `first ... first + rows` of a GPTQ
    weight `[out, in]`: qweight, qzeros, g_idx int32 and scales float32 as layout.dequantize_gptq takes them,
    checked by layout.check_gptq; out a multiple of 32 / bits. `awq`: AWQ GEMM companions as
    layout.dequantize_awq takes them (checked by layout.check_awq), with `g_idx` i // group_size added."""
    qweight, scales = tensors["qweight"], tensors["scales"]
    in_features, out_features = tensors["g_idx"].shape[0], scales.shape[1]
    dense = np.empty((rows, in_features), DENSE_STORAGE[dtype])
    kernels.gptq_dense(np.ascontiguousarray(qweight, np.int32), np.ascontiguousarray(tensors["qzeros"], np.int32),
                       np.ascontiguousarray(scales, np.float32), np.ascontiguousarray(tensors["g_idx"], np.int32), bits, awq,
                       1 if version == "v1" else 0, in_features, out_features, scales.shape[0], first, DENSE[dtype], dense,
                       threads())  # fmt: skip
    return dense
