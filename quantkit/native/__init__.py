"""The compiled kernels: one extension, quantkit.native._kernels, built from this folder's C files (a shared
header and one file per family), and the thread count every kernel call uses.

`kernels` is None where the extension was not built (no C compiler at install time); the methods then
take their numpy references. The Python wrappers sit beside each family's references
(methods/bnb/native.py, methods/gguf/native.py).
"""

from __future__ import annotations

import os

import numpy as np

from quantkit.errors import QuantkitError

try:
    from quantkit.native import _kernels as kernels
except ImportError:
    kernels = None

AVAILABLE = kernels is not None


MAX_THREADS = 1024  # a thread count beyond this is a typo, not a machine


def threads() -> int:
    """Threads per kernel call (C and numba alike): QUANTKIT_THREADS, else the CPUs this process may run on."""
    override = os.environ.get("QUANTKIT_THREADS")
    if override is None:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if not override.isdigit() or not 1 <= int(override) <= MAX_THREADS:
        raise QuantkitError(f"QUANTKIT_THREADS={override!r}: expected a whole number of threads from 1 to {MAX_THREADS}")
    return int(override)


def stored(chunk: np.ndarray, dtype: str) -> tuple[np.ndarray, bool]:
    """The chunk as the kernels read it, C-contiguous: (bfloat16 bits, True) or (float32 values, False);
    F16 and F64 are widened to float32."""
    if dtype == "BF16":
        return np.ascontiguousarray(chunk, np.uint16), True
    return np.ascontiguousarray(chunk, np.float32), False


DENSE = {"BF16": 0, "F16": 1, "F32": 2}  # the dtypes the dense kernels take, as they number them
DENSE_STORAGE = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}  # their bits, as dtypes.STORAGE holds them
DENSE_KERNELS = AVAILABLE and hasattr(kernels, "fp8_dense") and hasattr(kernels, "nonfinite")


def nonfinite(bits: np.ndarray, dtype: str) -> bool:
    """Whether stored bits of BF16 / F16 / F32 (C-contiguous) hold a NaN or an infinity."""
    return kernels.nonfinite(bits, DENSE[dtype], threads())


def fp8_dense(codes: np.ndarray, scales: np.ndarray, block: tuple[int, int], first_row: int, scale_dtype: str, dtype: str) -> np.ndarray:
    """Stored `dtype` bits of e4m3 `codes` [rows, cols] (rows first_row.. of the weight) times their block's
    scale, the product rounded to `scale_dtype` first: scales float32 [*, ceil(cols / block[1])], the scale of
    element (r, c) at [(first_row + r) // block[0], c // block[1]]. `dtype` and `scale_dtype` in DENSE."""
    rows, cols = codes.shape
    dense = np.empty((rows, cols), DENSE_STORAGE[dtype])
    if codes.size:
        kernels.fp8_dense(np.ascontiguousarray(codes).view(np.uint8), cols, np.ascontiguousarray(scales, np.float32), block[0],
                          block[1], first_row, DENSE[scale_dtype], DENSE[dtype], dense, threads())
    return dense
