"""Quantizers with an importance matrix, byte for byte as `llama-quantize --imatrix` (llama.cpp's
quantize_* with quant_weights run the `_impl` functions, not the `_ref` ones): Q4_K and Q5_K
(quantize_row_q{4,5}_K_impl: make_qkx3_quants, then make_qp_quants for the 6-bit scales and mins), Q2_K
(quantize_row_q2_K_impl: the same on sub-blocks of 16 with 4-bit scales and mins), Q3_K
(quantize_row_q3_K_impl: make_qx_quants with weights, twice), Q6_K (kquants.quantize_q6_k), Q4_0 and Q5_0
(make_qx_quants), Q4_1 and Q5_1 (make_qkx3_quants, no requantization), IQ4_NL and IQ4_XS
(iquants.py's references with weights). The weights are qw * sqrt(sigma2 + x^2), sigma2 a mean square of
the row (legacy types) or twice / once (Q2_K) that of the super-block. Arithmetic as in kquants.py.

`importance` is one expert's per-column vector (length k), as llama-quantize hands it to every row.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from quantkit.methods.gguf import iquants, kquants
from quantkit.methods.gguf.blocks import row_bytes
from quantkit.methods.gguf.kquants import GROUP_MAX_EPS, make_qkx2_quants, make_qx_quants, nearest_int, running_sum, to_f16

QType = GGMLQuantizationType
f32 = np.float32


def _tiled(importance: np.ndarray, n: int, k: int, width: int) -> np.ndarray:
    """The per-column weights repeated for each of n rows, cut in sub-blocks of `width`."""
    return np.broadcast_to(np.asarray(importance, dtype=np.float32).reshape(1, k), (n, k)).reshape(-1, width)


# ----------------------------------------------------------------------------------------------- Q4_K


def _make_qp_quants(x: np.ndarray, qw: np.ndarray, nmax: int = 63) -> tuple[np.ndarray, np.ndarray]:
    """make_qp_quants: non-negative values x [B, n] with weights -> (codes [B, n], scale [B])."""
    top = np.zeros(x.shape[0], np.float32)
    for i in range(x.shape[1]):
        top = np.where(top > x[:, i], top, x[:, i])
    zero = top < GROUP_MAX_EPS
    with np.errstate(all="ignore"):
        iscale = f32(nmax) / top
        diff = x - (f32(1) / iscale)[:, None] * (nearest_int(iscale[:, None] * x) & 0xFF).astype(np.float32)
        best = running_sum(qw * diff * diff)
        for step in (-4, -3, -2, -1, 1, 2, 3, 4):
            trial_iscale = (f32(0.1) * f32(step) + f32(nmax)) / top
            codes = np.minimum(nmax, nearest_int(trial_iscale[:, None] * x))
            diff = x - (f32(1) / trial_iscale)[:, None] * codes.astype(np.float32)
            mse = running_sum(qw * diff * diff)
            take = mse < best
            best = np.where(take, mse, best)
            iscale = np.where(take, trial_iscale, iscale)
        codes = np.minimum(nmax, nearest_int(iscale[:, None] * x))
        sumlx = running_sum(qw * x * codes.astype(np.float32))
        suml2 = running_sum(qw * codes.astype(np.float32) * codes.astype(np.float32))
        codes = codes & 0xFF
        active = ~zero
        for _ in range(5):  # coordinate descent; a block stops at its first sweep without a change
            changed = np.zeros(x.shape[0], bool)
            for i in range(x.shape[1]):
                w, xi, li = qw[:, i], x[:, i], codes[:, i].astype(np.float32)
                slx = sumlx - w * xi * li
                sl2 = suml2 - w * li * li
                new = np.minimum(nmax, nearest_int(xi * sl2 / slx))
                candidate = active & (slx > 0) & (sl2 > 0) & (new != codes[:, i])
                nf = new.astype(np.float32)
                slx = slx + w * xi * nf
                sl2 = sl2 + w * nf * nf
                take = candidate & (slx * slx * suml2 > sumlx * sumlx * sl2)
                codes[:, i] = np.where(take, new & 0xFF, codes[:, i])
                sumlx = np.where(take, slx, sumlx)
                suml2 = np.where(take, sl2, suml2)
                changed |= take
            active &= changed
            if not active.any():
                break
        d = np.where(suml2 > 0, sumlx / suml2, f32(0))
    return np.where(zero[:, None], 0, codes).astype(np.uint8), np.where(zero, f32(0), d).astype(np.float32)


def _scale_min_blocks(rows: np.ndarray, importance: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q{4,5}_K_impl's common part -> (d, dmin, the 12 scale bytes [nb, 16], codes [nb, 256])."""
    n, k = rows.shape
    x = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, 256)
    nb = x.shape[0]
    with np.errstate(all="ignore"):
        sigma2 = f32(2) * running_sum(x * x) / f32(256)
        weights = _tiled(importance, n, k, 256) * np.sqrt(sigma2[:, None] + x * x)
    xs, ws = x.reshape(-1, 32), weights.reshape(-1, 32)
    # make_qkx3_quants differs from make_qkx2_quants only in `max <= min` for `max == min`: the same here
    # (min is at most 0 and at most x[0] <= max)
    codes, scales, mins = make_qkx2_quants(xs, ws, nmax, -0.9, 0.05, 36)
    sum_w = running_sum(ws).reshape(nb, 8)
    ls, d_block = _make_qp_quants(scales.reshape(nb, 8), sum_w)
    lm, m_block = _make_qp_quants(mins.reshape(nb, 8), sum_w)
    packed = kquants.pack_scales_mins(ls, lm)
    d16, dmin16 = to_f16(d_block), to_f16(m_block)
    # the C reads the 6-bit scale and min back from the packed bytes (get_scale_min_k4)
    s6 = np.concatenate([packed[:, 0:4] & 63, (packed[:, 8:12] & 0xF) | ((packed[:, 0:4] >> 6) << 4)], axis=1)
    m6 = np.concatenate([packed[:, 4:8] & 63, (packed[:, 8:12] >> 4) | ((packed[:, 4:8] >> 6) << 4)], axis=1)
    d = (d16.astype(np.float32)[:, None] * s6.astype(np.float32)).reshape(-1, 1)
    dm = (dmin16.astype(np.float32)[:, None] * m6.astype(np.float32)).reshape(-1, 1)
    with np.errstate(all="ignore"):
        requant = np.clip(nearest_int((xs + dm) / d), 0, nmax)
    codes = np.where(d != 0, requant, codes).reshape(nb, 256)
    head = np.concatenate([d16.view(np.uint8).reshape(nb, 2), dmin16.view(np.uint8).reshape(nb, 2), packed], axis=1)
    return head, codes


