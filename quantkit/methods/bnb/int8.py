"""LLM.int8 row-wise absmax quantization, as bitsandbytes computes it on CPU.

bitsandbytes first casts the weight to float16, takes each row's absmax (SCB), and rounds
`W * (127 / SCB)` in float32, half to even; torch evaluates `127 / SCB` as `reciprocal(SCB) * 127`.
"""

from __future__ import annotations

import numpy as np

FLOAT16_MAX = 65504.0


def layout(shape: tuple[int, ...]) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensors an int8 weight of `shape` [out, in] becomes, relative to its module (no data needed)."""
    return {"weight": ("I8", tuple(shape)), "SCB": ("F32", (shape[0],)), "weight_format": ("U8", ())}


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference: float32 weight [out, in] -> (codes int8 [out, in], SCB float32 [out])."""
    half = x.astype(np.float16).astype(np.float32)
    scb = np.abs(half).max(axis=1).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        factor = ((np.float32(1) / scb).astype(np.float32) * np.float32(127)).astype(np.float32)
        codes = np.rint(half * factor[:, None])
    codes[~np.isfinite(codes)] = 0  # an all-zero row: 0 * inf; bitsandbytes writes zeros
    return codes.astype(np.int8), scb


def dequantize_int8(codes: np.ndarray, scb: np.ndarray) -> np.ndarray:
    """bitsandbytes' int8_vectorwise_dequant: (codes * SCB) * float32(1/127), in that order."""
    scaled = codes.astype(np.float32) * scb.astype(np.float32)[:, None]
    return (scaled * np.float32(7.874015718698502e-3)).astype(np.float32)
