"""The compiled path for bitsandbytes: quantkit.native's kernels behind the same contracts as the numpy
references in nf4.py and int8.py, and the same bytes; tests compare them.

Inputs are stored bits (BF16 as uint16, F32 as float32; F16 and F64 are widened to float32), read in place,
read-only memory maps included. `AVAILABLE` is False where the extension was not built.
"""

from __future__ import annotations

import functools

import numpy as np

from quantkit.methods.bnb import nf4
from quantkit.native import AVAILABLE, kernels, stored, threads

__all__ = ["AVAILABLE", "dequantize_4bit", "quantize_4bit", "quantize_int8"]


@functools.cache
def _code_tables(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """(midpoints, order) of a 4-bit type."""
    return nf4.bounds(quant_type), nf4.ORDERS[quant_type]


def quantize_4bit(chunk: np.ndarray, dtype: str, blocksize: int, quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """nf4.quantize_4bit of stored bits: (packed uint8 [(n+1)//2, 1], absmax float32 [blocks]); a block
    holding NaN or infinity gets a NaN absmax."""
    raw, bf16 = stored(chunk, dtype)
    packed = np.empty(((raw.size + 1) // 2, 1), np.uint8)
    absmax = np.empty(-(-raw.size // blocksize), np.float32)
    kernels.quantize_4bit(raw, bf16, blocksize, *_code_tables(quant_type), packed, absmax, threads())
    return packed, absmax


def quantize_int8(chunk: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """int8.quantize_int8 of the stored bits of a [rows, cols] chunk: (codes int8, SCB float32)."""
    rows, cols = chunk.shape
    raw, bf16 = stored(chunk, dtype)
    codes = np.empty((rows, cols), np.int8)
    scb = np.empty(rows, np.float32)
    kernels.quantize_int8(raw, bf16, cols, codes, scb, threads())
    return codes, scb


def dequantize_4bit(packed: np.ndarray, absmax: np.ndarray, table: np.ndarray, blocksize: int, first: int, count: int,
                    dtype: str) -> np.ndarray:
    """Stored bits in `dtype` (BF16 as uint16) of elements [first, first + count) of a 4-bit tensor, as
    nf4.dequantize_range computes them. `packed` may be in any storage dtype: its bytes are read."""
    out = np.empty(count, np.uint16 if dtype == "BF16" else np.float32)
    kernels.dequantize_4bit(np.ascontiguousarray(packed), np.ascontiguousarray(absmax, np.float32),
                            np.ascontiguousarray(table, np.float32), blocksize, first, dtype == "BF16", out, threads())
    return out if dtype in ("BF16", "F32") else out.astype(np.float16 if dtype == "F16" else np.float64)
