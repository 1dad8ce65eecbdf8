"""IQ4_NL (blocks of 32) and IQ4_XS (super-blocks of 256): 4-bit indices into a fixed non-linear table,
byte for byte as llama-quantize writes them without an importance matrix.

llama-quantize runs `quantize_iq4_nl` / `quantize_iq4_xs`, that is `quantize_row_iq4_nl_impl` with
ntry = 7 and weights x^2 (not the `_ref` functions, which search no scales), or with an importance matrix
qw sqrt(sigma2 + x^2). Arithmetic as in kquants.py.
Sub-blocks are held position-major, x [32, S], so each step of C's loop over a block's positions is one
vector operation over all blocks. The numba kernels (kernels.py) compute the same bytes.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from quantkit.methods.gguf.blocks import row_bytes
from quantkit.methods.gguf.kquants import GROUP_MAX_EPS, nearest_int, running_sum, signed_max, to_f16

QType = GGMLQuantizationType
f32 = np.float32
KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.int8)
_VALUES = KVALUES.astype(np.float32)
NTRY = 7


def best_index(x: np.ndarray) -> np.ndarray:
    """best_index_int8(16, kvalues_iq4nl, x) elementwise: the nearest table value, the upper one on a
    tie (C's `x - val[mu-1] < val[mu] - x`), NaN at the top as C's bisection leaves it."""
    upper = np.clip(np.searchsorted(_VALUES, x, side="right"), 1, 15)
    with np.errstate(all="ignore"):
        index = np.where(x - _VALUES[upper - 1] < _VALUES[upper] - x, upper - 1, upper)
    index = np.where(x <= _VALUES[0], 0, index)
    return np.where(x >= _VALUES[15], 15, index).astype(np.uint8)


def _block_scales(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """x [32, S], weights w [32, S] -> each block's scale d [S] by quantize_row_iq4_nl_impl's search (0 for an
    empty block)."""
    amax, top = signed_max(x, axis=0)
    with np.errstate(all="ignore"):

        def fit(inverse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            q = _VALUES[best_index(inverse * x)]
            wq = w * q
            return running_sum(wq * x, axis=0), running_sum(wq * q, axis=0)

        d = -top / _VALUES[0]
        sumqx, sumq2 = fit(f32(1) / d)
        d = np.where(sumq2 > 0, sumqx / sumq2, f32(0))
        best = d * sumqx
        for itry in range(-NTRY, NTRY + 1):
            sumqx, sumq2 = fit(f32(itry + int(KVALUES[0])) / top)
            better = (sumq2 > 0) & (sumqx * sumqx > best * sumq2)
            d = np.where(better, sumqx / sumq2, d)
            best = np.where(better, d * sumqx, best)
    return np.where(amax < GROUP_MAX_EPS, f32(0), d)


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(all="ignore"):
        return np.where(d != 0, f32(1) / d, f32(0))


def _pack_nibbles(index: np.ndarray, nbytes: int) -> np.ndarray:
    """[nb, 32 m] indices -> [nb, 16 m]: byte 16 i + j holds index 32 i + j low, 32 i + 16 + j high."""
    c = index.astype(np.uint8).reshape(index.shape[0], -1, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(index.shape[0], nbytes)


def _position_major(rows: np.ndarray, importance: np.ndarray | None, super_block: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows [n, k] -> (x [32, S], weights [32, S]): x^2, or with an importance matrix's per-column weights
    qw sqrt(sigma2 + x^2), sigma2 twice the mean square of the `super_block` values."""
    n, k = rows.shape
    x = np.asarray(rows, dtype=np.float32).reshape(-1, super_block)
    if importance is None:
        w = x * x
    else:
        qw = np.broadcast_to(np.asarray(importance, dtype=np.float32).reshape(1, k), (n, k)).reshape(-1, super_block)
        with np.errstate(all="ignore"):
            sigma2 = running_sum(x * x) * (f32(2) / f32(super_block))
            w = qw * np.sqrt(sigma2[:, None] + x * x)
    return (np.ascontiguousarray(x.reshape(-1, 32).T), np.ascontiguousarray(w.reshape(-1, 32).T))


def quantize_iq4_nl_reference(rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 rows [n, k], k a multiple of 32 -> IQ4_NL bytes [n, k / 32 * 18]; `importance` [k]: an
    importance matrix's weights (quantize_iq4_nl with quant_weights)."""
    n, k = rows.shape
    x, w = _position_major(rows, importance, 32)
    d = _block_scales(x, w)
    with np.errstate(all="ignore"):
        index = best_index(_inverse(d) * x)
    out = np.concatenate([to_f16(d).view(np.uint8).reshape(-1, 2), _pack_nibbles(index.T, 16)], axis=1)
    return out.reshape(n, row_bytes(QType.IQ4_NL, k))


def quantize_iq4_xs_reference(rows: np.ndarray, importance: np.ndarray | None = None) -> np.ndarray:
    """float32 rows [n, k], k a multiple of 256 -> IQ4_XS bytes [n, k / 256 * 136]: one float16 scale per
    256, eight 6-bit block scales (low nibbles in scales_l, high two bits in scales_h); `importance` as for
    IQ4_NL."""
    n, k = rows.shape
    x, w = _position_major(rows, importance, 256)
    nb = x.shape[1] // 8
    scales = _block_scales(x, w).reshape(nb, 8)
    _, max_scale = signed_max(scales)
    with np.errstate(all="ignore"):
        d = -max_scale / f32(32)
        ls = np.clip(nearest_int(_inverse(d)[:, None] * scales), -32, 31)
        index = best_index(_inverse(d[:, None] * ls.astype(np.float32)).reshape(1, -1) * x)
    ls = (ls + 32).astype(np.uint16)
    scales_l = ((ls[:, 0::2] & 0xF) | ((ls[:, 1::2] & 0xF) << 4)).astype(np.uint8)
    scales_h = np.zeros(nb, dtype=np.uint16)
    for ib in range(8):
        scales_h |= (ls[:, ib] >> 4) << (2 * ib)
    out = np.concatenate([to_f16(d).view(np.uint8).reshape(nb, 2), scales_h.astype("<u2").view(np.uint8).reshape(nb, 2),
                          scales_l, _pack_nibbles(index.T.reshape(nb, 256), 128)], axis=1)
    return out.reshape(n, row_bytes(QType.IQ4_XS, k))
