"""numba kernels for the types whose numpy reference is too slow: Q2_K, Q3_K, Q4_K, Q5_K, Q6_K, IQ4_NL,
IQ4_XS (Q8_0 is in C, native/gguf.c). Same bytes as the references in kquants.py / iquants.py.

Imported only when such a type is written (numba costs ~0.4 s to import). Each kernel is a scalar port of
the C, one (super-)block per prange iteration, every value held in float32 (`f32(...)` around each int
that meets a float: numba would otherwise widen to float64), no fastmath, and C's float semantics for
x / 0 (error_model="numpy"). Block scales are rounded to float16 inside (later steps see the stored
value) and handed out as exact float32 for numpy to store as float16 bits.
"""

from __future__ import annotations

import math

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from quantkit.jit import f16_round, njit, prange, use_threads
from quantkit.methods.gguf.blocks import row_bytes
from quantkit.methods.gguf.iquants import KVALUES

QType = GGMLQuantizationType
f32 = np.float32
GROUP_MAX_EPS = np.float32(1e-15)
KV = KVALUES.astype(np.float32)


@njit(cache=True, error_model="numpy")
def _nearest_int_bits(v):
    """C's nearest_int outside +-2^22: the low 23 mantissa bits of v + 1.5 * 2^23, minus 2^22."""
    val = f32(v + f32(12582912.0))
    if val != val:
        return 0
    if math.isinf(val) or val == 0:
        return -4194304
    m, e = math.frexp(abs(float(val)))  # |val| = m 2^e with 0.5 <= m < 1; a normal float32 here
    return (int((m * 2.0 - 1.0) * 8388608.0) & 0x7FFFFF) - 0x400000


@njit(inline="always")
def _nearest_int(v):
    if abs(v) <= f32(4194303.0):
        return int(v + f32(12582912.0)) - 12582912  # the float32 add rounds half to even, exactly
    return _nearest_int_bits(v)


# --------------------------------------------------------------------------------- make_qkx2_quants


@njit(cache=True, error_model="numpy")
def _make_qkx2_quants(x, w, L, Laux, nmax, rmin, rdelta, nstep, use_mad):
    n = x.shape[0]
    lo = x[0]
    hi = x[0]
    sum_w = w[0]
    sum_x = sum_w * x[0]
    for i in range(1, n):
        if x[i] < lo:  # noqa: PLR1730 - C's strict compares, kept literal (signed zeros, NaN)
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
        best_error += w[i] * (abs(diff) if use_mad else diff * diff)
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
                cur_error += w[i] * (abs(diff) if use_mad else diff * diff)
            if cur_error < best_error:
                for i in range(n):
                    L[i] = Laux[i]
                best_error = cur_error
                scale = this_scale
                lo = this_min
    return scale, -lo


# ----------------------------------------------------------------------------------------------- Q2_K


@njit(cache=True, parallel=True, error_model="numpy")
def q2_k_blocks(x, out, dd):
    """x [nb, 256] -> out [nb, 84] but bytes 80..83, whose float16 d, dmin go to dd [nb, 2]."""
    for i in prange(x.shape[0]):
        L = np.empty(256, dtype=np.int64)
        Laux = np.empty(16, dtype=np.int64)
        weights = np.empty(16, dtype=np.float32)
        scales = np.empty(16, dtype=np.float32)
        mins = np.empty(16, dtype=np.float32)
        max_scale = f32(0)
        max_min = f32(0)
        for j in range(16):
            xs = x[i, 16 * j:16 * j + 16]
            for k in range(16):
                weights[k] = abs(xs[k])
            scales[j], mins[j] = _make_qkx2_quants(xs, weights, L[16 * j:16 * j + 16], Laux, 3, f32(-0.5), f32(0.1),
                                                   15, True)
            if scales[j] > max_scale:  # noqa: PLR1730
                max_scale = scales[j]
            if mins[j] > max_min:  # noqa: PLR1730
                max_min = mins[j]
        sc = out[i, 0:16]
        sc[:] = 0
        dd[i, 0] = f32(0)
        dd[i, 1] = f32(0)
        if max_scale > 0:
            iscale = f32(15) / max_scale
            for j in range(16):
                sc[j] = _nearest_int(iscale * scales[j]) & 0xFF
            dd[i, 0] = f16_round(max_scale / f32(15))
        if max_min > 0:
            iscale = f32(15) / max_min
            for j in range(16):
                sc[j] |= (_nearest_int(iscale * mins[j]) << 4) & 0xFF
            dd[i, 1] = f16_round(max_min / f32(15))
        for j in range(16):
            d = dd[i, 0] * f32(sc[j] & 0xF)
            if d == 0:
                continue
            dm = dd[i, 1] * f32(sc[j] >> 4)
            for k in range(16):
                L[16 * j + k] = min(3, max(0, _nearest_int((x[i, 16 * j + k] + dm) / d)))
        for h in range(2):
            for k in range(32):
                b = 128 * h + k
                out[i, 16 + 32 * h + k] = L[b] | (L[b + 32] << 2) | (L[b + 64] << 4) | (L[b + 96] << 6)