def quantize_q4_k(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """float32 rows [n, k], k a multiple of 256, importance [k] -> Q4_K bytes [n, k / 256 * 144]."""
    head, codes = _scale_min_blocks(rows, importance, 15)
    out = np.concatenate([head, kquants.pack_low_high(codes)], axis=1)
    return out.reshape(rows.shape[0], row_bytes(QType.Q4_K, rows.shape[1]))


def quantize_q5_k(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """float32 rows [n, k], k a multiple of 256, importance [k] -> Q5_K bytes [n, k / 256 * 176]
    (quantize_row_q5_K_impl: Q4_K's search with 31 levels)."""
    head, codes = _scale_min_blocks(rows, importance, 31)
    out = np.concatenate([head, kquants.pack_q5_k_codes(codes)], axis=1)
    return out.reshape(rows.shape[0], row_bytes(QType.Q5_K, rows.shape[1]))


def quantize_q2_k(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """float32 rows [n, k], k a multiple of 256, importance [k] -> Q2_K bytes [n, k / 256 * 84]
    (quantize_row_q2_K_impl: make_qkx3_quants on sub-blocks of 16 with weights qw sqrt(sigma2 + x^2), sigma2
    the mean square of the 256, then make_qp_quants with 15 levels for the 4-bit scales and mins)."""
    n, k = rows.shape
    x = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, 256)
    nb = x.shape[0]
    with np.errstate(all="ignore"):
        sigma2 = running_sum(x * x) / f32(256)
        weights = (_tiled(importance, n, k, 256) * np.sqrt(sigma2[:, None] + x * x)).reshape(-1, 16)
    xs = x.reshape(-1, 16)
    codes, scales, mins = make_qkx2_quants(xs, weights, 3, -0.9, 0.05, 36)
    sum_w = running_sum(weights).reshape(nb, 16)
    ls, d_block = _make_qp_quants(scales.reshape(nb, 16), sum_w, 15)
    lm, m_block = _make_qp_quants(mins.reshape(nb, 16), sum_w, 15)
    sc = ls | (lm << 4)  # uint8 arithmetic, as the C's
    d16, m16 = to_f16(d_block), to_f16(m_block)
    with np.errstate(all="ignore"):
        d = (d16.astype(np.float32)[:, None] * (sc & 0xF).astype(np.float32)).reshape(-1, 1)
        dm = (m16.astype(np.float32)[:, None] * (sc >> 4).astype(np.float32)).reshape(-1, 1)
        requant = np.clip(nearest_int((xs + dm) / d), 0, 3)
    codes = np.where(d != 0, requant, codes).reshape(nb, 256)
    out = np.concatenate([sc, kquants.pack_2bit(codes), d16.view(np.uint8).reshape(nb, 2), m16.view(np.uint8).reshape(nb, 2)],
                         axis=1)
    return out.reshape(n, row_bytes(QType.Q2_K, k))


def quantize_q3_k(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """float32 rows [n, k], k a multiple of 256, importance [k] -> Q3_K bytes [n, k / 256 * 110]
    (quantize_row_q3_K_impl: make_qx_quants with weights on sub-blocks of 16, then on the 16 scales with
    the sub-blocks' weight sums)."""
    n, k = rows.shape
    x = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, 256)
    nb = x.shape[0]
    with np.errstate(all="ignore"):
        sigma2 = f32(2) * running_sum(x * x) / f32(256)
        weights = (_tiled(importance, n, k, 256) * np.sqrt(sigma2[:, None] + x * x)).reshape(-1, 16)
    xs = x.reshape(-1, 16)
    codes, scales = make_qx_quants(xs, weights, 4)
    ls, d_block = make_qx_quants(scales.reshape(nb, 16), running_sum(weights).reshape(nb, 16), 32)
    d16 = to_f16(d_block)
    with np.errstate(all="ignore"):
        d = (d16.astype(np.float32)[:, None] * (ls - 32).astype(np.float32)).reshape(-1, 1)
        requant = np.clip(nearest_int(xs / d), -4, 3) + 4
    codes = np.where(d != 0, requant, codes).reshape(nb, 256)
    return kquants.pack_q3_k(codes, ls.astype(np.uint8), d16).reshape(n, row_bytes(QType.Q3_K, k))


def quantize_q6_k(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    return kquants.quantize_q6_k(rows, np.asarray(importance, dtype=np.float32))


# ------------------------------------------------------------------------------------------ Q4_0, Q5_0


def _legacy_weights(rows: np.ndarray, importance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows [n, k] -> (blocks of 32 [S, 32], their weights qw sqrt(sigma2 + x^2), sigma2 the row's mean square)."""
    n, k = rows.shape
    x = np.ascontiguousarray(rows, dtype=np.float32)
    with np.errstate(all="ignore"):
        sigma2 = (running_sum(x * x) / f32(k)).repeat(k // 32)
        x = x.reshape(-1, 32)
        return x, _tiled(importance, n, k, 32) * np.sqrt(sigma2[:, None] + x * x)


def _legacy_codes(rows: np.ndarray, importance: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Blocks of 32 -> (codes [S, 32] in 0..2 nmax - 1, float16 scale [S]), weights qw sqrt(sigma2 + x^2)."""
    x, weights = _legacy_weights(rows, importance)
    codes, scale = make_qx_quants(x, weights, nmax)
    return codes.astype(np.uint8), to_f16(scale)


def quantize_q4_0(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """float32 rows [n, k], k a multiple of 32, importance [k] -> Q4_0 bytes [n, k / 32 * 18]."""
    codes, d16 = _legacy_codes(rows, importance, 8)
    out = np.concatenate([d16.view(np.uint8).reshape(-1, 2), codes[:, :16] | (codes[:, 16:] << 4)], axis=1)
    return out.reshape(rows.shape[0], row_bytes(QType.Q4_0, rows.shape[1]))


def _fifth_bits(codes: np.ndarray) -> np.ndarray:
    """[S, 32] 5-bit codes -> qh [S, 4]: the fifth bit of value j in bit j of a little-endian uint32."""
    qh = ((codes.astype(np.uint32) >> 4) << np.arange(32, dtype=np.uint32)).sum(axis=1, dtype=np.uint32)
    return qh.astype("<u4").view(np.uint8).reshape(-1, 4)


def quantize_q5_0(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """float32 rows [n, k], k a multiple of 32, importance [k] -> Q5_0 bytes [n, k / 32 * 22]: the fifth bit
    of value j in bit j of qh."""
    codes, d16 = _legacy_codes(rows, importance, 16)
    qs = (codes[:, :16] & 0xF) | ((codes[:, 16:] & 0xF) << 4)
    out = np.concatenate([d16.view(np.uint8).reshape(-1, 2), _fifth_bits(codes), qs], axis=1)
    return out.reshape(rows.shape[0], row_bytes(QType.Q5_0, rows.shape[1]))



# ------------------------------------------------------------------------------------------ Q4_1, Q5_1


def _legacy_min_codes(rows: np.ndarray, importance: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """quantize_row_q{4,5}_1_impl: blocks of 32 -> (codes [S, 32] in 0..nmax, float16 d and m [S, 4] as bytes);
    make_qkx3_quants with weights qw sqrt(sigma2 + x^2), no requantization."""
    x, weights = _legacy_weights(rows, importance)
    codes, scale, the_min = make_qkx2_quants(x, weights, nmax, -0.9, 0.05, 36)
    head = np.concatenate([to_f16(scale).view(np.uint8).reshape(-1, 2), to_f16(-the_min).view(np.uint8).reshape(-1, 2)],
                          axis=1)
    return codes.astype(np.uint8), head


def quantize_q4_1(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """float32 rows [n, k], k a multiple of 32, importance [k] -> Q4_1 bytes [n, k / 32 * 20]."""
    codes, head = _legacy_min_codes(rows, importance, 15)
    out = np.concatenate([head, codes[:, :16] | (codes[:, 16:] << 4)], axis=1)
    return out.reshape(rows.shape[0], row_bytes(QType.Q4_1, rows.shape[1]))


def quantize_q5_1(rows: np.ndarray, importance: np.ndarray) -> np.ndarray:
    """float32 rows [n, k], k a multiple of 32, importance [k] -> Q5_1 bytes [n, k / 32 * 24]."""
    codes, head = _legacy_min_codes(rows, importance, 31)
    out = np.concatenate([head, _fifth_bits(codes), (codes[:, :16] & 0xF) | ((codes[:, 16:] & 0xF) << 4)], axis=1)
    return out.reshape(rows.shape[0], row_bytes(QType.Q5_1, rows.shape[1]))

QUANTIZERS = {QType.Q2_K: quantize_q2_k, QType.Q3_K: quantize_q3_k, QType.Q4_K: quantize_q4_k, QType.Q5_K: quantize_q5_k, QType.Q6_K: quantize_q6_k, QType.Q4_0: quantize_q4_0, QType.Q5_0: quantize_q5_0,
              QType.Q4_1: quantize_q4_1, QType.Q5_1: quantize_q5_1,
              QType.IQ4_NL: iquants.quantize_iq4_nl_reference, QType.IQ4_XS: iquants.quantize_iq4_xs_reference}
