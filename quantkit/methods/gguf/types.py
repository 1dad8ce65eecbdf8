"""The one table of GGUF quant types quantkit writes: per type, its numpy reference (the spec), the
compiled path giving the same bytes where there is one, the file type `--gguf-type` records, llama-quantize's
fallback when rows do not hold whole blocks, and verify's error bound. A new type is one entry here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import numpy as np
from gguf import GGMLQuantizationType, LlamaFileType

from quantkit.dtypes import bf16_bits, to_float32
from quantkit.methods.gguf import iquants, kquants, legacy, native, weighted
from quantkit.methods.gguf.blocks import fits, layout, row_bytes

__all__ = ["GGUF_TYPES", "IGNORES_IMPORTANCE", "LEGACY_TYPES", "TYPES", "GGUFType", "block_integers", "block_values", "fits", "integer_blocks", "layout", "quantize",
           "quantize_reference", "quantize_stored", "quantize_weighted", "row_bytes"]

QType = GGMLQuantizationType


@dataclass(frozen=True)
class GGUFType:
    """`reference`: float32 rows [n, k] -> stored [n, row bytes] (the float types: their own arrays).
    `fast`: the same bytes from rows as a checkpoint stores them (dtype given; BF16 as uint16 bits)."""

    qtype: QType
    file_type: LlamaFileType | None  # where the type is a whole file type of llama-quantize's (mixes.py adds _S/_M/_L)
    reference: Callable[[np.ndarray], np.ndarray]
    fast: Callable[[np.ndarray, str], np.ndarray] | None
    fallback: QType | None  # llama-quantize's choice when a row does not hold whole blocks (then F16)
    error_bound: float  # relative weight error (||W - W'|| / ||W||) above which verify fails a tensor
    # float32 rows [n, k], importance weights [k] -> stored bytes, as llama-quantize --imatrix (weighted.py)
    weighted: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None


def _native(qtype: QType) -> Callable[[np.ndarray, str], np.ndarray] | None:
    """The C kernel (native.py), None where the extension was not built."""

    def fast(rows: np.ndarray, dtype: str) -> np.ndarray:
        row_bytes(qtype, rows.shape[1])  # refuses partial blocks before the kernel runs
        return native.quantize(rows, dtype, qtype)

    return fast if native.AVAILABLE else None


def _compiled(qtype: QType) -> Callable[[np.ndarray, str], np.ndarray]:
    """The C kernel where the extension has one, else the numba kernel."""
    if native.AVAILABLE and qtype in native.TYPES:
        return _native(qtype)

    def fast(rows: np.ndarray, dtype: str) -> np.ndarray:
        from quantkit.methods.gguf import kernels  # imports numba (~0.4 s): only the types that need it pay

        return kernels.quantize(to_float32(rows, dtype) if dtype != "F32" else rows, qtype)

    return fast


def _legacy(qtype: QType) -> Callable[[np.ndarray], np.ndarray]:
    return partial(legacy.quantize_rows, qtype=qtype)


F = LlamaFileType
# Error bounds are about three times what each type gives on normally distributed weights
# (Q2_K 0.33, Q3_K 0.17, Q4_0 0.09, Q4_K 0.07, IQ4_NL 0.08, Q5_K 0.035, Q6_K 0.02, Q8_0 0.005).
TYPES: dict[QType, GGUFType] = {t.qtype: t for t in (
    GGUFType(QType.F32, F.ALL_F32, lambda rows: rows, None, None, 1e-6),
    GGUFType(QType.F16, F.MOSTLY_F16, lambda rows: rows.astype(np.float16), None, None, 1e-3),
    # bfloat16 rounded to nearest even, NaN kept quiet, as ggml
    GGUFType(QType.BF16, F.MOSTLY_BF16, lambda rows: bf16_bits(rows).view(np.uint8), None, None, 8e-3),
    GGUFType(QType.Q8_0, F.MOSTLY_Q8_0, _legacy(QType.Q8_0), _native(QType.Q8_0), None, 0.03),
    GGUFType(QType.Q4_0, F.MOSTLY_Q4_0, _legacy(QType.Q4_0), _native(QType.Q4_0), None, 0.25,
             weighted.quantize_q4_0),
    GGUFType(QType.Q4_1, F.MOSTLY_Q4_1, _legacy(QType.Q4_1), None, None, 0.25,
             weighted.quantize_q4_1),
    GGUFType(QType.Q5_0, F.MOSTLY_Q5_0, _legacy(QType.Q5_0), _native(QType.Q5_0), None, 0.12,
             weighted.quantize_q5_0),
    GGUFType(QType.Q5_1, F.MOSTLY_Q5_1, _legacy(QType.Q5_1), None, None, 0.12,
             weighted.quantize_q5_1),
    GGUFType(QType.Q2_K, F.MOSTLY_Q2_K, kquants.quantize_q2_k_reference, _compiled(QType.Q2_K), QType.Q4_0, 0.8,
             weighted.quantize_q2_k),
    GGUFType(QType.Q3_K, None, kquants.quantize_q3_k_reference, _compiled(QType.Q3_K), QType.Q4_0, 0.5,
             weighted.quantize_q3_k),
    GGUFType(QType.Q4_K, None, kquants.quantize_q4_k_reference, _compiled(QType.Q4_K), QType.Q5_0, 0.25,
             weighted.quantize_q4_k),
    GGUFType(QType.Q5_K, None, kquants.quantize_q5_k_reference, _compiled(QType.Q5_K), QType.Q5_1, 0.12,
             weighted.quantize_q5_k),
    GGUFType(QType.Q6_K, F.MOSTLY_Q6_K, kquants.quantize_q6_k_reference, _compiled(QType.Q6_K), QType.Q8_0, 0.06,
             weighted.quantize_q6_k),
    GGUFType(QType.IQ4_NL, F.MOSTLY_IQ4_NL, iquants.quantize_iq4_nl_reference, _compiled(QType.IQ4_NL), None, 0.25,
             iquants.quantize_iq4_nl_reference),
    GGUFType(QType.IQ4_XS, F.MOSTLY_IQ4_XS, iquants.quantize_iq4_xs_reference, _compiled(QType.IQ4_XS), QType.IQ4_NL,
             0.25, iquants.quantize_iq4_xs_reference),
)}  # fmt: skip

GGUF_TYPES = tuple(q.name for q in TYPES)
LEGACY_TYPES = tuple(legacy.BLOCK_QUANTIZERS)
IGNORES_IMPORTANCE = {QType.F32, QType.F16, QType.BF16, QType.Q8_0}  # llama.cpp quantizes these without it


def quantize_reference(rows: np.ndarray, qtype: QType) -> np.ndarray:
    """float32 rows [n, k] -> stored array [n, row bytes] (uint8), or the float array for F32/F16/BF16."""
    return TYPES[qtype].reference(np.ascontiguousarray(rows, dtype=np.float32))


def quantize(rows: np.ndarray, qtype: QType) -> np.ndarray:
    """Same bytes as the references, through the compiled paths where a type has one."""
    return quantize_stored(rows, "F32", qtype)


def quantize_stored(rows: np.ndarray, dtype: str, qtype: QType) -> np.ndarray:
    """`quantize` of rows as a checkpoint stores them (safetensors dtype; BF16 as uint16 bits)."""
    fast = TYPES[qtype].fast
    if fast is not None:
        return fast(rows, dtype)
    return quantize_reference(to_float32(rows, dtype) if dtype != "F32" else rows, qtype)


def integer_blocks(q: np.ndarray, d: np.ndarray, qtype: QType) -> np.ndarray:
    """Q4_0 / Q8_0 rows from their int8 codes [n, k] and float16 factors [n, k / 32] (legacy.blocks_of)."""
    if native.AVAILABLE:
        return native.blocks_of(q, d, legacy.INTEGER_BITS[qtype])
    return legacy.blocks_of(q, d, qtype)


def block_integers(raw: np.ndarray, qtype: QType, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of `integer_blocks` for stored rows [n, row bytes] of length k (legacy.integers_of)."""
    if native.AVAILABLE:
        return native.integers_of(raw, legacy.INTEGER_BITS[qtype], k)
    return legacy.integers_of(raw, qtype)


def block_values(raw: np.ndarray, qtype: QType, k: int) -> np.ndarray:
    """float32 values [n, k] of Q4_0 / Q8_0 rows: q * d, as gguf-py's and llama.cpp's dequantization."""
    q, d = block_integers(raw, qtype, k)
    n = q.shape[0]
    return (q.reshape(n, -1, legacy.INTEGER_BLOCK) * d.astype(np.float32)[..., None]).reshape(n, -1)


def quantize_weighted(rows: np.ndarray, dtype: str, qtype: QType, importance: np.ndarray) -> np.ndarray:
    """`quantize_stored` with an importance matrix's weights for these rows' columns."""
    return TYPES[qtype].weighted(np.ascontiguousarray(to_float32(rows, dtype) if dtype != "F32" else rows,
                                                      dtype=np.float32), importance)
