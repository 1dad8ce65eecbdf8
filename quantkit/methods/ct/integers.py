"""compressed-tensors pack-quantized (W4A16, W8A16, W4A16_ASYM) <-> api.IntegerBlocks, for lossless
transcoding to and from GPTQ and GGUF Q4_0 / Q8_0 (same integers, other packing).

compressed-tensors dequantizes in the scale's dtype S: value = round_S(round_S(q - zero) * scale). That is
exactly q * d in float32 (IntegerBlocks' arithmetic) when the scale is a float16 value and every product
is a value of S: always for S = F32 (11 significant bits times at most 8), for S = BF16 / F16 only when
the scales have few enough significant bits (checked per tensor, on the scales and then on the codes).
As with GPTQ, a zero point of -1 (asymmetric) is the same values with the scale's sign turned.
"""

from __future__ import annotations

import numpy as np

from quantkit.api import IntegerBlocks
from quantkit.dtypes import from_float32, round_to, to_float32
from quantkit.methods.ct import formats, schemes


def _f16_values(scale: np.ndarray) -> bool:
    with np.errstate(over="ignore"):
        return bool(np.array_equal(scale.astype(np.float16).astype(np.float32), scale))


def exact_products(q: np.ndarray, scale: np.ndarray, group: int, dtype: str) -> bool:
    """Whether round_S(q * scale) == q * scale for every element (q [out, in] integers, scale [out, groups]
    float32 values of S): without looking at q when no multiple up to the codes' range rounds."""
    if dtype == "F32":
        return True
    top = int(np.abs(q).max(initial=0))
    multiples = scale.reshape(-1, 1) * np.arange(1, top + 1, dtype=np.float32)
    if np.array_equal(round_to(multiples, dtype), multiples):
        return True
    products = q.reshape(q.shape[0], -1, group).astype(np.float32) * scale[:, :, None]
    return bool(np.array_equal(round_to(products, dtype), products))


def from_packed(packed: np.ndarray, scale: np.ndarray, scale_dtype: str, zero: np.ndarray | None, bits: int,
                group: int, cols: int) -> IntegerBlocks | None:
    """A module's `weight_packed` [out, words], `weight_scale` [out, groups] (stored bits of S) and signed
    zero points [out, groups] (None: symmetric) -> IntegerBlocks, or None when its values are not exactly
    q * d with a float16 d."""
    values = to_float32(scale, scale_dtype)
    if not _f16_values(values):
        return None
    q = formats.unpack_int32(packed, bits, cols) - (1 << (bits - 1))
    turned = np.zeros(values.shape, bool)
    if zero is not None:
        turned = zero == -1
        if not np.all(turned | (zero == 0)):
            return None
        q = q - np.repeat(zero, group, axis=1)  # q - zero, exact: (q + 1) where turned
    if not exact_products(q, values, group, scale_dtype):
        return None
    wide = np.repeat(turned, group, axis=1)
    signed = np.where(wide, -q, q).astype(np.int8)  # (q + 1) * s = -(q + 1) * -s, and -(q + 1) = ~q in range
    return IntegerBlocks(bits, group, signed, np.where(turned, -values, values).astype(np.float16))


def to_packed(blocks: IntegerBlocks, bits: int, group: int, symmetric: bool,
              scale_dtype: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """IntegerBlocks -> (`weight_packed`, `weight_scale` as stored bits of S, signed zero points [out, groups]
    or None), or None when the scheme cannot hold them exactly: fewer bits, groups spanning two factors,
    negative factors in a symmetric scheme, factors or products that S rounds."""
    if blocks.bits > bits:
        return None
    regrouped = blocks.regroup(group)
    if regrouped is None:
        return None
    d = regrouped.d.astype(np.float32)
    turned = d < 0
    if symmetric and turned.any():
        return None
    scale = np.abs(d)
    if not np.array_equal(round_to(scale, scale_dtype), scale):
        return None
    wide = np.repeat(turned, group, axis=1)
    q = np.where(wide, ~regrouped.q, regrouped.q)  # turned: q' = -q - 1 with zero point -1, (q' + 1) * -d = q * d
    if not exact_products(np.where(wide, q.astype(np.int16) + 1, q), scale, group, scale_dtype):
        return None
    zero = None if symmetric else np.where(turned, -1, 0).astype(np.int8)
    return schemes.pack_int32(q, bits), from_float32(scale, scale_dtype), zero
