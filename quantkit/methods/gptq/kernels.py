"""The compiled path of group-wise quantization: `groupwise.quantize_reference`'s float32 arithmetic,
one group at a time, rows in parallel (no fastmath, so the bytes are the reference's).

`quantize_pack` is the quantizer's whole step in one pass: it widens bf16 bits, checks the range, quantizes
and packs each row straight into its `qweight` column, so no float32 copy, transposed codes or packing
pass is made in numpy around it.
"""

from __future__ import annotations

import numpy as np

from quantkit.jit import f16_round, njit, prange, use_threads  # noqa: F401 (use_threads: for the callers)

BAD_VALUES = 1  # a row holds NaN or infinity (groupwise.BAD_VALUES)
TOO_WIDE = 2  # a group's range does not fit a float16 scale (groupwise.TOO_WIDE)


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


@njit(cache=True)
def _group_range(x, sym):
    """[lo, hi] always spanning 0 (GPTQ's convention); +-absmax when symmetric; [-1, 1] for all zeros."""
    zero_f = np.float32(0.0)
    lo = min(x.min(), zero_f)
    hi = max(x.max(), zero_f)
    if sym:
        hi = max(-lo, hi)
        lo = -hi
    if lo == 0 and hi == 0:
        lo = np.float32(-1.0)
        hi = np.float32(1.0)
    return lo, hi


@njit(cache=True)
def _quantize_group(x, bits, sym, min_zero, shrink, spread, refine, codes):
    """One group's codes (into `codes`) and its (scale, zero point)."""
    size = x.size
    maxq = np.float32(2**bits - 1)
    f16_max = np.float32(65504.0)
    zero_f = np.float32(0.0)
    one = np.float32(1.0)
    zmin = np.float32(min_zero)
    lo, hi = _group_range(x, sym)
    if not sym and min_zero:
        lo = min(lo, -hi / np.float32(2**bits - 2))
    best_err = np.float32(np.inf)
    best_scale = zero_f
    best_zero = zero_f
    # plain RTN has one candidate, which wins whenever the range check passed: no error to compute
    single = shrink.size == 1 and spread == 0 and refine == 0
    for p in shrink:
        scale = _scale_kernel(p * hi - p * lo, maxq)
        centre = np.float32(2 ** (bits - 1)) if sym else np.rint(-(p * lo) / scale)
        for dz in range(-spread, spread + 1):
            zero = min(max(centre + np.float32(dz), zmin), maxq)
            err = zero_f if single else _error_kernel(x, scale, zero, maxq)
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
        codes[k] = np.uint8(min(max(np.rint(x[k] / best_scale) + best_zero, zero_f), maxq))
    return best_scale, best_zero


@njit(cache=True, parallel=True)
def quantize_groups(groups, bits, sym, min_zero, shrink, spread, refine, codes, scales, zeros):
    rows, count, size = groups.shape
    for r in prange(rows):
        for g in range(count):
            scale, zero = _quantize_group(groups[r, g], bits, sym, min_zero, shrink, spread, refine, codes[r, g])
            scales[r, g] = scale
            zeros[r, g] = np.uint8(zero)


@njit(cache=True)
def _row_problem(x, size, bits, sym):
    """BAD_VALUES, TOO_WIDE or 0 for one float32 row: `groupwise._check_range`'s verdict."""
    for k in range(x.size):
        if not np.isfinite(x[k]):
            return BAD_VALUES
    maxq = np.float32(2**bits - 1)
    for start in range(0, x.size, size):
        lo, hi = _group_range(x[start : start + size], sym)
        if _scale_kernel(hi - lo, maxq) > np.float32(65504.0):
            return TOO_WIDE
    return 0


@njit(cache=True, parallel=True)
def quantize_pack(rows, bf16, size, bits, sym, min_zero, shrink, spread, refine, qweight, col0, scales, zeros, problems):
    """Quantize `rows` ([n, in]: bf16 bits as uint16 when `bf16`, else float32) in groups of `size` and
    write output row r's codes packed into column `col0 + r` of `qweight` ([in / f, out] uint32), its
    scales and zero points into row `col0 + r` of `scales` / `zeros` ([out, groups]). A row whose values
    cannot be stored gets its problem code in `problems[r]` and nothing else."""
    n, in_features = rows.shape
    per_word = 32 // bits
    count = in_features // size
    for r in prange(n):
        bits32 = np.empty(in_features, np.uint32)
        x = bits32.view(np.float32)
        if bf16:
            for k in range(in_features):
                bits32[k] = np.uint32(rows[r, k]) << np.uint32(16)
        else:
            for k in range(in_features):
                x[k] = rows[r, k]
        problems[r] = _row_problem(x, size, bits, sym)
        if problems[r]:
            continue
        codes = np.empty(in_features, np.uint8)
        for g in range(count):
            start = g * size
            scale, zero = _quantize_group(x[start : start + size], bits, sym, min_zero, shrink, spread, refine,
                                          codes[start : start + size])  # fmt: skip
            scales[col0 + r, g] = scale
            zeros[col0 + r, g] = np.uint8(zero)
        for w in range(in_features // per_word):
            word = np.uint32(0)
            for j in range(per_word):
                word |= np.uint32(codes[w * per_word + j]) << np.uint32(bits * j)
            qweight[w, col0 + r] = word
