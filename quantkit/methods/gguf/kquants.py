"""Q4_K and Q6_K super-blocks of 256 values, byte for byte as llama.cpp's `quantize_row_q4_K_ref` /
`quantize_row_q6_K_ref` (the path llama-quantize takes without an importance matrix).

The numpy reference is the spec, vectorized across sub-blocks but with every sum taken in C's
left-to-right float32 order. What byte identity hangs on: `nearest_int` rounds half to even (np.rint
on float32); maxima update only on strictly greater; a winning trial in `make_qkx2_quants` overwrites
`min`, which the later trials use; a sub-block whose final scale is 0 keeps its first-pass codes.
`quantize` runs the same algorithm as numba kernels, one super-block per iteration.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from quantkit.methods.gguf.blocks import row_bytes

QK_K = 256
GROUP_MAX_EPS = np.float32(1e-15)
f32 = np.float32


def _rint_int(v: np.ndarray) -> np.ndarray:
    """nearest_int: float32 round half to even, as an int."""
    return np.rint(v).astype(np.int64)


def _running_sum(terms: np.ndarray) -> np.ndarray:
    """Sum over the last axis strictly left to right in float32 (np.sum would go pairwise)."""
    acc = np.zeros(terms.shape[:-1], dtype=np.float32)
    for i in range(terms.shape[-1]):
        acc = acc + terms[..., i]
    return acc


# ----------------------------------------------------------------------------------------------- Q4_K


def _make_qkx2_quants(x: np.ndarray, w: np.ndarray, nmax: int = 15, rmin: float = -1.0,
                      rdelta: float = 0.1, nstep: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of 32 values with weights -> (codes [S, 32], scale [S], the_min [S]) by a scale/min search."""
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
    with np.errstate(all="ignore"):
        iscale = f32(nmax) / (hi - lo)
        scale = f32(1) / iscale
        codes = np.clip(_rint_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)
        diff = scale[:, None] * codes.astype(np.float32) + lo[:, None] - x
        best_error = _running_sum(w * (diff * diff))
        for step in range(nstep + 1):
            iscale = (f32(rmin) + f32(rdelta) * f32(step) + f32(nmax)) / (hi - lo)
            trial = np.clip(_rint_int(iscale[:, None] * (x - lo[:, None])), 0, nmax)
            lf = trial.astype(np.float32)
            sum_l = _running_sum(w * lf)
            sum_l2 = _running_sum(w * lf * lf)
            sum_xl = _running_sum(w * lf * x)
            det = sum_w * sum_l2 - sum_l * sum_l
            this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
            this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
            clamp = this_min > 0
            this_min = np.where(clamp, f32(0), this_min)
            this_scale = np.where(clamp, sum_xl / sum_l2, this_scale)
            diff = this_scale[:, None] * lf + this_min[:, None] - x
            cur_error = _running_sum(w * (diff * diff))
            better = (det > 0) & (cur_error < best_error) & ~flat
            codes = np.where(better[:, None], trial, codes)
            best_error = np.where(better, cur_error, best_error)
            scale = np.where(better, this_scale, scale)
            lo = np.where(better, this_min, lo)
    codes = np.where(flat[:, None], 0, codes)
    scale = np.where(flat, f32(0), scale)
    return codes, scale, -lo


