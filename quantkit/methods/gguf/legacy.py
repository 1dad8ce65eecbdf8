"""ggml's legacy block types as GGUF stores them: Q8_0, Q4_0, Q4_1, Q5_0, Q5_1.

Each is numpy on whole blocks at once, giving the bytes of gguf-py's `gguf.quants.quantize` (and so of
llama.cpp's `quantize_row_*_ref`); this is the spec the C kernel for Q8_0 (native/gguf.c) matches.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantkit.methods.gguf.blocks import row_bytes

QType = GGMLQuantizationType


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


BLOCK_QUANTIZERS = {QType.Q8_0: _q8_0, QType.Q4_0: _q4_0, QType.Q4_1: _q4_1, QType.Q5_0: _q5_0, QType.Q5_1: _q5_1}




def quantize_rows(rows: np.ndarray, qtype: QType) -> np.ndarray:
    """float32 rows [n, k] -> stored bytes [n, row bytes] of a legacy type."""
    block_size = GGML_QUANT_SIZES[qtype][0]
    n, k = rows.shape
    blocks = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, block_size)
    return BLOCK_QUANTIZERS[qtype](blocks).reshape(n, row_bytes(qtype, k))


# Q4_0 and Q8_0 blocks compute q * d exactly (q signed, d float16): api.IntegerBlocks of 32, the types a
# weight moves into and out of without rounding.
INTEGER_BITS = {QType.Q4_0: 4, QType.Q8_0: 8}
INTEGER_BLOCK = 32


def integers_of(raw: np.ndarray, qtype: QType) -> tuple[np.ndarray, np.ndarray]:
    """Stored rows [n, row bytes] of Q4_0 / Q8_0 -> (q int8 [n, k], d float16 [n, k / 32])."""
    size = GGML_QUANT_SIZES[qtype][1]
    n = raw.shape[0]
    blocks = np.ascontiguousarray(raw).reshape(n, -1, size)
    d = np.ascontiguousarray(blocks[..., :2]).view(np.float16).reshape(n, -1)
    body = blocks[..., 2:]
    if qtype == QType.Q8_0:
        return np.ascontiguousarray(body).view(np.int8).reshape(n, -1), d
    q = np.concatenate([body & 0x0F, body >> 4], axis=-1).astype(np.int8) - np.int8(8)
    return q.reshape(n, -1), d


def blocks_of(q: np.ndarray, d: np.ndarray, qtype: QType) -> np.ndarray:
    """Inverse of `integers_of`: (q [n, k], d float16 [n, k / 32]) -> stored rows [n, row bytes]."""
    n, k = q.shape
    scale = np.ascontiguousarray(d, dtype=np.float16).reshape(-1, 1).view(np.uint8)
    codes = q.reshape(-1, INTEGER_BLOCK)
    body = codes.view(np.uint8) if qtype == QType.Q8_0 else _nibbles((codes + 8).astype(np.uint8))
    return np.concatenate([scale, body], axis=1).reshape(n, row_bytes(qtype, k))
