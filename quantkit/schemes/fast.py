"""Compiled (numba) kernels for the bitsandbytes schemes: one pass over the data, both cores.

Each kernel reproduces its numpy reference in nf4.py / int8.py operation for operation in float32
(no fastmath, no fused multiply-add), so the bytes are the same; tests compare them.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from quantkit.schemes import nf4

_GROUP = 256  # quantization blocks per parallel work item
_TINY = np.float32(1e-38)
_FLOAT_MAX = np.float32(3.4028235e38)


def _widen(raw, start, stop):
    """Stored bits [start, stop) -> float32 values; BF16 arrives as uint16 and is shifted into place."""


@overload(_widen, inline="always")
def _widen_typed(raw, start, stop):
    if raw.dtype == types.uint16:

        def from_bf16(raw, start, stop):
            bits = np.empty(stop - start, np.uint32)
            for i in range(stop - start):
                bits[i] = np.uint32(raw[start + i]) << np.uint32(16)
            return bits.view(np.float32)

        return from_bf16
    return lambda raw, start, stop: raw[start:stop].astype(np.float32)


@njit(cache=True, parallel=True)
def _quantize_4bit(raw, blocksize, bounds, order, packed, absmax):
    n = raw.size
    blocks = (n + blocksize - 1) // blocksize
    groups = (blocks + _GROUP - 1) // _GROUP
    one = np.float32(1.0)
    for g in prange(groups):
        first = g * _GROUP
        last = min(blocks, first + _GROUP)
        base = first * blocksize
        values = _widen(raw, base, min(n, last * blocksize))
        size = values.size
        for b in range(last - first):
            start = b * blocksize
            stop = min(size, start + blocksize)
            peak = np.float32(0.0)
            finite = True
            for i in range(start, stop):
                a = abs(values[i])
                peak = max(peak, a)
                finite &= a <= _FLOAT_MAX
            safe = max(peak, _TINY)
            absmax[first + b] = (peak if stop - start == blocksize else safe) if finite else np.float32(np.nan)
            if stop - start == blocksize:  # full blocks multiply by the reciprocal, the last one divides
                inverse = one / safe
                for i in range(start, stop):
                    values[i] = min(max(values[i] * inverse, np.float32(-1.0)), one)
            else:
                for i in range(start, stop):
                    values[i] = min(max(values[i] / safe, np.float32(-1.0)), one)
        codes = np.zeros(size + 1, np.uint8)  # one spare: the zero that pads an odd-length tensor
        for i in range(size):
            code = 0
            for j in range(15):
                code += values[i] > bounds[j]
            codes[i] = code
        if size % 2:
            codes[size] = np.searchsorted(bounds, np.float32(0.0))
        for i in range(0, size, 2):
            packed[(base + i) // 2] = (order[codes[i]] << 4) | order[codes[i + 1]]


def quantize_4bit(chunk: np.ndarray, dtype: str, blocksize: int, quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Same contract as nf4.quantize_4bit, on stored bits (BF16 as uint16, F16 widened first)."""
    raw = chunk.reshape(-1)
    if dtype == "F16" or dtype == "F64":
        raw = raw.astype(np.float32)
    n = raw.size
    packed = np.empty((n + 1) // 2, np.uint8)
    absmax = np.empty(-(-n // blocksize), np.float32)
    _quantize_4bit(raw, blocksize, nf4.bounds(quant_type), nf4.ORDERS[quant_type], packed, absmax)
    return packed.reshape(-1, 1), absmax


@njit(cache=True, inline="always")
def _round_to_half(values, i):
    """values[i] := the nearest float16 value (ties to even), as float32; inf beyond float16's range."""
    x = values[i]
    a = abs(x)
    if a >= np.float32(6.103515625e-05):  # float16 normal range: keep 11 significant bits
        bits = values[i : i + 1].view(np.uint32)
        u = bits[0] & np.uint32(0x7FFFFFFF)
        u = (u + np.uint32(0xFFF) + ((u >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
        if u > np.uint32(0x477FE000):
            u = np.uint32(0x7F800000)
        bits[0] = u
        a = values[i]
    else:  # subnormal float16: multiples of 2**-24
        a = np.float32(np.rint(a * np.float32(16777216.0))) * np.float32(5.960464477539063e-08)
    values[i] = -a if x < 0 else a


@njit(cache=True, parallel=True)
def _quantize_int8(raw, rows, cols, codes, scb):
    one = np.float32(1.0)
    for r in prange(rows):
        values = _widen(raw, r * cols, (r + 1) * cols)
        peak = np.float32(0.0)
        finite = True
        for i in range(cols):
            _round_to_half(values, i)
            a = abs(values[i])
            peak = max(peak, a)
            finite &= a <= _FLOAT_MAX
        scb[r] = peak if finite else np.float32(np.nan)
        factor = (one / peak) * np.float32(127.0) if peak > 0 else np.float32(np.inf)
        for i in range(cols):
            q = np.rint(values[i] * factor)
            codes[r * cols + i] = np.int8(q) if np.isfinite(q) else np.int8(0)


def quantize_int8(chunk: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Same contract as int8.quantize_int8, on stored bits of a [rows, cols] chunk."""
    rows, cols = chunk.shape
    raw = chunk.reshape(-1)
    if dtype == "F16" or dtype == "F64":
        raw = raw.astype(np.float32)
    codes = np.empty(rows * cols, np.int8)
    scb = np.empty(rows, np.float32)
    _quantize_int8(raw, rows, cols, codes, scb)
    return codes.reshape(rows, cols), scb