def _pack_q4_k_scales(ls: np.ndarray, lm: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins per block [nb, 8] -> the 12 packed bytes of block_q4_K.scales."""
    out = np.zeros((ls.shape[0], 12), dtype=np.uint8)
    out[:, 0:4] = ls[:, 0:4]
    out[:, 4:8] = lm[:, 0:4]
    out[:, 8:12] = (ls[:, 4:8] & 0xF) | ((lm[:, 4:8] & 0xF) << 4)
    out[:, 0:4] |= (ls[:, 4:8] >> 4) << 6
    out[:, 4:8] |= (lm[:, 4:8] >> 4) << 6
    return out


def _to_u6(v: np.ndarray) -> np.ndarray:
    """`uint8_t l = nearest_int(v); l = MIN(63, l)`, the uint8 wrap of a negative included."""
    return np.minimum(63, _rint_int(v) & 0xFF).astype(np.uint8)


def _pack_low_high(codes: np.ndarray) -> np.ndarray:
    """[nb, 256] 4-bit codes: each 64 values -> 32 bytes, value l low nibble, value l + 32 high nibble."""
    c = codes.astype(np.uint8).reshape(-1, 4, 2, 32)
    return (c[:, :, 0, :] | (c[:, :, 1, :] << 4)).reshape(-1, 128)


def quantize_q4_k_reference(rows: np.ndarray) -> np.ndarray:
    """float32 rows [n, k], k a multiple of 256 -> Q4_K bytes [n, k / 256 * 144]."""
    n, k = rows.shape
    x = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, 32)
    nb = x.shape[0] // 8
    av_x = np.sqrt(_running_sum(x * x) / f32(32))
    codes, scales, mins = _make_qkx2_quants(x, av_x[:, None] + np.abs(x))
    scales, mins = scales.reshape(nb, 8), mins.reshape(nb, 8)
    max_scale = np.maximum(scales.max(axis=1), f32(0))
    max_min = np.maximum(mins.max(axis=1), f32(0))
    with np.errstate(divide="ignore"):
        inv_scale = np.where(max_scale > 0, f32(63) / max_scale, f32(0))
        inv_min = np.where(max_min > 0, f32(63) / max_min, f32(0))
    ls = _to_u6(inv_scale[:, None] * scales)
    lm = _to_u6(inv_min[:, None] * mins)
    d16 = (max_scale / f32(63)).astype(np.float16)
    dmin16 = (max_min / f32(63)).astype(np.float16)
    d = (d16.astype(np.float32)[:, None] * ls.astype(np.float32)).reshape(-1, 1)
    dm = (dmin16.astype(np.float32)[:, None] * lm.astype(np.float32)).reshape(-1, 1)
    with np.errstate(all="ignore"):
        requant = np.clip(_rint_int((x + dm) / d), 0, 15)
    codes = np.where(d != 0, requant, codes).reshape(nb, 256)
    out = np.concatenate(
        [d16.view(np.uint8).reshape(nb, 2), dmin16.view(np.uint8).reshape(nb, 2),
         _pack_q4_k_scales(ls, lm), _pack_low_high(codes)], axis=1)
    return out.reshape(n, row_bytes(GGMLQuantizationType.Q4_K, k))


# ----------------------------------------------------------------------------------------------- Q6_K


def _make_qx_quants(x: np.ndarray, nmax: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """rmse_type 1 without weights: rows of 16 -> (codes + nmax [S, 16], scale [S])."""
    first_max = np.abs(x).argmax(axis=1)
    top = x[np.arange(x.shape[0]), first_max]
    zero = np.abs(top) < GROUP_MAX_EPS
    w = x * x
    with np.errstate(all="ignore"):
        iscale = f32(-nmax) / top
        trial = np.clip(_rint_int(iscale[:, None] * x), -nmax, nmax - 1)
        codes = trial + nmax
        lf = trial.astype(np.float32)
        sumlx = _running_sum(w * x * lf)
        suml2 = _running_sum(w * lf * lf)
        scale = np.where(suml2 != 0, sumlx / suml2, f32(0))
        best = scale * sumlx
        for step in range(-9, 10):
            if step == 0:
                continue
            iscale = -(f32(nmax) + f32(0.1) * f32(step)) / top
            trial = np.clip(_rint_int(iscale[:, None] * x), -nmax, nmax - 1)
            lf = trial.astype(np.float32)
            sumlx = _running_sum(w * x * lf)
            suml2 = _running_sum(w * lf * lf)
            better = (suml2 > 0) & (sumlx * sumlx > best * suml2)
            codes = np.where(better[:, None], trial + nmax, codes)
            scale = np.where(better, sumlx / suml2, scale)
            best = np.where(better, scale * sumlx, best)
    return np.where(zero[:, None], 0, codes), np.where(zero, f32(0), scale)


def _pack_q6_k_codes(codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[nb, 256] 6-bit codes -> ql [nb, 128], qh [nb, 64]; each half of 128 is four runs of 32."""
    c = codes.astype(np.uint8).reshape(-1, 2, 4, 32)
    low, high = c & 0xF, c >> 4
    ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    return ql.reshape(-1, 128), qh.reshape(-1, 64)


def quantize_q6_k_reference(rows: np.ndarray) -> np.ndarray:
    """float32 rows [n, k], k a multiple of 256 -> Q6_K bytes [n, k / 256 * 210]."""
    n, k = rows.shape
    x = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, 16)
    nb = x.shape[0] // 16
    codes, scales = _make_qx_quants(x)
    scales = scales.reshape(nb, 16)
    max_scale = scales[np.arange(nb), np.abs(scales).argmax(axis=1)]
    empty = np.abs(max_scale) < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = f32(-128) / max_scale
        d16 = np.where(empty, f32(0), f32(1) / iscale).astype(np.float16)
        sc = np.where(empty[:, None], 0, np.minimum(127, _rint_int(iscale[:, None] * scales)))
        sc = sc.astype(np.int8)
        d = (d16.astype(np.float32)[:, None] * sc.astype(np.float32)).reshape(-1, 1)
        requant = np.clip(_rint_int(x / d), -32, 31) + 32
    codes = np.where(d != 0, requant, codes).reshape(nb, 256)
    codes = np.where(empty[:, None], 0, codes)
    ql, qh = _pack_q6_k_codes(codes)
    out = np.concatenate([ql, qh, sc.view(np.uint8), d16.view(np.uint8).reshape(nb, 2)], axis=1)
    return out.reshape(n, row_bytes(GGMLQuantizationType.Q6_K, k))


REFERENCE = {GGMLQuantizationType.Q4_K: quantize_q4_k_reference,
             GGMLQuantizationType.Q6_K: quantize_q6_k_reference}


def quantize(rows: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    """Same bytes as REFERENCE[qtype], through the numba kernels."""
    from quantkit.methods.gguf import kernels  # imports numba (~0.4 s): only K-quant runs pay it

    kernels.use_threads()
    n, k = rows.shape
    x = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, QK_K)
    if qtype == GGMLQuantizationType.Q4_K:
        out = np.empty((x.shape[0], 144), dtype=np.uint8)
        d = np.empty((x.shape[0], 2), dtype=np.float32)
        kernels.q4_k_blocks(x, out, d)
        out[:, :4] = d.astype(np.float16).view(np.uint8)
    else:
        out = np.empty((x.shape[0], 210), dtype=np.uint8)
        d = np.empty((x.shape[0], 1), dtype=np.float32)
        kernels.q6_k_blocks(x, out, d)
        out[:, 208:] = d.astype(np.float16).view(np.uint8)
    return out.reshape(n, row_bytes(qtype, k))
