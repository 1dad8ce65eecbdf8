"""GPTQ / AWQ groups <-> api.IntegerBlocks (signed integers times a float16 factor per block), for lossless
transcoding to and from GGUF Q4_0 / Q8_0.

A group computes (code - zero) * scale. With the zero point in the middle of the range, 2**(bits-1), that is
(code - mid) * scale; with the zero point one below it, (mid - 1 - code) * (-scale). Both are q * d with q in
[-mid, mid - 1], so every GPTQ group whose zero point is one of the two is exact as IntegerBlocks, and back:
a block with d >= 0 becomes zero point mid, one with d < 0 zero point mid - 1 and the scale -d (GPTQ
scales are positive), which only asymmetric output can declare.
"""

from __future__ import annotations

import numpy as np

from quantkit.api import IntegerBlocks
from quantkit.methods.gptq import native
from quantkit.methods.gptq.layout import pack_qweight, unpack_rows


def to_integers(codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray, bits: int, group: int) -> IntegerBlocks | None:
    """codes [out, in], zero points [out, groups], float16 scales [out, groups] -> IntegerBlocks, or None when a
    zero point is neither mid nor mid - 1."""
    mid = 2 ** (bits - 1)
    turned = zeros == mid - 1
    if not np.all(turned | (zeros == mid)):
        return None
    wide = np.repeat(turned, group, axis=1)
    signed = codes.astype(np.int16)
    q = np.where(wide, (mid - 1) - signed, signed - mid).astype(np.int8)
    d = np.where(turned, -scales, scales).astype(np.float16)
    return IntegerBlocks(bits, group, q, d)


def from_qweight(qweight: np.ndarray, zeros: np.ndarray, scales: np.ndarray, bits: int, group: int) -> IntegerBlocks | None:
    """GPTQ `qweight` [in / f, out], zero points [out, groups], float16 scales [out, groups] -> IntegerBlocks
    (None as `to_integers`), unpacked and turned in one pass of the compiled kernel where there is one."""
    per_word = 32 // bits
    if not native.AVAILABLE or group % per_word:
        return to_integers(np.ascontiguousarray(unpack_rows(qweight, bits).T), zeros, scales, bits, group)
    mid = 2 ** (bits - 1)
    turned = zeros == mid - 1
    if not np.all(turned | (zeros == mid)):
        return None
    d = np.where(turned, -scales, scales).astype(np.float16)
    return IntegerBlocks(bits, group, native.unpack_signed(qweight, turned, bits, group), d)


def to_qweight(blocks: IntegerBlocks, bits: int, group_size: int,
               sym: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """As `from_integers`, with the codes packed: (`qweight` int32 [in / f, out], float16 scales [out, groups],
    zero points uint8 [out, groups]), in one pass of the compiled kernel where there is one."""
    group = blocks.q.shape[1] if group_size == -1 else group_size
    if not native.AVAILABLE or group % (32 // bits) or blocks.bits > bits:
        found = from_integers(blocks, bits, group_size, sym)
        return None if found is None else (pack_qweight(found[0], bits), found[1], found[2])
    regrouped = blocks.regroup(group)
    if regrouped is None or (sym and np.any(regrouped.d < 0)):
        return None
    turned = regrouped.d < 0
    mid = 2 ** (bits - 1)
    zeros = np.where(turned, mid - 1, mid).astype(np.uint8)
    return native.pack_signed(regrouped.q, turned, bits, group), np.abs(regrouped.d), zeros


def from_integers(blocks: IntegerBlocks, bits: int, group_size: int,
                  sym: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """IntegerBlocks -> (codes uint8 [out, in], float16 scales [out, groups], zero points uint8 [out, groups]) of
    `bits` in groups of `group_size` (-1: whole rows), or None when they cannot hold them: fewer bits, groups
    spanning two factors, or `sym` and a negative factor."""
    if blocks.bits > bits:
        return None
    regrouped = blocks.regroup(blocks.q.shape[1] if group_size == -1 else group_size)
    if regrouped is None:
        return None
    d = regrouped.d
    turned = d < 0
    if sym and turned.any():
        return None
    mid = 2 ** (bits - 1)
    wide = np.repeat(turned, regrouped.block, axis=1)
    q = regrouped.q.astype(np.int16)
    codes = np.where(wide, (mid - 1) - q, q + mid).astype(np.uint8)
    zeros = np.where(turned, mid - 1, mid).astype(np.uint8)
    return codes, np.abs(d), zeros
