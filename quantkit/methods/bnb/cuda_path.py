"""--device cuda: bitsandbytes' own CUDA kernels for NF4 / FP4 / int8, one row chunk at a time.

The CUDA kernels round differently from the CPU reference in places (FP4 sign of tiny values, the
double-quant code search, int8 division), so this path is held to "same codes except at ties".
"""

from __future__ import annotations

import numpy as np
import torch

from quantkit.methods.bnb.torch_path import _as_tensor


def quantize_4bit(chunk: np.ndarray, dtype: str, blocksize: int, quant_type: str) -> tuple[np.ndarray, np.ndarray]:
    import bitsandbytes.functional as F

    weight = _as_tensor(chunk, dtype).cuda()
    packed, state = F.quantize_4bit(weight, blocksize=blocksize, quant_type=quant_type)
    return packed.cpu().numpy().reshape(-1, 1), state.absmax.float().cpu().numpy()


def quantize_int8(chunk: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    import bitsandbytes.functional as F

    weight = _as_tensor(chunk, dtype).cuda().to(torch.float16)
    codes, scb, _ = F.int8_vectorwise_quant(weight)
    return codes.cpu().numpy(), scb.float().cpu().numpy()
