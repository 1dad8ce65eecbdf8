"""The K-quants (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: super-blocks of 256 values) as numpy references, byte for
byte as llama-quantize writes them without an importance matrix: `quantize_row_q{2..6}_K_ref` of
ggml-quants.c (llama.cpp as vendored by llama-cpp-python 0.3.36), reimplemented from the C as a spec.

Vectorized across sub-blocks, with every sum taken in C's left-to-right float32 order and every product
rounded before the next operation (libggml is built without fused multiply-add). What byte identity
hangs on: `nearest_int` is C's bit trick (round half to even inside +-2^22, the same bits outside);
maxima update only on strictly greater (first one wins, signed zeros kept); a winning trial in
`make_qkx2_quants` overwrites `min`, which the later trials use; a sub-block whose final scale is 0
keeps its first-pass codes; float16 rounds to nearest even (numpy's astype, as GGML_FP32_TO_FP16).
The numba kernels (kernels.py) compute the same bytes one super-block per iteration.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from quantkit.methods.gguf.blocks import row_bytes

QType = GGMLQuantizationType
QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
f32 = np.float32
_MAGIC = f32(12582912.0)  # 1.5 * 2^23


def nearest_int(v: np.ndarray) -> np.ndarray:
    """C's nearest_int on float32: (bits(v + 1.5 * 2^23) & 0x7fffff) - 0x400000, as int32."""
    with np.errstate(all="ignore"):
        bits = (np.asarray(v, dtype=np.float32) + _MAGIC).view(np.int32)
    return (bits & np.int32(0x007FFFFF)) - np.int32(0x00400000)


def running_sum(terms: np.ndarray, axis: int = -1) -> np.ndarray:
    """Sum along `axis` strictly left to right in float32 (np.sum would go pairwise)."""
    terms = np.moveaxis(terms, axis, 0)
    acc = terms[0].copy()
    for i in range(1, terms.shape[0]):
        acc += terms[i]
    return acc


def running_max(values: np.ndarray) -> np.ndarray:
    """`if (v[j] > m) m = v[j]` from m = 0 over the last axis: NaN never wins, -0.0 stays +0."""
    m = np.zeros(values.shape[:-1], dtype=np.float32)
    for j in range(values.shape[-1]):
        m = np.where(values[..., j] > m, values[..., j], m)
    return m


def signed_max(values: np.ndarray, axis: int = -1) -> tuple[np.ndarray, np.ndarray]:
    """`if (fabsf(v) > amax) { amax = fabsf(v); max = v; }` from 0 along `axis` -> (amax, max)."""
    values = np.moveaxis(values, axis, 0)
    amax = np.zeros(values.shape[1:], dtype=np.float32)
    top = np.zeros(values.shape[1:], dtype=np.float32)
    for v in values:
        wins = np.abs(v) > amax
        amax = np.where(wins, np.abs(v), amax)
        top = np.where(wins, v, top)
    return amax, top


def to_f16(v: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.asarray(v, dtype=np.float32).astype(np.float16)


def _f(ints: np.ndarray) -> np.ndarray:
    """int -> float32, C's implicit conversion in `float * int`."""
    return np.asarray(ints).astype(np.float32)


def pack_2bit(codes: np.ndarray) -> np.ndarray:
    """[nb, 256] codes 0..3 -> [nb, 64]: each 128 values are four runs of 32 sharing a byte."""
    c = codes.astype(np.uint8).reshape(-1, 2, 4, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 2) | (c[:, :, 2] << 4) | (c[:, :, 3] << 6)).reshape(-1, 64)


def pack_low_high(codes: np.ndarray) -> np.ndarray:
    """[nb, 256] codes: each 64 values -> 32 bytes, value l in the low nibble, value l + 32 in the high."""
    c = (codes.astype(np.uint8) & 0xF).reshape(-1, 4, 2, 32)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(-1, 128)


# ------------------------------------------------------------------------- make_qkx2_quants (Q2_K, Q4_K, Q5_K)


