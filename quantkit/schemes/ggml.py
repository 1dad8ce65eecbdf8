"""ggml's block types as GGUF stores them: F32/F16/BF16 and the legacy Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

`quantize_reference` is the spec: numpy on whole blocks at once, giving the bytes of gguf-py's
`gguf.quants.quantize` (and so of llama.cpp's `quantize_row_*_ref`). `quantize` is the same bytes, with
Q8_0 done by the C kernel (native.py) and Q4_K / Q6_K by kquants' numba kernels, imported only for those.
Dequantizing is left to gguf-py's decoder.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantkit.dtypes import bf16_bits, to_float32
from quantkit.errors import QuantkitError
from quantkit.schemes import native

QType = GGMLQuantizationType
LEGACY_TYPES = (QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1)
FLOAT_TYPES = (QType.F32, QType.F16, QType.BF16)


def row_bytes(qtype: QType, row_length: int) -> int:
    """Bytes one row of `row_length` values takes in `qtype`; rows must hold whole blocks."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if row_length % block_size:
        raise QuantkitError(
            f"a row of {row_length} values does not hold whole {qtype.name} blocks of {block_size}",
            "pick a type whose block size divides the row length",
        )
    return row_length // block_size * type_size


def fits(qtype: QType, row_length: int) -> bool:
    return row_length % GGML_QUANT_SIZES[qtype][0] == 0


def layout(qtype: QType, shape: tuple[int, ...]) -> tuple[np.dtype, tuple[int, ...]]:
    """(dtype, shape) of the stored array for a tensor of `shape` (numpy order, rows last), without data."""
    if qtype == QType.F32:
        return np.dtype(np.float32), tuple(shape)
    if qtype == QType.F16:
        return np.dtype(np.float16), tuple(shape)
    return np.dtype(np.uint8), (*shape[:-1], row_bytes(qtype, shape[-1]))


def _f16_bytes(values: np.ndarray) -> np.ndarray:
    """float32 [n, 1] -> [n, 2] bytes of the float16 rounded to nearest even, as GGML_FP32_TO_FP16
    (beyond 65504 that is inf, in llama.cpp too)."""
    with np.errstate(over="ignore"):
        return values.astype(np.float16).view(np.uint8)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def round_half_away(v: np.ndarray) -> np.ndarray:
    """C's roundf, exactly: the fraction a - floor(a) is exact in float32, so no `+ 0.5` rounding slip."""
    a = np.abs(v)
    whole = np.floor(a)
    return np.copysign(whole + (a - whole >= 0.5), v)


def _signed_max(blocks: np.ndarray) -> np.ndarray:
    """The value of largest magnitude in each block, the first one on ties (C's strict `<`)."""
    return np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1, keepdims=True), axis=1)


def _nibbles(q: np.ndarray) -> np.ndarray:
    """Element j in the low nibble, element j + 16 in the high nibble of byte j."""
    half = q.shape[1] // 2
    return (q[:, :half] & 0x0F) | (q[:, half:] << 4)


def _fifth_bits(q: np.ndarray) -> np.ndarray:
    """Bit 4 of each of the 32 codes, packed little-endian into 4 bytes (qh)."""
    return np.packbits((q >> 4) & 1, axis=1, bitorder="little")


def _q8_0(b: np.ndarray) -> np.ndarray:
    d = np.abs(b).max(axis=1, keepdims=True) / np.float32(127)
    q = round_half_away(b * _inverse(d)).astype(np.int8).view(np.uint8)
    return np.concatenate([_f16_bytes(d), q], axis=1)


def _q4_0(b: np.ndarray) -> np.ndarray:
    d = _signed_max(b) / np.float32(-8)
    q = np.minimum(15, np.trunc(b * _inverse(d) + np.float32(8.5)).astype(np.uint8))
    return np.concatenate([_f16_bytes(d), _nibbles(q)], axis=1)


def _q4_1(b: np.ndarray) -> np.ndarray:
    lo = b.min(axis=1, keepdims=True)
    d = (b.max(axis=1, keepdims=True) - lo) / np.float32(15)
    q = np.minimum(15, np.trunc((b - lo) * _inverse(d) + np.float32(0.5)).astype(np.uint8))
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _nibbles(q)], axis=1)


def _q5_0(b: np.ndarray) -> np.ndarray:
    d = _signed_max(b) / np.float32(-16)
    q = np.minimum(31, np.trunc(b * _inverse(d) + np.float32(16.5)).astype(np.uint8))
    return np.concatenate([_f16_bytes(d), _fifth_bits(q), _nibbles(q)], axis=1)


def _q5_1(b: np.ndarray) -> np.ndarray:
    lo = b.min(axis=1, keepdims=True)
    d = (b.max(axis=1, keepdims=True) - lo) / np.float32(31)
    q = np.minimum(31, np.trunc((b - lo) * _inverse(d) + np.float32(0.5)).astype(np.uint8))
    return np.concatenate([_f16_bytes(d), _f16_bytes(lo), _fifth_bits(q), _nibbles(q)], axis=1)


_BLOCK_QUANTIZERS = {QType.Q8_0: _q8_0, QType.Q4_0: _q4_0, QType.Q4_1: _q4_1, QType.Q5_0: _q5_0, QType.Q5_1: _q5_1}


def quantize_reference(rows: np.ndarray, qtype: QType) -> np.ndarray:
    """float32 rows [n, k] -> stored array [n, row bytes] (uint8) or the float array for F32/F16/BF16."""
    rows = np.ascontiguousarray(rows, dtype=np.float32)
    if qtype == QType.F32:
        return rows
    if qtype == QType.F16:
        return rows.astype(np.float16)
    if qtype == QType.BF16:
        return bf16_bits(rows).view(np.uint8)  # round to nearest even, NaN kept quiet, as ggml
    block_size = GGML_QUANT_SIZES[qtype][0]
    n, k = rows.shape
    blocks = rows.reshape(-1, block_size)
    return _BLOCK_QUANTIZERS[qtype](blocks).reshape(n, row_bytes(qtype, k))


def quantize(rows: np.ndarray, qtype: QType) -> np.ndarray:
    """Same bytes as the references, the hot types (Q8_0, Q4_K, Q6_K) through compiled kernels."""
    return quantize_stored(rows, "F32", qtype)


def quantize_stored(rows: np.ndarray, dtype: str, qtype: QType) -> np.ndarray:
    """`quantize` of rows as a checkpoint stores them (safetensors dtype; BF16 as uint16 bits): the
    Q8_0 kernel widens bfloat16 itself, everything else goes through float32 first."""
    if qtype == QType.Q8_0 and native.AVAILABLE:
        length = row_bytes(qtype, rows.shape[1])  # refuses partial blocks before the kernel runs
        return native.quantize_q8_0(rows, dtype).reshape(rows.shape[0], length)
    rows = to_float32(rows, dtype) if dtype != "F32" else rows
    if qtype in (QType.Q4_K, QType.Q6_K):
        from quantkit.schemes import kquants

        return kquants.quantize(rows, qtype)
    return quantize_reference(rows, qtype)
