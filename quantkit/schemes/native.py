"""The compiled path: quantkit._kernels (quantkit/_kernels.c) behind the same contracts as the numpy
references in nf4.py, int8.py and ggml.py, and the same bytes; tests compare them.

Inputs are stored bits (BF16 as uint16, F32 as float32; F16 and F64 are widened to float32 here), read in
place, read-only memory maps included. `AVAILABLE` is False where the extension was not built (no C
compiler at install time); callers then take the numpy path.
"""

from __future__ import annotations

import functools
import os

import numpy as np

from quantkit.errors import QuantkitError

try:
    from quantkit import _kernels
except ImportError:
    _kernels = None

AVAILABLE = _kernels is not None


def threads() -> int:
    """Threads per kernel call: QUANTKIT_THREADS, else the CPUs this process may run on."""
    override = os.environ.get("QUANTKIT_THREADS")
    if override is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not override.isdigit() or int(override) < 1:
        raise QuantkitError(f"QUANTKIT_THREADS={override!r}: expected a whole number of threads, at least 1")
    return int(override)


@functools.cache
def _code_tables(quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """(midpoints, order) of a 4-bit type. nf4 is imported here: its tables take 8 ms to build, which a
    GGUF run, the other user of this module, has no need of."""
    from quantkit.schemes import nf4

    return nf4.bounds(quant_type), nf4.ORDERS[quant_type]


def _stored(chunk: np.ndarray, dtype: str) -> tuple[np.ndarray, bool]:
    """The chunk as the kernels read it, C-contiguous: (bfloat16 bits, True) or (float32 values, False)."""
    if dtype == "BF16":
        return np.ascontiguousarray(chunk, np.uint16), True
    return np.ascontiguousarray(chunk, np.float32), False


def quantize_4bit(chunk: np.ndarray, dtype: str, blocksize: int, quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """nf4.quantize_4bit of stored bits: (packed uint8 [(n+1)//2, 1], absmax float32 [blocks]); a block
    holding NaN or infinity gets a NaN absmax."""
    raw, bf16 = _stored(chunk, dtype)
    packed = np.empty(((raw.size + 1) // 2, 1), np.uint8)
    absmax = np.empty(-(-raw.size // blocksize), np.float32)
    _kernels.quantize_4bit(raw, bf16, blocksize, *_code_tables(quant_type), packed, absmax, threads())
    return packed, absmax


def quantize_int8(chunk: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """int8.quantize_int8 of the stored bits of a [rows, cols] chunk: (codes int8, SCB float32)."""
    rows, cols = chunk.shape
    raw, bf16 = _stored(chunk, dtype)
    codes = np.empty((rows, cols), np.int8)
    scb = np.empty(rows, np.float32)
    _kernels.quantize_int8(raw, bf16, cols, codes, scb, threads())
    return codes, scb


def dequantize_4bit(packed: np.ndarray, absmax: np.ndarray, table: np.ndarray, blocksize: int, first: int, count: int,
                    dtype: str) -> np.ndarray:
    """Stored bits in `dtype` (BF16 as uint16) of elements [first, first + count) of a 4-bit tensor, as
    nf4.dequantize_range computes them. `packed` may be in any storage dtype: its bytes are read."""
    out = np.empty(count, np.uint16 if dtype == "BF16" else np.float32)
    _kernels.dequantize_4bit(np.ascontiguousarray(packed), np.ascontiguousarray(absmax, np.float32),
                             np.ascontiguousarray(table, np.float32), blocksize, first, dtype == "BF16", out, threads())
    return out if dtype in ("BF16", "F32") else out.astype(np.float16 if dtype == "F16" else np.float64)


def quantize_q8_0(rows: np.ndarray, dtype: str) -> np.ndarray:
    """GGUF Q8_0 of stored rows whose length is a multiple of 32: [blocks, 34] uint8, each block its
    float16 scale then its 32 codes, the bytes of ggml.quantize_reference."""
    raw, bf16 = _stored(rows, dtype)
    blocks = np.empty((raw.size // 32, 34), np.uint8)
    _kernels.q8_0(raw, bf16, blocks, threads())
    return blocks
