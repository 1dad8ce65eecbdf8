"""Vectorized torch (CPU) versions of the bitsandbytes schemes: same contracts and bytes as the numpy
references in nf4.py / int8.py. Imported only for --backend torch."""

from __future__ import annotations

import numpy as np
import torch

from quantkit.methods.bnb import nf4

_TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def _as_tensor(chunk: np.ndarray, dtype: str) -> torch.Tensor:
    """Stored bits -> a torch tensor of the checkpoint's dtype (BF16 bits reinterpreted, not converted)."""
    array = np.ascontiguousarray(chunk)
    if dtype == "BF16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array).to(_TORCH_DTYPES[dtype])


def quantize_4bit(chunk: np.ndarray, dtype: str, blocksize: int, quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    flat = _as_tensor(chunk, dtype).reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1) if full else flat.new_zeros(0)
    inverse = 1.0 / absmax.clamp(min=1e-38)
    scaled = (blocks * inverse[:, None]).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_max = flat[full:].abs().max().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (flat[full:] / tail_max).clamp(-1, 1)])
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    bounds = torch.from_numpy(nf4.bounds(quant_type))
    order = torch.from_numpy(nf4.ORDERS[quant_type].astype(np.int64))
    codes = order[torch.bucketize(scaled, bounds)].to(torch.uint8)
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed.numpy().reshape(-1, 1), absmax.numpy()


def quantize_int8(chunk: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    half = _as_tensor(chunk, dtype).to(torch.float16)
    scb = half.abs().amax(dim=1).float()
    codes = torch.round(half * (127.0 / scb[:, None]))
    codes = torch.where(torch.isfinite(codes), codes, torch.zeros_like(codes))
    return codes.to(torch.int8).numpy(), scb.numpy()
