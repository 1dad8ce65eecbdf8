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
