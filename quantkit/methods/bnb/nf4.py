"""bitsandbytes 4-bit blockwise quantization (NF4 and FP4) with optional double quantization.

The numpy functions here are the spec: they reproduce, bit for bit, what bitsandbytes computes on CPU
(`quantize_4bit`, then `quantize_blockwise` of the absmax for double quantization). The C kernels
(quantkit/native/bnb.c, through `native.py`) must give the same bytes; tests hold them to it.
"""

from __future__ import annotations

import numpy as np

from quantkit.numerics import torch_mean_f32

NF4_CODE = np.array(
    [
        -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
        -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
        0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
        0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
    ],
    dtype=np.float32,
)  # fmt: skip
# FP4 (1 sign, 2 exponent, 1 mantissa bit) in bit-pattern order, normalised by its largest magnitude.
# Code 8 would be -0, but bitsandbytes' table holds +0 there (its source writes the integer -0).
FP4_CODE = np.array(
    [0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3], dtype=np.float32
) / np.float32(12)
# bitsandbytes sorts the FP4 code with torch.argsort; of the two zeros it puts code 0 first.
FP4_ORDER = np.array([11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3], dtype=np.uint8)
NF4_ORDER = np.arange(16, dtype=np.uint8)

CODES = {"nf4": NF4_CODE, "fp4": FP4_CODE}
# bitsandbytes' CPU dequantization kernel decodes FP4 with its own literals, -0 for code 8 included;
# tensors whose last dimension is odd take its torch fallback, which uses FP4_CODE.
FP4_DECODE = np.array(
    [0.0, 0.005208333333, 0.66666667, 1.0, 0.33333333, 0.5, 0.16666667, 0.25,
     -0.0, -0.005208333333, -0.66666667, -1.0, -0.33333333, -0.5, -0.16666667, -0.25],
    dtype=np.float32,
)  # fmt: skip


def decode_table(quant_type: str, shape: tuple[int, ...]) -> np.ndarray:
    """The values bitsandbytes' CPU dequantization gives each code, for a tensor of `shape`."""
    if quant_type == "fp4" and shape[-1] % 2 == 0:
        return FP4_DECODE
    return CODES[quant_type]
ORDERS = {"nf4": NF4_ORDER, "fp4": FP4_ORDER}

NESTED_BLOCKSIZE = 256
_TINY = np.float32(1e-38)  # bitsandbytes clamps absmax before taking its reciprocal
_LUT_SIZE = 65536


def bounds(quant_type: str) -> np.ndarray:
    """Midpoints between neighbouring code values in sorted order: a value's code is how many it exceeds."""
    code, order = CODES[quant_type], ORDERS[quant_type]
    ordered = code[order]
    return ((ordered[:-1] + ordered[1:]) / np.float32(2)).astype(np.float32)


def layout(shape: tuple[int, ...], blocksize: int, double_quant: bool,
           nested_blocksize: int = NESTED_BLOCKSIZE) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensors a 4-bit weight of `shape` becomes (suffix after `.weight` -> dtype, shape), without data.

    The packed weight itself ("") and the quant_state JSON are listed too; the JSON's length is data-free
    but depends on the names, so `formats.bnb` fills it in.
    """
    n = int(np.prod(shape))
    blocks = -(-n // blocksize)
    out = {"": ("U8", ((n + 1) // 2, 1))}
    if double_quant:
        out[".absmax"] = ("U8", (blocks,))
        out[".nested_absmax"] = ("F32", (-(-blocks // nested_blocksize),))
        out[".nested_quant_map"] = ("F32", (256,))
    else:
        out[".absmax"] = ("F32", (blocks,))
    out[".quant_map"] = ("F32", (16,))
    return out


def quantize_4bit(x: np.ndarray, blocksize: int, quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Reference: float32 values (any shape) -> (packed codes uint8 [(n+1)//2, 1], absmax float32 [blocks])."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n = flat.size
    full = n - n % blocksize
    blocks = flat[:full].reshape(-1, blocksize)
    absmax = np.abs(blocks).max(axis=1) if full else np.zeros(0, np.float32)
    # Full blocks are multiplied by the reciprocal; the partial last block is truly divided.
    inverse = (np.float32(1) / np.maximum(absmax, _TINY)).astype(np.float32)
    scaled = np.clip(blocks * inverse[:, None], -1, 1).reshape(-1)
    if full < n:
        tail = flat[full:]
        tail_max = np.maximum(np.abs(tail).max(), _TINY)  # stored clamped, unlike full blocks' absmax
        absmax = np.append(absmax, tail_max).astype(np.float32)
        scaled = np.concatenate([scaled, np.clip(tail / tail_max, -1, 1)])
    if n % 2:
        scaled = np.append(scaled, np.float32(0))
    codes = ORDERS[quant_type][np.searchsorted(bounds(quant_type), scaled, side="left")]
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.astype(np.uint8).reshape(-1, 1), absmax.astype(np.float32)


def dequantize_4bit(packed: np.ndarray, absmax: np.ndarray, shape: tuple[int, ...], blocksize: int,
                    quant_type: str) -> np.ndarray:
    """Reference: float32 values of `shape`, computed as bitsandbytes does (code * absmax in float32)."""
    n = int(np.prod(shape))
    return dequantize_range(packed, absmax, decode_table(quant_type, shape), blocksize, 0, n).reshape(shape)


def dequantize_range(packed: np.ndarray, absmax: np.ndarray, table: np.ndarray, blocksize: int, first: int,
                     count: int) -> np.ndarray:
    """float32 values of elements [first, first + count) of a packed 4-bit tensor."""
    index = np.arange(first, first + count)
    flat = packed.reshape(-1).view(np.uint8)
    codes = np.where(index % 2 == 0, flat[index // 2] >> 4, flat[index // 2] & 0xF)
    return (table[codes] * absmax.astype(np.float32)[index // blocksize]).astype(np.float32)


# ---- double quantization: the absmax in bitsandbytes' signed 8-bit dynamic code, blocks of 256 ----

def _linspace_f32(start: float, end: float, steps: int) -> np.ndarray:
    """torch.linspace in float32 on CPU: the first half counts up from start, the second half down from
    end, each value one fused multiply-add (exact here in float64, then rounded once)."""
    start32, end32 = np.float32(start), np.float32(end)
    step = np.float64((end32 - start32) / np.float32(steps - 1))
    idx = np.arange(steps)
    up = np.float64(start32) + step * idx
    down = np.float64(end32) - step * (steps - idx - 1)
    return np.where(idx < steps // 2, up, down).astype(np.float32)


def dynamic_map() -> np.ndarray:
    """bitsandbytes' create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8): 256 sorted values."""
    data: list[float] = []
    for i in range(7):
        boundaries = _linspace_f32(0.1, 1, 2**i + 1)
        means = ((boundaries[:-1] + boundaries[1:]) / np.float32(2)).astype(np.float32)
        scale = np.float32(10.0 ** (-6 + i))  # torch multiplies the float32 means by a float32 scalar
        data += (scale * means).tolist()
        data += (-scale * means).tolist()
    data += [0.0, 1.0]
    data += [0.0] * (256 - len(data))
    return np.array(sorted(data), dtype=np.float32)


