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
from quantkit.errors import QuantkitError
from quantkit.methods.gguf import kquants, legacy, native
from quantkit.methods.gguf.blocks import fits, layout, row_bytes

__all__ = ["FILE_TYPE", "GGUF_TYPES", "LEGACY_TYPES", "TYPES", "GGUFType", "fits", "layout", "parse_type", "quantize",
           "quantize_reference", "quantize_stored", "row_bytes"]

QType = GGMLQuantizationType


@dataclass(frozen=True)
class GGUFType:
    """`reference`: float32 rows [n, k] -> stored [n, row bytes] (the float types: their own arrays).
    `fast`: the same bytes from rows as a checkpoint stores them (dtype given; BF16 as uint16 bits)."""

    qtype: QType
    file_type: LlamaFileType
    reference: Callable[[np.ndarray], np.ndarray]
    fast: Callable[[np.ndarray, str], np.ndarray] | None
    fallback: QType | None  # llama-quantize's choice when a row does not hold whole blocks
    error_bound: float  # relative weight error (||W - W'|| / ||W||) above which verify fails a tensor


def _q8_0_native(rows: np.ndarray, dtype: str) -> np.ndarray:
    length = row_bytes(QType.Q8_0, rows.shape[1])  # refuses partial blocks before the kernel runs
    return native.quantize_q8_0(rows, dtype).reshape(rows.shape[0], length)


def _kquant_fast(qtype: QType) -> Callable[[np.ndarray, str], np.ndarray]:
    return lambda rows, dtype: kquants.quantize(to_float32(rows, dtype) if dtype != "F32" else rows, qtype)


# Error bounds are about three times what each type gives on normally distributed weights
# (Q4_0 0.09, Q4_K 0.07, Q6_K 0.02, Q8_0 0.005).
TYPES: dict[QType, GGUFType] = {t.qtype: t for t in (
    GGUFType(QType.F32, LlamaFileType.ALL_F32, lambda rows: rows, None, None, 1e-6),
    GGUFType(QType.F16, LlamaFileType.MOSTLY_F16, lambda rows: rows.astype(np.float16), None, None, 1e-3),
    # bfloat16 rounded to nearest even, NaN kept quiet, as ggml
    GGUFType(QType.BF16, LlamaFileType.MOSTLY_BF16, lambda rows: bf16_bits(rows).view(np.uint8), None, None, 8e-3),
    GGUFType(QType.Q8_0, LlamaFileType.MOSTLY_Q8_0, partial(legacy.quantize_rows, qtype=QType.Q8_0),
             _q8_0_native if native.AVAILABLE else None, None, 0.03),
    GGUFType(QType.Q4_0, LlamaFileType.MOSTLY_Q4_0, partial(legacy.quantize_rows, qtype=QType.Q4_0), None, None, 0.25),
    GGUFType(QType.Q4_1, LlamaFileType.MOSTLY_Q4_1, partial(legacy.quantize_rows, qtype=QType.Q4_1), None, None, 0.25),
    GGUFType(QType.Q5_0, LlamaFileType.MOSTLY_Q5_0, partial(legacy.quantize_rows, qtype=QType.Q5_0), None, None, 0.12),
    GGUFType(QType.Q5_1, LlamaFileType.MOSTLY_Q5_1, partial(legacy.quantize_rows, qtype=QType.Q5_1), None, None, 0.12),
    GGUFType(QType.Q4_K, LlamaFileType.MOSTLY_Q4_K_S, kquants.quantize_q4_k_reference, _kquant_fast(QType.Q4_K),
             QType.Q5_0, 0.25),
    GGUFType(QType.Q6_K, LlamaFileType.MOSTLY_Q6_K, kquants.quantize_q6_k_reference, _kquant_fast(QType.Q6_K),
             QType.Q8_0, 0.06),
)}  # fmt: skip

GGUF_TYPES = tuple(q.name for q in TYPES)
FILE_TYPE = {q: t.file_type for q, t in TYPES.items()}
LEGACY_TYPES = tuple(legacy.BLOCK_QUANTIZERS)


def parse_type(name: str) -> QType:
    if name.upper() not in GGUF_TYPES:
        raise QuantkitError(f"unknown GGUF type {name!r}", f"choose one of {', '.join(GGUF_TYPES)}")
    return QType[name.upper()]


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
