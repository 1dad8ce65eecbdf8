"""Writing the fine-grained FP8 layout (quant_method "fp8"), which transformers' FP8 integration and vLLM load:
each linear `weight` as e4m3fn with a float32 `weight_scale_inv` per 128 x 128 block.

`quantize --method fp8-block --layout fp8` picks it (the method's name here is `fp8-fine`; `fp8-block`
alone writes the compressed-tensors layout).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantkit import api, dtypes
from quantkit.api import TensorSink, WeightSource
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import OutputTensor
from quantkit.methods.fp8 import blocks, native
from quantkit.numerics import CHUNK_ELEMENTS

METHOD = "fp8-fine"


@dataclass(frozen=True)
class Fp8FineOptions(api.Options):
    """Fine-grained FP8 has no settings of its own: 128 x 128 blocks, dynamic activations."""


class Fp8Fine:
    methods = (METHOD,)
    options = Fp8FineOptions

    def presets(self) -> dict[str, api.Options]:
        return {}  # inspect's FP8 size is the compressed-tensors fp8-block one: the same bytes

    def check(self, options: api.Options) -> None:
        pass

    def layout(self, module: str, shape: tuple[int, ...], source_dtype: str, options: api.Options) -> list[OutputTensor]:
        if len(shape) != 2:
            raise QuantkitError(f"{module}.weight: expected a 2-D linear weight, got shape {list(shape)}")
        return [OutputTensor(f"{module}.weight", "F8_E4M3", shape),
                OutputTensor(f"{module}.weight_scale_inv", "F32", blocks.grid(shape))]  # fmt: skip

    def config(self, options: api.Options, skipped: list[str], head: list[str]) -> dict:
        # transformers' FineGrainedFP8Config as the publishers write it; the head stays dense
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3", "weight_block_size": list(blocks.BLOCK),
                "modules_to_not_convert": sorted(set(skipped) | set(head))}  # fmt: skip

    def quantize(self, module: str, weight: WeightSource, options: api.Options, sink: TensorSink) -> None:
        rows, cols = weight.shape
        band = blocks.BLOCK[0]
        scale_inv = np.empty(blocks.grid(weight.shape), np.float32)
        step = max(band, CHUNK_ELEMENTS // cols // band * band)
        start = 0
        for chunk in weight.chunks(step):
            bands = slice(start // band, (start + len(chunk) + band - 1) // band)
            if native.AVAILABLE and weight.dtype in ("BF16", "F16", "F32"):
                quantized = native.quantize_band(chunk, weight.dtype, blocks.BLOCK)
            else:
                values = dtypes.to_float32(chunk, weight.dtype)
                quantized = blocks.quantize_band(values) if np.all(np.isfinite(values)) else None
            if quantized is None:
                raise QuantkitError(f"tensor '{module}.weight': holds NaN or infinite values")
            codes, scale_inv[bands] = quantized
            sink.write(f"{module}.weight", codes)
            start += len(chunk)
        sink.done(f"{module}.weight")
        sink.write(f"{module}.weight_scale_inv", scale_inv)
        sink.done(f"{module}.weight_scale_inv")
