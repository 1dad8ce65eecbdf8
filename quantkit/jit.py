"""numba helpers the compiled kernels share (methods/gptq/kernels.py, methods/gguf/kernels.py).

Imported only by those kernels: numba costs ~0.4 s to import. The kernels run on numba's own thread pool
(workqueue): OpenMP's idle threads spin between kernel calls and take a core from the reading and
writing threads. The layer is chosen before numba loads.
"""

from __future__ import annotations

import math
import os

os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")

import numba  # noqa: E402
import numpy as np  # noqa: E402
from numba import njit, prange  # noqa: E402  (the kernels take them from here, after the layer is set)

from quantkit.native import threads  # noqa: E402

__all__ = ["f16_round", "njit", "prange", "use_threads"]


def use_threads() -> None:
    """Run the next parallel kernels on QUANTKIT_THREADS threads, as the C kernels do (numba's pool holds
    at most its start-up size, the CPU count: more are not there to use)."""
    numba.set_num_threads(min(threads(), numba.config.NUMBA_NUM_THREADS))


@njit(inline="always")
def f16_round(v):
    """The float16 nearest to float32 v (ties to even), as a float32, as numpy's astype(np.float16):
    scaling by the float16 ulp at v's exponent is exact, so one rint does the rounding. Beyond 65504
    it is infinity; the sign of a zero and a NaN are kept."""
    if v != v:
        return np.float32(v)
    a = abs(v)
    if a < 6.103515625e-05:
        ulp = 2.0**-24
    else:
        ulp = math.ldexp(1.0, math.frexp(a)[1] - 11)
    r = np.rint(a / ulp) * ulp
    if r > 65504.0:
        r = np.inf
    return np.float32(math.copysign(r, v))
