"""numba kernels for the K-quants, whose numpy reference is too slow: Q4_K, Q6_K (Q8_0 is in C, native/gguf.c).

Imported only when a K-quant is written (numba costs ~0.4 s to import). Each kernel is a scalar port of the
C reference with every value held in float32 (`f32(...)` everywhere: numba would otherwise widen an
int times a float32 to float64) and no fastmath, so the bytes equal the numpy reference's.
Float16 rounding of the block scales is left to numpy, outside the kernels.
"""

from __future__ import annotations

import numpy as np

from quantkit.jit import f16_round, njit, prange, use_threads  # noqa: F401 (use_threads: for the callers)

f32 = np.float32
GROUP_MAX_EPS = np.float32(1e-15)


@njit(inline="always")
def _nearest_int(v):
    return int(np.rint(v))


@njit(cache=True)
def _make_qkx2_quants(x, w, L, Laux, nmax, rmin, rdelta, nstep):
    n = x.shape[0]
    lo = x[0]
    hi = x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < lo:  # noqa: PLR1730 - C's strict compares, kept literal (signed zeros)
            lo = x[i]
        if x[i] > hi:  # noqa: PLR1730
            hi = x[i]
        sum_w += w[i]
        sum_x += w[i] * x[i]
    if lo > 0:
        lo = f32(0)
    if hi == lo:
        for i in range(n):
            L[i] = 0
        return f32(0), -lo
    iscale = f32(nmax) / (hi - lo)
    scale = f32(1) / iscale
    best_error = f32(0)
    for i in range(n):
        q = min(nmax, max(0, _nearest_int(iscale * (x[i] - lo))))
        L[i] = q
        diff = scale * f32(q) + lo - x[i]
        best_error += w[i] * (diff * diff)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * f32(step) + f32(nmax)) / (hi - lo)
        sum_l = f32(0)
        sum_l2 = f32(0)
        sum_xl = f32(0)
        for i in range(n):
            q = min(nmax, max(0, _nearest_int(iscale * (x[i] - lo))))
            Laux[i] = q
            lf = f32(q)
            sum_l += w[i] * lf
            sum_l2 += w[i] * lf * lf
            sum_xl += w[i] * lf * x[i]
        det = sum_w * sum_l2 - sum_l * sum_l
        if det > 0:
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            if this_min > 0:
                this_min = f32(0)
                this_scale = sum_xl / sum_l2
            cur_error = f32(0)
            for i in range(n):
                diff = this_scale * f32(Laux[i]) + this_min - x[i]
                cur_error += w[i] * (diff * diff)
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                lo = this_min
    return scale, -lo


@njit(cache=True, parallel=True)
def q4_k_blocks(x, out, d_scales):
    """x [nb, 256] float32 -> out [nb, 144] but bytes 0..3, whose float16 d and dmin go to
    d_scales [nb, 2] as exactly representable float32 for the caller to store."""
    nb = x.shape[0]
    for i in prange(nb):
        L = np.empty(256, dtype=np.uint8)
        Laux = np.empty(32, dtype=np.uint8)
        weights = np.empty(32, dtype=np.float32)
        scales = np.empty(8, dtype=np.float32)
        mins = np.empty(8, dtype=np.float32)
        max_scale = f32(0)
        max_min = f32(0)
        for j in range(8):
            xs = x[i, 32 * j:32 * j + 32]
            sum_x2 = f32(0)
            for k in range(32):
                sum_x2 += xs[k] * xs[k]
            av_x = np.sqrt(sum_x2 / f32(32))
            for k in range(32):
                weights[k] = av_x + abs(xs[k])
            scales[j], mins[j] = _make_qkx2_quants(xs, weights, L[32 * j:32 * j + 32], Laux,
                                                   15, f32(-1), f32(0.1), 20)
            if scales[j] > max_scale:  # noqa: PLR1730
                max_scale = scales[j]
            if mins[j] > max_min:  # noqa: PLR1730
                max_min = mins[j]
        d_scales[i, 0] = f16_round(max_scale / f32(63))
        d_scales[i, 1] = f16_round(max_min / f32(63))
        inv_scale = f32(63) / max_scale if max_scale > 0 else f32(0)
        inv_min = f32(63) / max_min if max_min > 0 else f32(0)
        sc = out[i, 4:16]
        sc[:] = 0
        for j in range(8):
            ls = min(63, _nearest_int(inv_scale * scales[j]) & 0xFF)
            lm = min(63, _nearest_int(inv_min * mins[j]) & 0xFF)
            if j < 4:
                sc[j] = ls
                sc[j + 4] = lm
            else:
                sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
                sc[j - 4] |= (ls >> 4) << 6
                sc[j] |= (lm >> 4) << 6
            d = d_scales[i, 0] * f32(ls)
            if d == 0:
                continue
            dm = d_scales[i, 1] * f32(lm)
            for k in range(32):
                L[32 * j + k] = min(15, max(0, _nearest_int((x[i, 32 * j + k] + dm) / d)))
        for h in range(4):
            for k in range(32):
                out[i, 16 + 32 * h + k] = L[64 * h + k] | (L[64 * h + 32 + k] << 4)


