"""The importance-weighted quantizers (weighted.py) against literal, one-value-at-a-time transcriptions of
ggml-quants.c's quantize_row_{q2_K,q3_K,q4_K,q5_K,q4_1,q5_1}_impl (float32 scalars, C's operation order) on a
few blocks; the bytes against libggml itself are checked in tests/clients/test_llama_quantize.py. And every
quant type either has a weighted path or is one llama.cpp quantizes without the weights."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from quantkit.errors import QuantkitError
from quantkit.methods.gguf import convert, kernels, weighted
from quantkit.methods.gguf import types as ggml
from quantkit.methods.gguf.imatrix import Imatrix
from quantkit.methods.gguf.kquants import GROUP_MAX_EPS, nearest_int

f32 = np.float32


def ni(v) -> int:
    return int(nearest_int(np.float32(v)))


def make_qkx3(x, w, nmax, rmin, rdelta, nstep):
    """make_qkx3_quants with weights: the numba kernels' scalar make_qkx2_quants (`max == min` and the C's
    `max <= min` agree, min being at most 0 and at most x[0] <= max)."""
    L, aux = np.zeros(len(x), np.int64), np.zeros(len(x), np.int64)
    scale, the_min = kernels._make_qkx2_quants(np.array(x, np.float32), np.array(w, np.float32), L, aux, nmax, f32(rmin),
                                               f32(rdelta), nstep, False)
    return [int(v) for v in L], f32(scale), f32(the_min)


def make_qp(x, w, nmax):
    top = f32(0)
    for v in x:
        top = top if top > v else v
    if top < GROUP_MAX_EPS:
        return [0] * len(x), f32(0)
    iscale = f32(nmax) / top
    L = [ni(iscale * v) & 0xFF for v in x]
    scale = f32(1) / iscale
    best = f32(0)
    for i, v in enumerate(x):
        diff = v - scale * f32(L[i])
        best += w[i] * diff * diff
    for step in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = (f32(0.1) * f32(step) + f32(nmax)) / top
        scale_is = f32(1) / iscale_is
        mse = f32(0)
        for i, v in enumerate(x):
            diff = v - scale_is * f32(min(nmax, ni(iscale_is * v)))
            mse += w[i] * diff * diff
        if mse < best:
            best, iscale = mse, iscale_is
    sumlx = suml2 = f32(0)
    for i, v in enumerate(x):
        lv = min(nmax, ni(iscale * v))
        L[i] = lv & 0xFF
        sumlx += w[i] * v * f32(lv)
        suml2 += w[i] * f32(lv) * f32(lv)
    for _ in range(5):
        changed = 0
        for i, v in enumerate(x):
            slx = sumlx - w[i] * v * f32(L[i])
            sl2 = suml2 - w[i] * f32(L[i]) * f32(L[i])
            if slx > 0 and sl2 > 0:
                new = min(nmax, ni(v * sl2 / slx))
                if new != L[i]:
                    slx += w[i] * v * f32(new)
                    sl2 += w[i] * f32(new) * f32(new)
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i], sumlx, suml2 = new & 0xFF, slx, sl2
                        changed += 1
        if not changed:
            break
    return L, (sumlx / suml2 if suml2 > 0 else f32(0))


def make_qx(x, w, nmax):
    top = amax = f32(0)
    for v in x:
        if abs(v) > amax:
            amax, top = abs(v), v
    if amax < GROUP_MAX_EPS:
        return [0] * len(x), f32(0)
    iscale = f32(-nmax) / top
    L, sumlx, suml2 = [], f32(0), f32(0)
    for i, v in enumerate(x):
        lv = max(-nmax, min(nmax - 1, ni(iscale * v)))
        L.append(lv + nmax)
        sumlx += w[i] * v * f32(lv)
        suml2 += w[i] * f32(lv) * f32(lv)
    scale = sumlx / suml2 if suml2 else f32(0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * f32(step)) / top
        sumlx = suml2 = f32(0)
        for i, v in enumerate(x):
            lv = max(-nmax, min(nmax - 1, ni(iscale * v)))
            sumlx += w[i] * v * f32(lv)
            suml2 += w[i] * f32(lv) * f32(lv)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            L = [nmax + max(-nmax, min(nmax - 1, ni(iscale * v))) for v in x]
            scale = sumlx / suml2
            best = scale * sumlx
    return L, scale


def f16_bytes(v) -> list[int]:
    return list(np.float16(v).tobytes())


def f16_value(v) -> np.float32:
    return f32(np.float16(v))


def sum_squares(x):
    total = f32(0)
    for v in x:
        total += v * v
    return total


def sub_blocks(x, qw, sigma2, size):
    """(values, weights qw sqrt(sigma2 + x^2), their sum) per sub-block of `size`."""
    found = []
    for j in range(0, len(x), size):
        w = [qw[j + i] * np.sqrt(sigma2 + x[j + i] * x[j + i]) for i in range(size)]
        s = f32(0)
        for v in w:
            s += v
        found.append((x[j:j + size], w, s))
    return found


def scalar_q45_k(x, qw, nmax):
    """quantize_row_q4_K_impl (nmax 15) / q5_K_impl (nmax 31), one super-block of 256."""
    L, scales, mins, sw = [], [], [], []
    for xs, w, s in sub_blocks(x, qw, f32(2) * sum_squares(x) / f32(256), 32):
        sw.append(s)
        codes, scale, the_min = make_qkx3(xs, w, nmax, -0.9, 0.05, 36)
        L += codes
        scales.append(scale)
        mins.append(the_min)
    ls, d_block = make_qp(scales, sw, 63)
    lm, m_block = make_qp(mins, sw, 63)
    sc = [0] * 12
    for j in range(8):
        a, b = min(63, ls[j]), min(63, lm[j])
        if j < 4:
            sc[j], sc[j + 4] = a, b
        else:
            sc[j + 4] = (a & 0xF) | ((b & 0xF) << 4)
            sc[j - 4] = (sc[j - 4] | ((a >> 4) << 6)) & 0xFF
            sc[j] = (sc[j] | ((b >> 4) << 6)) & 0xFF
    for j in range(8):
        if j < 4:
            s6, m6 = sc[j] & 63, sc[j + 4] & 63
        else:
            s6, m6 = (sc[j + 4] & 0xF) | ((sc[j - 4] >> 6) << 4), (sc[j + 4] >> 4) | ((sc[j] >> 6) << 4)
        d = f16_value(d_block) * f32(s6)
        if not d:
            continue
        dm = f16_value(m_block) * f32(m6)
        for i in range(32):
            L[32 * j + i] = max(0, min(nmax, ni((x[32 * j + i] + dm) / d)))
    out = f16_bytes(d_block) + f16_bytes(m_block) + sc
    if nmax == 31:
        qh = [0] * 32
        for g in range(4):
            for j in range(32):
                qh[j] |= ((L[64 * g + j] >> 4) << (2 * g)) | ((L[64 * g + 32 + j] >> 4) << (2 * g + 1))
        out += qh
    for g in range(4):
        out += [(L[64 * g + j] & 0xF) | ((L[64 * g + 32 + j] & 0xF) << 4) for j in range(32)]
    return out


def pack_2bit(L):
    return [L[j + i] | (L[j + i + 32] << 2) | (L[j + i + 64] << 4) | (L[j + i + 96] << 6)
            for j in (0, 128) for i in range(32)]


def scalar_q2_k(x, qw):
    L, scales, mins, sw = [], [], [], []
    for xs, w, s in sub_blocks(x, qw, sum_squares(x) / f32(256), 16):
        sw.append(s)
        codes, scale, the_min = make_qkx3(xs, w, 3, -0.9, 0.05, 36)
        L += codes
        scales.append(scale)
        mins.append(the_min)
    ls, dm = make_qp(scales, sw, 15)
    lm, mm = make_qp(mins, sw, 15)
    sc = [(ls[j] | (lm[j] << 4)) & 0xFF for j in range(16)]
    for j in range(16):
        d = f16_value(dm) * f32(sc[j] & 0xF)
        if not d:
            continue
        m = f16_value(mm) * f32(sc[j] >> 4)
        for i in range(16):
            L[16 * j + i] = max(0, min(3, ni((x[16 * j + i] + m) / d)))
    return sc + pack_2bit(L) + f16_bytes(dm) + f16_bytes(mm)


def scalar_q3_k(x, qw):
    L, scales, sw = [], [], []
    for xs, w, s in sub_blocks(x, qw, f32(2) * sum_squares(x) / f32(256), 16):
        sw.append(s)
        codes, scale = make_qx(xs, w, 4)
        L += codes
        scales.append(scale)
    ls, d_block = make_qx(scales, sw, 32)
    sc = [0] * 12
    for j in range(16):
        lv = ls[j]
        if j < 8:
            sc[j] = lv & 0xF
        else:
            sc[j - 8] |= (lv & 0xF) << 4
        sc[8 + j % 4] |= (lv >> 4) << (2 * (j // 4))
    for j in range(16):
        s6 = sc[j] & 0xF if j < 8 else sc[j - 8] >> 4
        d = f16_value(d_block) * f32((s6 | (((sc[8 + j % 4] >> (2 * (j // 4))) & 3) << 4)) - 32)
        if not d:
            continue
        for i in range(16):
            L[16 * j + i] = max(-4, min(3, ni(x[16 * j + i] / d))) + 4
    hmask = [0] * 32
    for j in range(256):
        if L[j] > 3:
            hmask[j % 32] |= 1 << (j // 32)
            L[j] -= 4
    return hmask + pack_2bit(L) + sc + f16_bytes(d_block)


def scalar_q451(row, qw, nmax):
    """quantize_row_q4_1_impl (nmax 15) / q5_1_impl (nmax 31) on a whole row."""
    out = []
    for xs, w, _ in sub_blocks(row, qw, sum_squares(row) / f32(len(row)), 32):
        L, d, the_min = make_qkx3(xs, w, nmax, -0.9, 0.05, 36)
        out += f16_bytes(d) + f16_bytes(-the_min)
        if nmax == 31:
            qh = sum(((L[j] >> 4) << j) for j in range(32))
            out += list(int(qh).to_bytes(4, "little"))
        out += [(L[j] & 0xF) | ((L[j + 16] & 0xF) << 4) for j in range(16)]
    return out


def blocks(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two rows of 512: normal, heavy-tailed, one sign, a zero and a constant run; importance over 6 decades
    with some zeros."""
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.standard_normal(256), rng.standard_t(2, 256), np.abs(rng.standard_normal(256)) + 0.5,
                        np.zeros(128), np.full(128, -0.25)]).astype(np.float32).reshape(2, 512)
    qw = (rng.random(512) * 10.0 ** rng.uniform(-3, 3, 512) * (rng.random(512) > 0.05)).astype(np.float32)
    return x, qw