# ----------------------------------------------------------------------------------------------- Q3_K


@njit(cache=True, error_model="numpy")
def _signed_top(x):
    """(max |x|, the x it belongs to), the first one on ties, from 0."""
    top = f32(0)
    amax = f32(0)
    for i in range(x.shape[0]):
        if abs(x[i]) > amax:
            amax = abs(x[i])
            top = x[i]
    return amax, top


@njit(cache=True, error_model="numpy")
def _qx_fit(x, L, iscale, nmax, offset):
    """Codes clamp(nearest_int(iscale x), -nmax, nmax - 1) + offset to L; (sum w x l, sum w l^2), w = x^2."""
    sumlx = f32(0)
    suml2 = f32(0)
    for i in range(x.shape[0]):
        q = max(-nmax, min(nmax - 1, _nearest_int(iscale * x[i])))
        L[i] = q + offset
        w = x[i] * x[i]
        sumlx += w * x[i] * f32(q)
        suml2 += w * f32(q) * f32(q)
    return sumlx, suml2


@njit(cache=True, error_model="numpy")
def _make_q3_quants(x, L, nmax):
    n = x.shape[0]
    amax, top = _signed_top(x)
    if amax < GROUP_MAX_EPS:
        L[:n] = 0
        return f32(0)
    sumlx, suml2 = _qx_fit(x, L, f32(-nmax) / top, nmax, 0)
    for _ in range(5):
        changed = 0
        for i in range(n):
            w = x[i] * x[i]
            li = f32(L[i])
            slx = sumlx - w * x[i] * li
            if slx > 0:
                sl2 = suml2 - w * li * li
                new = max(-nmax, min(nmax - 1, _nearest_int(x[i] * sl2 / slx)))
                if new != L[i]:
                    slx += w * x[i] * f32(new)
                    sl2 += w * f32(new) * f32(new)
                    if sl2 > 0 and slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new
                        sumlx = slx
                        suml2 = sl2
                        changed += 1
        if changed == 0:
            break
    for i in range(n):
        L[i] += nmax
    return sumlx / suml2 if suml2 > 0 else f32(0)