DYNAMIC_MAP = dynamic_map()


def _lookup_table(code: np.ndarray) -> np.ndarray:
    """bitsandbytes' CPU code search: 65536 evenly spaced points in [-1, 1], each mapped to a code index."""
    midpoints = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    i = np.arange(_LUT_SIZE, dtype=np.float32)
    points = np.float32(-1) + (np.float32(2) * i) / np.float32(_LUT_SIZE - 1)
    return np.searchsorted(midpoints, points, side="left").astype(np.uint8)


_DYNAMIC_LUT = _lookup_table(DYNAMIC_MAP)


def lut_index(scaled: np.ndarray) -> np.ndarray:
    """Where a scaled value lands among the 65536 points: ((v + 1) * 0.5) * 65535 + 0.5, truncated."""
    v = np.clip(scaled, -1, 1).astype(np.float32)
    position = ((v + np.float32(1)) * np.float32(0.5)).astype(np.float32) * np.float32(_LUT_SIZE - 1)
    return (position.astype(np.float32) + np.float32(0.5)).astype(np.float32).astype(np.uint16)


def quantize_blockwise_8bit(x: np.ndarray, blocksize: int = NESTED_BLOCKSIZE) -> tuple[np.ndarray, np.ndarray]:
    """Reference for bitsandbytes' CPU `quantize_blockwise` with the dynamic map: (codes uint8, absmax f32)."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    n = flat.size
    blocks = -(-n // blocksize)
    padded = np.zeros(blocks * blocksize, dtype=np.float32)
    padded[:n] = flat
    per_block = padded.reshape(blocks, blocksize)
    absmax = np.abs(per_block).max(axis=1).astype(np.float32)
    safe = np.where(absmax == 0, np.float32(1), absmax)
    inverse = (np.float32(1) / safe).astype(np.float32)
    codes = _DYNAMIC_LUT[lut_index(per_block * inverse[:, None])]
    codes[absmax == 0] = 0
    return codes.reshape(-1)[:n].astype(np.uint8), absmax


def double_quantize(absmax: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.float32]:
    """absmax -> (codes uint8, nested_absmax f32, offset): offset is torch's float32 mean of absmax."""
    offset = torch_mean_f32(absmax)
    centred = (absmax.astype(np.float32) - offset).astype(np.float32)
    codes, nested_absmax = quantize_blockwise_8bit(centred)
    return codes, nested_absmax, offset


def dequantize_absmax(codes: np.ndarray, nested_absmax: np.ndarray, nested_code: np.ndarray,
                      offset: float, nested_blocksize: int = NESTED_BLOCKSIZE) -> np.ndarray:
    """bitsandbytes' dequantize_blockwise of the absmax codes, plus the float32 offset."""
    scale = np.repeat(nested_absmax.astype(np.float32), nested_blocksize)[: codes.size]
    return ((nested_code[codes] * scale).astype(np.float32) + np.float32(offset)).astype(np.float32)