SCALAR = {
    Q.Q2_K: (scalar_q2_k, 256), Q.Q3_K: (scalar_q3_k, 256),
    Q.Q4_K: (lambda x, qw: scalar_q45_k(x, qw, 15), 256), Q.Q5_K: (lambda x, qw: scalar_q45_k(x, qw, 31), 256),
    Q.Q4_1: (lambda x, qw: scalar_q451(x, qw, 15), 512), Q.Q5_1: (lambda x, qw: scalar_q451(x, qw, 31), 512),
}


@pytest.mark.parametrize("qtype", list(SCALAR), ids=lambda q: q.name)
def test_weighted_equals_a_literal_transcription_of_the_c(qtype):
    x, qw = blocks(int(qtype))
    scalar, span = SCALAR[qtype]
    ours = weighted.QUANTIZERS[qtype](x, qw)
    with np.errstate(all="ignore"):
        expected = [scalar(list(row[s:s + span]), list(qw[s:s + span]))
                    for row in x for s in range(0, x.shape[1], span)]
    assert ours.tobytes() == bytes(b for part in expected for b in part)
    # and the weights matter: another importance gives other bytes
    assert weighted.QUANTIZERS[qtype](x, qw[::-1].copy()).tobytes() != ours.tobytes()


def test_every_quant_type_takes_importance_or_ignores_it():
    for qtype, t in ggml.TYPES.items():
        assert (t.weighted is not None) != (qtype in ggml.IGNORES_IMPORTANCE), qtype.name


def test_a_type_without_a_weighted_path_is_refused_naming_the_tensor(monkeypatch):
    monkeypatch.setitem(ggml.TYPES, Q.Q4_1, dataclasses.replace(ggml.TYPES[Q.Q4_1], weighted=None))
    imatrix = Imatrix(path=None, format="gguf", weights={"blk.0.attn_q.weight": np.ones(64, np.float32)},
                      experts={"blk.0.attn_q.weight": 1}, counts={})
    with pytest.raises(QuantkitError, match="blk.0.attn_q.weight would be Q4_1"):
        convert._check_importance(imatrix, "blk.0.attn_q.weight", Q.Q4_1, (64, 64))
    assert not convert._check_importance(imatrix, "blk.0.attn_q.weight", Q.Q8_0, (64, 64))