def make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int, rmin: float, rdelta: float, nstep: int,
                     use_mad: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sub-blocks x [S, n] with weights w -> (codes [S, n], scale [S], the_min [S]) by a scale/min search."""
    lo = x[:, 0].copy()
    hi = x[:, 0].copy()
    sum_w = w[:, 0].copy()
    sum_x = sum_w * x[:, 0]
    for i in range(1, x.shape[1]):
        lo = np.where(x[:, i] < lo, x[:, i], lo)
        hi = np.where(x[:, i] > hi, x[:, i], hi)
        sum_w = sum_w + w[:, i]
        sum_x = sum_x + w[:, i] * x[:, i]
    lo = np.where(lo > 0, f32(0), lo)
    flat = hi == lo

    def error(diff: np.ndarray) -> np.ndarray:
        return running_sum(w * (np.abs(diff) if use_mad else diff * diff))

    with np.errstate(all="ignore"):
        iscale = f32(nmax) / (hi - lo)
        scale = f32(1) / iscale
        codes = np.clip(nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        best_error = error(scale[:, None] * _f(codes) + lo[:, None] - x)
        for step in range(nstep + 1):
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (hi - lo)
            trial = np.clip(nearest_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)
            lf = _f(trial)
            sum_l = running_sum(w * lf)
            sum_l2 = running_sum(w * lf * lf)
            sum_xl = running_sum(w * lf * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clamp = this_min > 0
            this_min = np.where(clamp, f32(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            cur_error = error(this_scale[:, None] * lf + this_min[:, None] - x)
            better = (det > 0) & (cur_error < best_error) & ~flat
            codes = np.where(better[:, None], trial, codes)
            best_error = np.where(better, cur_error, best_error)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
    codes = np.where(flat[:, None], 0, codes)
    scale = np.where(flat, f32(0), scale)
    return codes, scale, -lo


# ----------------------------------------------------------------------------------------------- Q2_K


def quantize_q2_k_reference(rows: np.ndarray) -> np.ndarray:
    """float32 rows [n, k], k a multiple of 256 -> Q2_K bytes [n, k / 256 * 84]."""
    n, k = rows.shape
    x = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, 16)
    nb = x.shape[0] // 16
    codes, scales, mins = make_qkx2_quants(x, np.abs(x), 3, -0.5, 0.1, 15, use_mad=True)
    scales, mins = scales.reshape(nb, 16), mins.reshape(nb, 16)
    max_scale, max_min = running_max(scales), running_max(mins)
    has_s, has_m = max_scale > 0, max_min > 0
    with np.errstate(all="ignore"):
        ls = np.where(has_s[:, None], nearest_int((f32(15) / max_scale)[:, None] * scales), 0)
        lm = np.where(has_m[:, None], nearest_int((f32(15) / max_min)[:, None] * mins), 0)
        sc = ((ls & 0xFF) | ((lm << 4) & 0xFF)).astype(np.uint8)
        d16 = to_f16(np.where(has_s, max_scale / f32(15), f32(0)))
        m16 = to_f16(np.where(has_m, max_min / f32(15), f32(0)))
        d = (d16.astype(np.float32)[:, None] * _f(sc & 0xF)).reshape(-1, 1)
        dm = (m16.astype(np.float32)[:, None] * _f(sc >> 4)).reshape(-1, 1)
        requant = np.clip(nearest_int((x + dm) / d), 0, 3)
    codes = np.where(d != 0, requant, codes).reshape(nb, 256)
    out = np.concatenate([sc, pack_2bit(codes), d16.view(np.uint8).reshape(nb, 2), m16.view(np.uint8).reshape(nb, 2)],
                         axis=1)
    return out.reshape(n, row_bytes(QType.Q2_K, k))


# ----------------------------------------------------------------------------------------------- Q3_K


def _make_q3_quants(x: np.ndarray, nmax: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """make_q3_quants with do_rmse on sub-blocks held position-major, x [16, S] (each step of C's loop over
    a sub-block's positions is one vector operation) -> (codes [16, S] in 0..2 nmax - 1, scale [S])."""
    n = x.shape[0]
    amax, top = signed_max(x, axis=0)
    zero = amax < GROUP_MAX_EPS
    w = x * x
    wx = w * x
    with np.errstate(all="ignore"):
        codes = np.clip(nearest_int((f32(-nmax) / top) * x), -nmax, nmax - 1)
        lf = _f(codes)
        sumlx = running_sum(wx * lf, axis=0)
        suml2 = running_sum(w * lf * lf, axis=0)
        for _ in range(5):  # a sweep that changes nothing leaves the state as is: no early exit needed
            for i in range(n):
                li = _f(codes[i])
                slx = sumlx - wx[i] * li
                positive = slx > 0
                sl2 = suml2 - w[i] * li * li
                new = np.clip(nearest_int(x[i] * sl2 / slx), -nmax, nmax - 1)
                nf = _f(new)
                slx = slx + wx[i] * nf
                sl2 = sl2 + w[i] * nf * nf
                take = positive & (new != codes[i]) & (sl2 > 0) & (slx * slx * suml2 > sumlx * sumlx * sl2)
                codes[i] = np.where(take, new, codes[i])
                sumlx = np.where(take, slx, sumlx)
                suml2 = np.where(take, sl2, suml2)
        scale = np.where(suml2 > 0, sumlx / suml2, f32(0))
    return np.where(zero, 0, codes + nmax), np.where(zero, f32(0), scale)


def quantize_q3_k_reference(rows: np.ndarray) -> np.ndarray:
    """float32 rows [n, k], k a multiple of 256 -> Q3_K bytes [n, k / 256 * 110]."""
    n, k = rows.shape
    x = np.ascontiguousarray(np.asarray(rows, dtype=np.float32).reshape(-1, 16).T)  # [16, S]
    nb = x.shape[1] // 16
    codes, scales = _make_q3_quants(x)
    scales = scales.reshape(nb, 16)
    _, max_scale = signed_max(scales)
    has = max_scale != 0
    with np.errstate(all="ignore"):
        iscale = f32(-32) / max_scale
        l8 = nearest_int(iscale[:, None] * scales).astype(np.int8)  # int -> int8_t wraps, as in C
        l6 = np.where(has[:, None], np.clip(l8.astype(np.int32), -32, 31) + 32, 0).astype(np.uint8)
        d16 = to_f16(np.where(has, f32(1) / iscale, f32(0)))
        d = (d16.astype(np.float32)[:, None] * _f(l6.astype(np.int32) - 32)).reshape(1, -1)
        requant = np.clip(nearest_int(x / d), -4, 3) + 4
    codes = np.where(d != 0, requant, codes).T.reshape(nb, 256)
    return pack_q3_k(codes, l6, d16).reshape(n, row_bytes(QType.Q3_K, k))


def pack_q3_k(codes: np.ndarray, l6: np.ndarray, d16: np.ndarray) -> np.ndarray:
    """codes [nb, 256] in 0..7, 6-bit scales + 32 [nb, 16], float16 d [nb] -> block_q3_K bytes [nb, 110]."""
    nb = codes.shape[0]
    packed_scales = np.zeros((nb, 12), dtype=np.uint8)
    packed_scales[:, 0:8] = (l6[:, 0:8] & 0xF) | ((l6[:, 8:16] & 0xF) << 4)
    for j in range(16):
        packed_scales[:, 8 + j % 4] |= (l6[:, j] >> 4) << (2 * (j // 4))
    high = codes > 3
    hmask = np.zeros((nb, 32), dtype=np.uint8)
    for bit, run in enumerate(high.astype(np.uint8).reshape(nb, 8, 32).transpose(1, 0, 2)):
        hmask |= run << bit
    codes = np.where(high, codes - 4, codes)
    return np.concatenate([hmask, pack_2bit(codes), packed_scales, d16.view(np.uint8).reshape(nb, 2)], axis=1)


# ------------------------------------------------------------------------------------------ Q4_K, Q5_K


def pack_scales_mins(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per block [nb, 8] -> the 12 packed bytes of block_q4_K / q5_K.scales."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4] | ((ls[:, 4:8] >> 4) << 6)
    out[:, 4:8] = lm[:, 0:4] | ((lm[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    return out


def _to_u6(v: np.ndarray) -> np.ndarray:
    """`uint8_t l = nearest_int(v); l = MIN(63, l)`, the uint8 wrap of a negative included."""
    return np.minimum(63, nearest_int(v) & 0xFF).astype(np.uint8)


def _scale_min_blocks(rows: np.ndarray, nmax: int, rmin: float, nstep: int):
    """Q4_K / Q5_K's common part: per super-block (d, dmin as float16, the 12 scale bytes, codes [nb, 256])."""
    x = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, 32)
    nb = x.shape[0] // 8
    with np.errstate(all="ignore"):
        av_x = np.sqrt(running_sum(x * x) / f32(32))
    codes, scales, mins = make_qkx2_quants(x, av_x[:, None] + np.abs(x), nmax, rmin, 0.1, nstep)
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale, max_min = running_max(scales), running_max(mins)
    with np.errstate(all="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
        ls = _to_u6(inv_scale[:, None] * scales)
        lm = _to_u6(inv_min[:, None] * mins)
        d16, dmin16 = to_f16(max_scale / f32(63)), to_f16(max_min / f32(63))
        d = (d16.astype(np.float32)[:, None] * _f(ls)).reshape(-1, 1)
        dm = (dmin16.astype(np.float32)[:, None] * _f(lm)).reshape(-1, 1)
        requant = np.clip(nearest_int((x + dm) / d), 0, nmax)
    codes = np.where(d != 0, requant, codes).reshape(nb, 256)
    head = np.concatenate([d16.view(np.uint8).reshape(nb, 2), dmin16.view(np.uint8).reshape(nb, 2),
                           pack_scales_mins(ls, lm)], axis=1)
    return head, codes


def quantize_q4_k_reference(rows: np.ndarray) -> np.ndarray:
    """float32 rows [n, k], k a multiple of 256 -> Q4_K bytes [n, k / 256 * 144]."""
    n, k = rows.shape
    head, codes = _scale_min_blocks(rows, 15, -1.0, 20)
    return np.concatenate([head, pack_low_high(codes)], axis=1).reshape(n, row_bytes(QType.Q4_K, k))


def quantize_q5_k_reference(rows: np.ndarray) -> np.ndarray:
    """float32 rows [n, k], k a multiple of 256 -> Q5_K bytes [n, k / 256 * 176]: the fifth bits of each
    64 values go to bit 2g (first 32) and 2g + 1 (last 32) of qh."""
    n, k = rows.shape
    head, codes = _scale_min_blocks(rows, 31, -0.5, 15)
    return np.concatenate([head, pack_q5_k_codes(codes)], axis=1).reshape(n, row_bytes(QType.Q5_K, k))


def pack_q5_k_codes(codes: np.ndarray) -> np.ndarray:
    """[nb, 256] codes 0..31 -> qh [nb, 32] then qs [nb, 128]."""
    fifth = (codes.astype(np.uint8) >> 4).reshape(-1, 4, 2, 32)
    qh = np.zeros((codes.shape[0], 32), dtype=np.uint8)
    for g in range(4):
        qh |= (fifth[:, g, 0] << (2 * g)) | (fifth[:, g, 1] << (2 * g + 1))
    return np.concatenate([qh, pack_low_high(codes)], axis=1)


# ----------------------------------------------------------------------------------------------- Q6_K


def make_qx_quants(x: np.ndarray, w: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """make_qx_quants with rmse_type 1: sub-blocks x [S, n], weights w -> (codes + nmax [S, n], scale [S])."""
    amax, top = signed_max(x)
    zero = amax < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        trial = np.clip(nearest_int((f32(-nmax) / top)[:, None] * x), -nmax, nmax - 1)
        codes = trial + nmax
        lf = _f(trial)
        sumlx = running_sum(w * x * lf)
        suml2 = running_sum(w * lf * lf)
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(f32(nmax) + f32(0.1) * f32(step)) / top
            trial = np.clip(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
            lf = _f(trial)
            sumlx = running_sum(w * x * lf)
            suml2 = running_sum(w * lf * lf)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            codes = np.where(better[:, None], trial + nmax, codes)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    return np.where(zero[:, None], 0, codes), np.where(zero, f32(0), scale)


def pack_q6_k_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[nb, 256] 6-bit codes -> ql [nb, 128], qh [nb, 64]; each half of 128 is four runs of 32."""
    c = codes.astype(np.uint8).reshape(-1, 2, 4, 32)
    low, high = c & 0xF, c >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return ql.reshape(-1, 128), qh.reshape(-1, 64)


def quantize_q6_k(rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 rows [n, k], k a multiple of 256 -> Q6_K bytes [n, k / 256 * 210]; `importance` [k]: the
    weights of an importance matrix (quantize_row_q6_K_impl), else x^2 (quantize_row_q6_K_ref)."""
    n, k = rows.shape
    x = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, 16)
    nb = x.shape[0] // 16
    w = x * x if importance is None else np.broadcast_to(importance.reshape(-1, 16), (n, k // 16, 16)).reshape(-1, 16)
    codes, scales = make_qx_quants(x, w, 32)
    scales = scales.reshape(nb, 16)
    max_abs, max_scale = signed_max(scales)
    empty = max_abs < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = f32(-128) / max_scale
        d16 = np.where(empty, f32(0), f32(1) / iscale).astype(np.float16)
        sc = np.where(empty[:, None], 0, np.minimum(127, nearest_int(iscale[:, None] * scales)))
        sc = sc.astype(np.int8)
        d = (d16.astype(np.float32)[:, None] * sc.astype(np.float32)).reshape(-1, 1)
        requant = np.clip(nearest_int(x / d), -32, 31) + 32
    codes = np.where(d != 0, requant, codes).reshape(nb, 256)
    codes = np.where(empty[:, None], 0, codes)
    ql, qh = pack_q6_k_codes(codes)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16.view(np.uint8).reshape(nb, 2)], axis=1)
    return out.reshape(n, row_bytes(QType.Q6_K, k))


def quantize_q6_k_reference(rows: np.ndarray) -> np.ndarray:
    return quantize_q6_k(rows)
