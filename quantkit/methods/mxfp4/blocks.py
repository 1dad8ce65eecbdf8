"""gpt-oss's MXFP4 experts: FP4 (e2m1) values two to a byte, each run of 32 sharing an e8m0 exponent.

On disk (per layer, `model.layers.N.mlp.experts.`): `gate_up_proj_blocks` uint8 [E, 2I, H/32, 16] with
`gate_up_proj_scales` uint8 [E, 2I, H/32], `down_proj_blocks` [E, H, I/32, 16] with `down_proj_scales`
[E, H, I/32]: row r (an output feature), group g, byte k holds inputs g*32 + 2k (low nibble) and
g*32 + 2k + 1. Dense, as transformers' GptOssExperts holds them: `gate_up_proj` [E, H, 2I] (gate and up
interleaved on the last axis, left so) and `down_proj` [E, I, H], i.e. each expert transposed.
Values are transformers' CPU dequantization: torch.ldexp(e2m1, code - 127) in float32, then the dtype.
"""

from __future__ import annotations

import numpy as np

from quantkit.numerics import decode_e8m0, unpack_fp4

GROUP = 32  # values per scale
BYTES = GROUP // 2


def dense_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """[..., rows, groups, 16] -> the dense [..., groups * 32, rows]."""
    *lead, rows, groups, _ = blocks_shape
    return (*lead, groups * GROUP, rows)


def dequantize_groups(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float32 [rows, groups * 32] from blocks [rows, groups, 16] and scales [rows, groups] (one expert, or
    a run of its groups)."""
    values = unpack_fp4(blocks)  # [rows, groups, 32]
    # e2m1 has at most two significant bits, so the product is ldexp's exact result for codes below 255
    # (254 overflows to infinity either way); code 255 means 2**128, which only ldexp can apply (0.5 -> 2**127)
    out = values * decode_e8m0(scales)[..., None]
    top = scales == 255
    if top.any():
        out[top] = np.ldexp(values[top], np.int32(128))
    return out.reshape(blocks.shape[0], -1)