@njit(cache=True)
def _make_qx_quants(x, L, nmax):
    n = x.shape[0]
    top = f32(0)
    amax = f32(0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            top = x[i]
    if amax < GROUP_MAX_EPS:
        for i in range(n):
            L[i] = 0
        return f32(0)
    iscale = f32(-nmax) / top
    sumlx = f32(0)
    suml2 = f32(0)
    for i in range(n):
        q = max(-nmax, min(nmax - 1, _nearest_int(iscale * x[i])))
        L[i] = q + nmax
        w = x[i] * x[i]
        sumlx += w * x[i] * f32(q)
        suml2 += w * f32(q) * f32(q)
    scale = sumlx / suml2 if suml2 != 0 else f32(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * f32(step)) / top
        sumlx = f32(0)
        suml2 = f32(0)
        for i in range(n):
            q = max(-nmax, min(nmax - 1, _nearest_int(iscale * x[i])))
            w = x[i] * x[i]
            sumlx += w * x[i] * f32(q)
            suml2 += w * f32(q) * f32(q)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, _nearest_int(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True, parallel=True)
def q6_k_blocks(x, out, d_scales):
    """x [nb, 256] float32 -> out [nb, 210] but the last two bytes, whose float16 d goes to
    d_scales [nb, 1] as in q4_k_blocks. An all-zero block is all zero bytes."""
    nb = x.shape[0]
    for i in prange(nb):
        L = np.empty(256, dtype=np.uint8)
        scales = np.empty(16, dtype=np.float32)
        max_scale = f32(0)
        max_abs_scale = f32(0)
        for ib in range(16):
            scales[ib] = _make_qx_quants(x[i, 16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16], 32)
            if abs(scales[ib]) > max_abs_scale:
                max_abs_scale = abs(scales[ib])
                max_scale = scales[ib]
        if max_abs_scale < GROUP_MAX_EPS:
            out[i, :] = 0
            d_scales[i, 0] = 0
            continue
        iscale = f32(-128) / max_scale
        d_scales[i, 0] = f16_round(f32(1) / iscale)
        for ib in range(16):
            s = min(127, _nearest_int(iscale * scales[ib]))
            out[i, 192 + ib] = s & 0xFF
            d = d_scales[i, 0] * f32(s)
            if d == 0:
                continue
            for k in range(16):
                L[16 * ib + k] = max(-32, min(31, _nearest_int(x[i, 16 * ib + k] / d))) + 32
        for half in range(2):
            for k in range(32):
                base = 128 * half + k
                q1, q2, q3, q4 = L[base], L[base + 32], L[base + 64], L[base + 96]
                out[i, 64 * half + k] = (q1 & 0xF) | ((q3 & 0xF) << 4)
                out[i, 64 * half + 32 + k] = (q2 & 0xF) | ((q4 & 0xF) << 4)
                out[i, 128 + 32 * half + k] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)
