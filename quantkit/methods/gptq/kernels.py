"""The compiled path of group-wise quantization: `groupwise.quantize_reference`'s float32 arithmetic,
one group at a time, rows in parallel (no fastmath, so the bytes are the reference's)."""

from __future__ import annotations

import numpy as np

from quantkit.jit import f16_round, njit, prange, use_threads  # noqa: F401 (use_threads: for the callers)


@njit(cache=True)
def _scale_kernel(span, steps):
    s = f16_round(span / steps)
    return max(s, np.float32(2.0**-24))


@njit(cache=True)
def _error_kernel(x, scale, zero, maxq):
    err = np.float32(0.0)
    lowest = np.float32(0.0)
    for k in range(x.size):
        q = min(max(np.rint(x[k] / scale) + zero, lowest), maxq)
        e = (q - zero) * scale - x[k]
        err += e * e
    return err


@njit(cache=True, parallel=True)
def quantize_groups(groups, bits, sym, min_zero, shrink, spread, refine, codes, scales, zeros):
    rows, count, size = groups.shape
    maxq = np.float32(2**bits - 1)
    f16_max = np.float32(65504.0)
    zero_f = np.float32(0.0)
    one = np.float32(1.0)
    zmin = np.float32(min_zero)
    for r in prange(rows):
        for g in range(count):
            x = groups[r, g]
            lo = min(x.min(), zero_f)
            hi = max(x.max(), zero_f)
            if sym:
                hi = max(-lo, hi)
                lo = -hi
            if lo == 0 and hi == 0:
                lo = np.float32(-1.0)
                hi = one
            if not sym and min_zero:
                lo = min(lo, -hi / np.float32(2**bits - 2))
            best_err = np.float32(np.inf)
            best_scale = zero_f
            best_zero = zero_f
            for p in shrink:
                scale = _scale_kernel(p * hi - p * lo, maxq)
                centre = np.float32(2 ** (bits - 1)) if sym else np.rint(-(p * lo) / scale)
                for dz in range(-spread, spread + 1):
                    zero = min(max(centre + np.float32(dz), zmin), maxq)
                    err = _error_kernel(x, scale, zero, maxq)
                    if err < best_err and scale <= f16_max:
                        best_err, best_scale, best_zero = err, scale, zero
            for _ in range(refine):
                num = zero_f
                den = zero_f
                for k in range(size):
                    q = min(max(np.rint(x[k] / best_scale) + best_zero, zero_f), maxq) - best_zero
                    num += x[k] * q
                    den += q * q
                fit = num / den if den > 0 else zero_f
                scale = _scale_kernel(fit, one) if fit > 0 else best_scale
                err = _error_kernel(x, scale, best_zero, maxq)
                if err < best_err and scale <= f16_max:
                    best_err, best_scale = err, scale
            for k in range(size):
                codes[r, g, k] = np.uint8(min(max(np.rint(x[k] / best_scale) + best_zero, zero_f), maxq))
            scales[r, g] = best_scale
            zeros[r, g] = np.uint8(best_zero)
