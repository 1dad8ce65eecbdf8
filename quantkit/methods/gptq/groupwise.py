"""Group-wise integer quantization (the GPTQ / AWQ number format): every run of `group_size` input
features of an output row shares one float16 scale and one integer zero point, w ~ scale * (q - zero).

`quantize_reference` is the spec in vectorized numpy; `quantize` runs the numba kernel of
`kernels.py`, which repeats its float32 arithmetic operation for operation (no fastmath), so both give
the same bytes; `quantize_into` is the same kernel fused with reading bf16 and packing GPTQ's `qweight`.
Plain RTN takes the group's range; `optimize=True` searches shrunken ranges (and, when asymmetric,
neighbouring zero points) and refits the scale by least squares, keeping whatever lowers the group's
squared error. RTN is the search's first candidate, so the optimized error is never higher.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantkit import dtypes
from quantkit.errors import QuantkitError
from quantkit.methods.gptq import native

SUPPORTED_BITS = (2, 4, 8)
PACK_BITS = 32  # GPTQ packs codes into int32 words
_F16_MAX = np.float32(65504.0)
_F16_TINY = np.float32(2.0**-24)  # smallest float16 subnormal: the floor for a scale
# Range shrink factors the optimizer tries, first one the plain RTN range.
_SHRINK = np.linspace(1.0, 0.5, 26).astype(np.float32)
_RTN = _SHRINK[:1]
_REFINE_STEPS = 2
BAD_VALUES = 1  # quantize_into's problem codes for a row (the kernels' too)
TOO_WIDE = 2


@dataclass(frozen=True)
class GroupwiseQuant:
    """Codes `[out, in]`, scales `[out, groups]` (float16 values held as float32) and zeros `[out, groups]`."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray


def n_groups(in_features: int, group_size: int) -> int:
    return 1 if group_size == -1 else in_features // group_size


def check_shape(name: str, shape: tuple[int, ...], bits: int, group_size: int) -> None:
    """Refuse, naming the tensor, a weight the GPTQ layout cannot hold; run before any data is read."""
    if bits not in SUPPORTED_BITS:
        raise QuantkitError(f"{bits}-bit group-wise quantization is not supported", f"use --bits {SUPPORTED_BITS}")
    if len(shape) != 2:
        raise QuantkitError(f"{name}: expected a 2-D linear weight, got shape {list(shape)}")
    out_features, in_features = shape
    per_word = PACK_BITS // bits
    if group_size != -1 and (group_size <= 0 or in_features % group_size):
        raise QuantkitError(
            f"{name}: {in_features} input features are not a multiple of group size {group_size}",
            "pick a --group-size that divides it, use --group-size -1, or --skip this module",
        )
    for what, size in (("input", in_features), ("output", out_features)):
        if size % per_word:
            raise QuantkitError(
                f"{name}: {size} {what} features cannot be packed {per_word} to an int32 at {bits} bits",
                "--skip this module",
            )