@njit(cache=True, parallel=True, error_model="numpy")
def q3_k_blocks(x, out, dd):
    """x [nb, 256] -> out [nb, 110] but bytes 108..109, whose float16 d goes to dd [nb, 1]."""
    for i in prange(x.shape[0]):
        L = np.empty(256, dtype=np.int64)
        scales = np.empty(16, dtype=np.float32)
        max_scale = f32(0)
        amax = f32(0)
        for j in range(16):
            scales[j] = _make_q3_quants(x[i, 16 * j:16 * j + 16], L[16 * j:16 * j + 16], 4)
            if abs(scales[j]) > amax:
                amax = abs(scales[j])
                max_scale = scales[j]
        l6 = np.zeros(16, dtype=np.int64)  # 6-bit scales; all 0 (bytes 0) when max_scale is 0
        dd[i, 0] = f32(0)
        if max_scale != 0:
            iscale = f32(-32) / max_scale
            for j in range(16):
                q = _nearest_int(iscale * scales[j]) & 0xFF
                if q > 127:
                    q -= 256  # int8_t wrap
                l6[j] = max(-32, min(31, q)) + 32
            dd[i, 0] = f16_round(f32(1) / iscale)
        out[i, 96:108] = 0
        for j in range(16):
            out[i, 96 + j % 8] |= (l6[j] & 0xF) << (4 * (j // 8))
            out[i, 104 + j % 4] |= (l6[j] >> 4) << (2 * (j // 4))
        for j in range(16):
            d = dd[i, 0] * f32(l6[j] - 32)
            if d == 0:
                continue
            for k in range(16):
                L[16 * j + k] = max(-4, min(3, _nearest_int(x[i, 16 * j + k] / d))) + 4
        out[i, 0:32] = 0
        for j in range(256):
            if L[j] > 3:
                out[i, j % 32] |= 1 << (j // 32)
                L[j] -= 4
        for h in range(2):
            for k in range(32):
                b = 128 * h + k
                out[i, 32 + 32 * h + k] = L[b] | (L[b + 32] << 2) | (L[b + 64] << 4) | (L[b + 96] << 6)


# ------------------------------------------------------------------------------------------ Q4_K, Q5_K


@njit(cache=True, error_model="numpy")
def _scale_min_block(xb, L, sc, dd, nmax, rmin, nstep):
    """One Q4_K / Q5_K super-block: codes to L [256], the 12 scale bytes to sc, float16 d and dmin to dd [2]."""
    Laux = np.empty(32, dtype=np.int64)
    weights = np.empty(32, dtype=np.float32)
    scales = np.empty(8, dtype=np.float32)
    mins = np.empty(8, dtype=np.float32)
    max_scale = f32(0)
    max_min = f32(0)
    for j in range(8):
        xs = xb[32 * j:32 * j + 32]
        sum_x2 = f32(0)
        for k in range(32):
            sum_x2 += xs[k] * xs[k]
        av_x = np.sqrt(sum_x2 / f32(32))
        for k in range(32):
            weights[k] = av_x + abs(xs[k])
        scales[j], mins[j] = _make_qkx2_quants(xs, weights, L[32 * j:32 * j + 32], Laux, nmax, rmin, f32(0.1),
                                               nstep, False)
        if scales[j] > max_scale:  # noqa: PLR1730
            max_scale = scales[j]
        if mins[j] > max_min:  # noqa: PLR1730
            max_min = mins[j]
    dd[0] = f16_round(max_scale / f32(63))
    dd[1] = f16_round(max_min / f32(63))
    inv_scale = f32(63) / max_scale if max_scale > 0 else f32(0)
    inv_min = f32(63) / max_min if max_min > 0 else f32(0)
    sc[:] = 0
    for j in range(8):
        ls = min(63, _nearest_int(inv_scale * scales[j]) & 0xFF)
        lm = min(63, _nearest_int(inv_min * mins[j]) & 0xFF)
        if j < 4:
            sc[j] |= ls
            sc[j + 4] |= lm
        else:
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            sc[j - 4] |= (ls >> 4) << 6
            sc[j] |= (lm >> 4) << 6
        d = dd[0] * f32(ls)
        if d == 0:
            continue
        dm = dd[1] * f32(lm)
        for k in range(32):
            L[32 * j + k] = min(nmax, max(0, _nearest_int((xb[32 * j + k] + dm) / d)))


@njit(cache=True, parallel=True, error_model="numpy")
def q4_k_blocks(x, out, dd):
    """x [nb, 256] -> out [nb, 144] but bytes 0..3, whose float16 d, dmin go to dd [nb, 2]."""
    for i in prange(x.shape[0]):
        L = np.empty(256, dtype=np.int64)
        _scale_min_block(x[i], L, out[i, 4:16], dd[i], 15, f32(-1), 20)
        for h in range(4):
            for k in range(32):
                out[i, 16 + 32 * h + k] = L[64 * h + k] | (L[64 * h + 32 + k] << 4)


@njit(cache=True, parallel=True, error_model="numpy")
def q5_k_blocks(x, out, dd):
    """x [nb, 256] -> out [nb, 176] but bytes 0..3, whose float16 d, dmin go to dd [nb, 2]."""
    for i in prange(x.shape[0]):
        L = np.empty(256, dtype=np.int64)
        _scale_min_block(x[i], L, out[i, 4:16], dd[i], 31, f32(-0.5), 15)
        out[i, 16:48] = 0
        for g in range(4):
            for k in range(32):
                first = L[64 * g + k]
                second = L[64 * g + 32 + k]
                out[i, 16 + k] |= ((first >> 4) << (2 * g)) | ((second >> 4) << (2 * g + 1))
                out[i, 48 + 32 * g + k] = (first & 0xF) | ((second & 0xF) << 4)


# ----------------------------------------------------------------------------------------------- Q6_K


@njit(cache=True, error_model="numpy")
def _make_qx_quants(x, L, Laux, nmax):
    """make_qx_quants with rmse_type 1 and weights x^2: codes + nmax to L, the scale returned."""
    amax, top = _signed_top(x)
    if amax < GROUP_MAX_EPS:
        L[:] = 0
        return f32(0)
    sumlx, suml2 = _qx_fit(x, L, f32(-nmax) / top, nmax, nmax)
    scale = sumlx / suml2 if suml2 != 0 else f32(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        sumlx, suml2 = _qx_fit(x, Laux, -(f32(nmax) + f32(0.1) * f32(step)) / top, nmax, nmax)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            L[:] = Laux
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@njit(cache=True, parallel=True, error_model="numpy")
def q6_k_blocks(x, out, dd):
    """x [nb, 256] -> out [nb, 210] but the last two bytes, whose float16 d goes to dd [nb, 1].
    An all-zero block is all zero bytes."""
    for i in prange(x.shape[0]):
        L = np.empty(256, dtype=np.int64)
        Laux = np.empty(16, dtype=np.int64)
        scales = np.empty(16, dtype=np.float32)
        max_scale = f32(0)
        max_abs_scale = f32(0)
        for ib in range(16):
            scales[ib] = _make_qx_quants(x[i, 16 * ib:16 * ib + 16], L[16 * ib:16 * ib + 16], Laux, 32)
            if abs(scales[ib]) > max_abs_scale:
                max_abs_scale = abs(scales[ib])
                max_scale = scales[ib]
        if max_abs_scale < GROUP_MAX_EPS:
            out[i, :] = 0
            dd[i, 0] = 0
            continue
        iscale = f32(-128) / max_scale
        dd[i, 0] = f16_round(f32(1) / iscale)
        for ib in range(16):
            s = min(127, _nearest_int(iscale * scales[ib]))
            out[i, 192 + ib] = s & 0xFF
            d = dd[i, 0] * f32(s)
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


# ---------------------------------------------------------------------------------------------- IQ4_*


@njit(inline="always")
def _best_index(x):
    if x <= KV[0]:
        return 0
    if x >= KV[15]:
        return 15
    lo = 0
    hi = 15
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if x < KV[mid]:
            hi = mid
        else:
            lo = mid
    return hi - 1 if x - KV[hi - 1] < KV[hi] - x else hi


@njit(cache=True, error_model="numpy")
def _iq4_fit(xb, inverse):
    """(sum w q x, sum w q^2) with q the table value nearest to inverse * x, weights x^2."""
    sumqx = f32(0)
    sumq2 = f32(0)
    for j in range(xb.shape[0]):
        q = KV[_best_index(inverse * xb[j])]
        w = xb[j] * xb[j]
        sumqx += w * q * xb[j]
        sumq2 += w * q * q
    return sumqx, sumq2


@njit(cache=True, error_model="numpy")
def _iq4_block_scale(xb, ntry):
    """quantize_row_iq4_nl_impl's scale search for one block of 32; 0 for an empty block."""
    amax, top = _signed_top(xb)
    if amax < GROUP_MAX_EPS:
        return f32(0)
    sumqx, sumq2 = _iq4_fit(xb, f32(1) / (-top / KV[0]))
    d = sumqx / sumq2 if sumq2 > 0 else f32(0)
    best = d * sumqx
    for itry in range(-ntry, ntry + 1):
        sumqx, sumq2 = _iq4_fit(xb, f32(itry - 127) / top)
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@njit(cache=True, parallel=True, error_model="numpy")
def iq4_nl_blocks(x, out, dd):
    """x [nb, 32] -> out [nb, 18] but bytes 0..1, whose float16 d goes to dd [nb, 1]."""
    for i in prange(x.shape[0]):
        d = _iq4_block_scale(x[i], 7)
        dd[i, 0] = f16_round(d)
        inverse = f32(1) / d if d != 0 else f32(0)
        for j in range(16):
            out[i, 2 + j] = _best_index(inverse * x[i, j]) | (_best_index(inverse * x[i, 16 + j]) << 4)


@njit(cache=True, parallel=True, error_model="numpy")
def iq4_xs_blocks(x, out, dd):
    """x [nb, 256] -> out [nb, 136] but bytes 0..1, whose float16 d goes to dd [nb, 1]."""
    for i in prange(x.shape[0]):
        scales = np.empty(8, dtype=np.float32)
        amax = f32(0)
        max_scale = f32(0)
        for ib in range(8):
            scales[ib] = _iq4_block_scale(x[i, 32 * ib:32 * ib + 32], 7)
            if abs(scales[ib]) > amax:
                amax = abs(scales[ib])
                max_scale = scales[ib]
        d = -max_scale / f32(32)
        dd[i, 0] = f16_round(d)
        inverse = f32(1) / d if d != 0 else f32(0)
        scales_h = 0
        out[i, 4:8] = 0
        for ib in range(8):
            ls = max(-32, min(31, _nearest_int(inverse * scales[ib])))
            dl = d * f32(ls)
            inverse_l = f32(1) / dl if dl != 0 else f32(0)
            for j in range(16):
                low = _best_index(inverse_l * x[i, 32 * ib + j])
                high = _best_index(inverse_l * x[i, 32 * ib + 16 + j])
                out[i, 8 + 16 * ib + j] = low | (high << 4)
            ls += 32
            out[i, 4 + ib // 2] |= (ls & 0xF) << (4 * (ib % 2))
            scales_h |= (ls >> 4) << (2 * ib)
        out[i, 2] = scales_h & 0xFF
        out[i, 3] = scales_h >> 8


# ---------------------------------------------------------------------------------------------- entry

# qtype -> (kernel, values per kernel block, float16 scales per block, where they go in the block)
KERNELS = {
    QType.Q2_K: (q2_k_blocks, 256, 2, 80), QType.Q3_K: (q3_k_blocks, 256, 1, 108),
    QType.Q4_K: (q4_k_blocks, 256, 2, 0), QType.Q5_K: (q5_k_blocks, 256, 2, 0), QType.Q6_K: (q6_k_blocks, 256, 1, 208),
    QType.IQ4_NL: (iq4_nl_blocks, 32, 1, 0), QType.IQ4_XS: (iq4_xs_blocks, 256, 1, 0),
}  # fmt: skip


def quantize(rows: np.ndarray, qtype: QType) -> np.ndarray:
    """float32 rows [n, k] -> stored bytes [n, row bytes], the reference's bytes."""
    kernel, block, n_scales, at = KERNELS[qtype]
    use_threads()
    n, k = rows.shape
    length = row_bytes(qtype, k)  # refuses partial blocks before the kernel runs
    x = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, block)
    out = np.empty((x.shape[0], GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8)
    scales = np.empty((x.shape[0], n_scales), dtype=np.float32)
    kernel(x, out, scales)
    with np.errstate(over="ignore"):
        out[:, at:at + 2 * n_scales] = scales.astype(np.float16).view(np.uint8)
    return out.reshape(n, length)
