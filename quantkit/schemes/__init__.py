"""One module per scheme: the numpy reference beside its compiled fast path."""

import os

# The numba kernels (group-wise integers, K-quants) run on numba's own thread pool: OpenMP's idle threads
# spin between kernel calls and take a core from the reading and writing threads. Set before numba loads.
os.environ.setdefault("NUMBA_THREADING_LAYER", "workqueue")