def layout(shape: tuple[int, ...], bits: int, group_size: int) -> dict[str, tuple[str, tuple[int, ...]]]:
    """The GPTQ tensors a `[out, in]` weight becomes (name replacing `weight` -> dtype, shape), without data."""
    out_features, in_features = shape
    groups = n_groups(in_features, group_size)
    per_word = PACK_BITS // bits
    return {
        "qweight": ("I32", (in_features // per_word, out_features)),
        "qzeros": ("I32", (groups, out_features // per_word)),
        "scales": ("F16", (groups, out_features)),
        "g_idx": ("I32", (in_features,)),
    }


def quantize(
    weight: np.ndarray, bits: int, group_size: int, sym: bool, min_zero: int = 0, optimize: bool = False
) -> GroupwiseQuant:
    """Quantize a `[out, in]` weight with the compiled kernel (same bytes as `quantize_reference`).

    `min_zero` is 1 for GPTQ v1 asymmetric output, whose zero points cannot be 0.
    """
    groups = _grouped(weight, group_size)
    _check_range(groups, bits, sym)
    rows, count, _ = groups.shape
    codes = np.empty(groups.shape, np.uint8)
    scales = np.empty((rows, count), np.float32)
    zeros = np.empty((rows, count), np.uint8)
    shrink, spread, refine = _search(optimize, sym)
    from quantkit.methods.gptq import kernels  # imports numba (half a second): only when used

    kernels.use_threads()
    kernels.quantize_groups(groups, bits, sym, min_zero, shrink, spread, refine, codes, scales, zeros)
    return GroupwiseQuant(codes.reshape(weight.shape), scales, zeros)


def quantize_into(rows: np.ndarray, dtype: str, bits: int, group_size: int, sym: bool, min_zero: int, optimize: bool,
                  qweight: np.ndarray, start: int, scales: np.ndarray, zeros: np.ndarray) -> None:
    """`quantize` of output rows `start ...` (stored bits of safetensors `dtype`) written straight into the
    GPTQ `qweight` columns `[in / f, out]` (codes packed along input features), `scales` and `zeros`
    (`[out, groups]`): the same bytes as `quantize` followed by `layout.pack_qweight`. Plain RTN runs on
    the C kernel, the optimizer on numba."""
    size = rows.shape[1] if group_size == -1 else group_size
    if native.AVAILABLE and not optimize:
        problems = native.quantize_rtn_into(rows, dtype, bits, size, sym, min_zero, qweight, start, scales, zeros)
    else:
        from quantkit.methods.gptq import kernels  # imports numba (half a second): only when used

        bf16 = dtype == "BF16"
        problems = np.zeros(rows.shape[0], np.uint8)
        shrink, spread, refine = _search(optimize, sym)
        kernels.quantize_pack(rows if bf16 else dtypes.to_float32(rows, dtype), bf16, size, bits, sym, min_zero, shrink,
                              spread, refine, qweight.view(np.uint32), start, scales, zeros, problems)  # fmt: skip
    if np.any(problems == BAD_VALUES):
        raise QuantkitError("weight holds NaN or infinite values")
    if np.any(problems == TOO_WIDE):
        raise QuantkitError("weight range too wide for a float16 scale")


def quantize_reference(
    weight: np.ndarray, bits: int, group_size: int, sym: bool, min_zero: int = 0, optimize: bool = False
) -> GroupwiseQuant:
    """The spec: every group at once in numpy, sums taken element by element in float32."""
    x = _grouped(weight, group_size)
    _check_range(x, bits, sym)
    f32 = np.float32
    maxq = f32(2**bits - 1)
    lo, hi = _range(x, bits, sym, min_zero)
    shrink, spread, refine = _search(optimize, sym)
    best_err = np.full(lo.shape, np.inf, f32)
    best_scale = np.zeros(lo.shape, f32)
    best_zero = np.zeros(lo.shape, f32)

    def consider(scale, zero):
        err = _group_error(x, scale, zero, maxq)
        better = (err < best_err) & (scale <= _F16_MAX)
        best_err[better] = err[better]
        best_scale[better] = scale[better]
        best_zero[better] = zero[better]

    for p in shrink:
        scale = _to_f16(p * hi - p * lo, maxq)
        centre = np.full(lo.shape, f32(2 ** (bits - 1))) if sym else np.rint(-(p * lo) / scale)
        for dz in range(-spread, spread + 1):
            consider(scale, np.clip(centre + f32(dz), f32(min_zero), maxq))
    for _ in range(refine):
        q = np.clip(np.rint(x / best_scale[..., None]) + best_zero[..., None], f32(0), maxq) - best_zero[..., None]
        num = np.zeros(lo.shape, f32)
        den = np.zeros(lo.shape, f32)
        for k in range(x.shape[-1]):
            num += x[..., k] * q[..., k]
            den += q[..., k] * q[..., k]
        fit = np.where(den > 0, num / np.where(den > 0, den, f32(1)), f32(0))
        scale = np.where(fit > 0, _to_f16(fit, f32(1)), best_scale)
        consider(scale, best_zero)
    codes = np.clip(np.rint(x / best_scale[..., None]) + best_zero[..., None], f32(0), maxq).astype(np.uint8)
    return GroupwiseQuant(codes.reshape(weight.shape), best_scale, best_zero.astype(np.uint8))


def dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, g_idx: np.ndarray) -> np.ndarray:
    """`[out, in]` float32 weight from codes `[out, in]` and per-group `[out, groups]` scales and zeros;
    `g_idx[i]` is the group of input feature i (act-order checkpoints permute it)."""
    s = scales.astype(np.float32)[:, g_idx]
    z = zeros.astype(np.float32)[:, g_idx]
    return (codes.astype(np.float32) - z) * s


def weight_mse(weight: np.ndarray, quant: GroupwiseQuant, group_size: int) -> float:
    in_features = weight.shape[1]
    g_idx = np.arange(in_features) // (in_features if group_size == -1 else group_size)
    diff = dequantize(quant.codes, quant.scales, quant.zeros, g_idx) - weight.astype(np.float32)
    return float(np.mean(diff.astype(np.float64) ** 2))


def _search(optimize: bool, sym: bool) -> tuple[np.ndarray, int, int]:
    """(shrink factors, zero-point spread, least-squares refinements) for RTN or the optimizer."""
    if not optimize:
        return _RTN, 0, 0
    return _SHRINK, 0 if sym else 1, _REFINE_STEPS


def _grouped(weight: np.ndarray, group_size: int) -> np.ndarray:
    out_features, in_features = weight.shape
    size = in_features if group_size == -1 else group_size
    return np.ascontiguousarray(weight, dtype=np.float32).reshape(out_features, in_features // size, size)


def _check_range(groups: np.ndarray, bits: int, sym: bool) -> None:
    """Non-finite weights, or a range too wide for a float16 scale, cannot be stored."""
    lo, hi = _range(groups, bits, sym, 0)
    if not np.all(np.isfinite(lo) & np.isfinite(hi)):
        raise QuantkitError("weight holds NaN or infinite values")
    if np.any(_to_f16(hi - lo, np.float32(2**bits - 1)) > _F16_MAX):
        raise QuantkitError("weight range too wide for a float16 scale")


def _range(x: np.ndarray, bits: int, sym: bool, min_zero: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group [lo, hi], always spanning 0 (GPTQ's convention); symmetric makes it +-absmax."""
    f32 = np.float32
    lo = np.minimum(x.min(axis=-1), f32(0))
    hi = np.maximum(x.max(axis=-1), f32(0))
    if sym:
        hi = np.maximum(-lo, hi)
        lo = -hi
    empty = (lo == 0) & (hi == 0)
    lo = np.where(empty, f32(-1), lo)
    hi = np.where(empty, f32(1), hi)
    if not sym and min_zero:
        # a zero point of at least 1 needs at least one step below 0
        lo = np.minimum(lo, -hi / f32(2**bits - 2))
    return lo, hi


def _to_f16(span: np.ndarray, steps: np.float32) -> np.ndarray:
    """span / steps rounded to float16 (kept as float32), floored at the smallest subnormal."""
    with np.errstate(over="ignore"):
        return np.maximum((span / steps).astype(np.float16).astype(np.float32), _F16_TINY)


def _group_error(x: np.ndarray, scale: np.ndarray, zero: np.ndarray, maxq: np.float32) -> np.ndarray:
    err = np.zeros(scale.shape, np.float32)
    for k in range(x.shape[-1]):
        q = np.clip(np.rint(x[..., k] / scale) + zero, np.float32(0), maxq)
        e = (q - zero) * scale - x[..., k]
        err += e * e
    return err
