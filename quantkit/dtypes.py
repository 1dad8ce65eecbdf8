"""Tensor dtypes as safetensors names them, and float conversions numpy lacks (bfloat16).

numpy has no bfloat16, so BF16 data travels as its raw uint16 bits and is widened or rounded here.
"""

from __future__ import annotations

import numpy as np

from quantkit import native

# safetensors dtype -> numpy dtype of the stored bits
STORAGE = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"), "F8_E4M3": np.dtype("u1"), "F8_E5M2": np.dtype("u1"),
}  # fmt: skip
FLOATS = ("F64", "F32", "F16", "BF16")
# numpy dtype -> safetensors name, for arrays in memory (whose uint16 is U16: BF16 travels as bits)
NAME_OF_ARRAY = {v: k for k, v in STORAGE.items() if k not in ("BF16", "F8_E4M3", "F8_E5M2")}
# The names users and config.json give to float dtypes.
BY_NAME = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}
NAME_OF = {v: k for k, v in BY_NAME.items()}


def itemsize(dtype: str) -> int:
    return STORAGE[dtype].itemsize


def to_float32(bits: np.ndarray, dtype: str) -> np.ndarray:
    """Stored bits of a float dtype -> float32 values (exact for BF16 and F16)."""
    if dtype == "BF16":
        return (bits.astype(np.uint32) << 16).view(np.float32)
    if dtype in ("F16", "F32", "F64"):
        return bits.astype(np.float32)
    raise ValueError(f"not a float dtype: {dtype}")


def all_finite(bits: np.ndarray, dtype: str) -> bool:
    """Whether stored bits of a float dtype hold no NaN or infinity (BF16: its exponent is not all ones)."""
    if native.DENSE_KERNELS and dtype in native.DENSE and isinstance(bits, np.ndarray) and bits.flags.c_contiguous \
            and bits.dtype.itemsize == itemsize(dtype):  # fmt: skip
        return not native.nonfinite(bits.reshape(-1).view(np.uint8), dtype)
    if dtype == "BF16":
        return not np.any((np.asarray(bits).view(np.uint16) & 0x7F80) == 0x7F80)
    return bool(np.isfinite(bits).all())


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bits, rounding to nearest even as torch does (NaN stays NaN)."""
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((u + (np.uint32(0x7FFF) + ((u >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def from_float32(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> stored bits of `dtype` (round to nearest even)."""
    if dtype == "BF16":
        return bf16_bits(values)
    if dtype in ("F16", "F32", "F64"):
        return values.astype(STORAGE[dtype])
    raise ValueError(f"not a float dtype: {dtype}")


# Properties torch gives float dtypes (torch.finfo): eps, and the smallest normal number.
EPS = {"BF16": np.float32(2.0**-7), "F16": np.float32(2.0**-10), "F32": np.float32(2.0**-23)}
TINY = {"BF16": np.float32(2.0**-126), "F16": np.float32(2.0**-14), "F32": np.float32(2.0**-126)}


def round_to(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded to `dtype` (nearest even), still as float32: the result of one torch
    operation in bf16 or fp16, which computes in float32 and rounds once."""
    if dtype == "BF16":
        return to_float32(bf16_bits(values), "BF16")
    if dtype == "F16":
        return np.asarray(values, np.float32).astype(np.float16).astype(np.float32)
    return np.asarray(values, np.float32)
