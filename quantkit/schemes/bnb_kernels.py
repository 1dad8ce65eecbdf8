"""Compiled (numba) kernels for the bitsandbytes schemes: one pass over the data, both cores.

Each kernel reproduces its numpy reference in nf4.py / int8.py operation for operation in float32
(no fastmath, no fused multiply-add), so the bytes are the same; tests compare them. Loops are kept
element-wise so LLVM vectorizes them: absmax is an integer max over the magnitude bits (exact, since
non-negative floats order like their bit patterns), which also flags NaN and infinity.
"""

from __future__ import annotations

import os

import numpy as np

os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")  # starts in half the time of OpenMP

from llvmlite import ir  # noqa: E402
from numba import njit, prange, types  # noqa: E402
from numba.extending import intrinsic, overload  # noqa: E402

from quantkit.schemes import nf4  # noqa: E402

_GROUP = 256  # quantization blocks per parallel work item
_TINY = np.float32(1e-38)
_EXPONENT = np.uint32(0x7F800000)  # magnitude bits at or above this: infinity or NaN


@intrinsic
def _as_float32(typingctx, bits):
    """Reinterpret uint32 bits as a float32 (an LLVM bitcast, free)."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@intrinsic
def _as_uint32(typingctx, value):
    """Reinterpret a float32 as its uint32 bits."""

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


def _widen_into(raw, start, stop, values):
    """Stored bits [start, stop) -> float32 `values` (BF16 shifted into place)."""


@overload(_widen_into, inline="always")
def _widen_into_typed(raw, start, stop, values):
    if raw.dtype == types.uint16:

        def from_bf16(raw, start, stop, values):
            for i in range(stop - start):
                values[i] = _as_float32(np.uint32(raw[start + i]) << np.uint32(16))

        return from_bf16

    def from_f32(raw, start, stop, values):
        for i in range(stop - start):
            values[i] = raw[start + i]

    return from_f32


@njit(cache=True, inline="always")
def _peak_bits(values):
    """Largest magnitude in `values`, as bits: an exact integer max that also exposes NaN/inf.
    (Loops index slices from 0 so LLVM sees non-negative indices and vectorizes.)"""
    bits = values.view(np.uint32)
    peak = np.uint32(0)
    for i in range(bits.size):
        magnitude = bits[i] & np.uint32(0x7FFFFFFF)
        peak = magnitude if magnitude > peak else peak
    return peak


@njit(cache=True, inline="always")
def _code(v, bounds):
    """How many midpoints v exceeds. Clamping to [-1, 1] first, as bitsandbytes does, changes nothing:
    every midpoint lies inside (-1, 1)."""
    code = 0
    for j in range(15):
        code += v > bounds[j]
    return code


@njit(cache=True, parallel=True, nogil=True)
def _quantize_4bit(raw, blocksize, bounds, order, packed, absmax):
    n = raw.size
    blocks = (n + blocksize - 1) // blocksize
    groups = (blocks + _GROUP - 1) // _GROUP
    for g in prange(groups):
        first = g * _GROUP
        base = first * blocksize
        size = min(n, (first + _GROUP) * blocksize) - base
        values = np.empty(size, np.float32)
        _widen_into(raw, base, base + size, values)
        codes = np.empty(size + 1, np.uint8)
        codes[size] = _code(np.float32(0.0), bounds)  # the zero that pads an odd-length tensor
        for start in range(0, size, blocksize):
            stop = min(size, start + blocksize)
            block = values[start:stop]
            peak_bits = _peak_bits(block)
            peak = _as_float32(peak_bits)
            safe = max(peak, _TINY)
            b = first + start // blocksize
            if peak_bits >= _EXPONENT:
                absmax[b] = np.float32(np.nan)
            else:
                absmax[b] = peak if stop - start == blocksize else safe
            if stop - start == blocksize:  # full blocks multiply by the reciprocal, the last one divides
                inverse = np.float32(1.0) / safe
                for i in range(block.size):
                    block[i] *= inverse
            else:
                for i in range(block.size):
                    block[i] /= safe
        for i in range(size):  # one long loop vectorizes; per-block ones do not
            codes[i] = _code(values[i], bounds)
        for i in range(0, size, 2):
            packed[(base + i) // 2] = (order[codes[i]] << np.uint8(4)) | order[codes[i + 1]]


def quantize_4bit(chunk: np.ndarray, dtype: str, blocksize: int, quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Same contract as nf4.quantize_4bit, on stored bits (BF16 as uint16, F16 widened first)."""
    raw = chunk.reshape(-1)
    if dtype in ("F16", "F64"):
        raw = raw.astype(np.float32)
    n = raw.size
    packed = np.empty((n + 1) // 2, np.uint8)
    absmax = np.empty(-(-n // blocksize), np.float32)
    _quantize_4bit(raw, blocksize, nf4.bounds(quant_type), nf4.ORDERS[quant_type], packed, absmax)
    return packed.reshape(-1, 1), absmax


@njit(cache=True, parallel=True, nogil=True)
def _quantize_int8(raw, rows, cols, codes, scb):
    for r in prange(rows):
        values = np.empty(cols, np.float32)
        _widen_into(raw, r * cols, (r + 1) * cols, values)
        # Round to float16 precision (ties to even): 11 significant bits in the normal range, multiples
        # of 2**-24 below it, infinity above 65504. Branch-free, so it vectorizes.
        for i in range(cols):
            bits = _as_uint32(values[i])
            magnitude = bits & np.uint32(0x7FFFFFFF)
            rounded = (magnitude + np.uint32(0xFFF) + ((magnitude >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
            overflow = (rounded > np.uint32(0x477FE000)) & (magnitude < _EXPONENT)
            rounded = _EXPONENT if overflow else rounded
            normal = _as_float32((bits & np.uint32(0x80000000)) | rounded)
            tiny = np.float32(np.rint(values[i] * np.float32(16777216.0))) * np.float32(5.960464477539063e-08)
            values[i] = normal if magnitude >= np.uint32(0x38800000) else tiny
        peak_bits = _peak_bits(values)
        peak = _as_float32(peak_bits)
        scb[r] = np.float32(np.nan) if peak_bits >= _EXPONENT else peak
        row = codes[r * cols : (r + 1) * cols]
        if peak_bits == 0:  # an all-zero row: 0 * inf; bitsandbytes writes zeros
            row[:] = 0
            continue
        factor = (np.float32(1.0) / peak) * np.float32(127.0)
        for i in range(cols):
            row[i] = np.int8(np.rint(values[i] * factor))


def quantize_int8(chunk: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Same contract as int8.quantize_int8, on stored bits of a [rows, cols] chunk."""
    rows, cols = chunk.shape
    raw = np.ascontiguousarray(chunk).reshape(-1)
    if dtype in ("F16", "F64"):
        raw = raw.astype(np.float32)
    codes = np.empty(rows * cols, np.int8)
    scb = np.empty(rows, np.float32)
    _quantize_int8(raw, rows, cols, codes, scb)
    return codes.reshape(rows, cols), scb


def _store(out, i, value):
    """out[i] := value in out's dtype: float32 as is, bfloat16 bits (uint16) rounded to nearest even."""


@overload(_store, inline="always")
def _store_typed(out, i, value):
    if out.dtype == types.uint16:

        def to_bf16(out, i, value):
            bits = _as_uint32(value)
            out[i] = np.uint16((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))

        return to_bf16

    def to_f32(out, i, value):
        out[i] = value

    return to_f32


@njit(cache=True, parallel=True, nogil=True)
def _dequantize_4bit(packed, absmax, table, blocksize, first, out):
    """Elements [first, first + out.size) of a 4-bit tensor: table[code] * absmax[block], as float32.
    Whole blocks go byte by byte (two values per byte, one scale per block); a ragged start or end
    element by element."""
    n = out.size
    aligned = first % blocksize == 0 and blocksize % 2 == 0
    blocks = (n + blocksize - 1) // blocksize if aligned else 0
    for b in prange(blocks):
        start = b * blocksize
        stop = min(n, start + blocksize)
        scale = absmax[(first + start) // blocksize]
        pairs = packed[(first + start) // 2 : (first + stop) // 2]
        target = out[start:stop]
        for j in range(pairs.size):
            byte = pairs[j]
            _store(target, 2 * j, table[byte >> np.uint8(4)] * scale)
            _store(target, 2 * j + 1, table[byte & np.uint8(15)] * scale)
        if (stop - start) % 2:
            _store(target, stop - start - 1, table[packed[(first + stop - 1) // 2] >> np.uint8(4)] * scale)
    for i in range(0 if not aligned else n, n):
        e = first + i
        byte = packed[e >> 1]
        code = (byte >> np.uint8(4)) if (e & 1) == 0 else (byte & np.uint8(15))
        _store(out, i, table[code] * absmax[e // blocksize])


def dequantize_4bit(packed: np.ndarray, absmax: np.ndarray, table: np.ndarray, blocksize: int, first: int, count: int,
                    dtype: str) -> np.ndarray:
    """Stored bits (BF16 as uint16, else float32 values) of `count` elements starting at element `first`."""
    out = np.empty(count, np.uint16 if dtype == "BF16" else np.float32)
    _dequantize_4bit(packed.reshape(-1).view(np.uint8), absmax, table, blocksize, first, out)
    return out if dtype in ("BF16", "F32") else out.astype(np.float16 if dtype == "F16" else np.float64)
