"""Reading fine-grained FP8 checkpoints (quant_method "fp8") back: each `weight` with its `weight_scale_inv`."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from quantkit import api, dtypes, native
from quantkit.api import TensorSink
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import OutputTensor
from quantkit.io.source import Checkpoint
from quantkit.methods.fp8 import blocks
from quantkit.methods.fp8.quantizer import METHOD
from quantkit.numerics import CHUNK_ELEMENTS

SCALE = "weight_scale_inv"
ACTIVATION_SCALE = "input_scale"  # static activation scales: a dense model has no use for them
SCALE_DTYPES = ("F32", "BF16", "F16", "U8")
ERROR_BOUND = 0.1  # relative weight error: e4m3 keeps 3 mantissa bits (about 3% per weight)


def block_size(checkpoint: Checkpoint) -> tuple[int, int]:
    size = (checkpoint.quantization_config or {}).get("weight_block_size") or blocks.BLOCK
    if not (isinstance(size, (list, tuple)) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        raise QuantkitError(f"{checkpoint.root / 'config.json'}: weight_block_size {size!r} is not two positive integers")
    return size[0], size[1]


class Fp8Reader:
    """Dequantizer and checker for checkpoints whose quant_method is "fp8"."""

    quant_method = "fp8"

    def modules(self, checkpoint: Checkpoint) -> dict[str, list[str]]:
        found = {}
        for name in checkpoint.tensors:
            if name.endswith(f".{SCALE}"):
                module = name.removesuffix(f".{SCALE}")
                parts = [f"{module}.weight", name, f"{module}.{ACTIVATION_SCALE}"]
                found[module] = [p for p in parts if p in checkpoint.tensors]
        return found

    def scheme(self, checkpoint: Checkpoint) -> str:
        return "fp8-block"

    def options(self, checkpoint: Checkpoint) -> api.Options | None:
        """Our writer's, whose layout verify compares sizes with, where the scales are float32 as it writes them."""
        scales = [info.dtype for name, info in checkpoint.tensors.items() if name.endswith(f".{SCALE}")]
        return api.Options(method=METHOD) if all(d == "F32" for d in scales) else None

    def describe(self, qc: dict) -> dict:
        return {"method": self.quant_method, "weight_block_size": qc.get("weight_block_size"),
                "activation_scheme": qc.get("activation_scheme")}  # fmt: skip

    def error_bound(self, scheme: str) -> float:
        return ERROR_BOUND

    def default_dtype(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> str | None:
        return None  # config.json's dtype (the publisher's bf16)

    def layout(self, checkpoint: Checkpoint, module: str, names: list[str], dtype: str) -> list[OutputTensor]:
        weight = checkpoint.tensors.get(f"{module}.weight")
        if weight is None:
            raise QuantkitError(f"{module}: has {SCALE} but no weight")
        return [OutputTensor(f"{module}.weight", dtype, weight.shape)]

    def dequantize(self, checkpoint: Checkpoint, module: str, names: list[str], read: Callable[[str], np.ndarray],
                   dtype: str, sink: TensorSink) -> None:  # fmt: skip
        problem = self._problem(checkpoint, module)
        if problem:
            raise QuantkitError(problem)
        block = block_size(checkpoint)
        codes = read(f"{module}.weight")
        scales = blocks.scale_values(read(f"{module}.{SCALE}"), checkpoint.tensors[f"{module}.{SCALE}"].dtype)
        scales = np.broadcast_to(scales.reshape(1, 1), blocks.grid(codes.shape, block)) if scales.size == 1 else scales
        name = f"{module}.weight"
        rows = max(block[0], CHUNK_ELEMENTS // codes.shape[1] // block[0] * block[0])
        for start in range(0, codes.shape[0], rows):
            if native.DENSE_KERNELS and dtype in native.DENSE:
                sink.write(name, native.fp8_dense(codes[start : start + rows], scales, block, start, "F32", dtype))
                continue
            values = blocks.dequantize_band(codes[start : start + rows], scales, start, block)
            sink.write(name, dtypes.from_float32(values, dtype))
        sink.done(name)

    def _problem(self, checkpoint: Checkpoint, module: str) -> str | None:
        weight = checkpoint.tensors.get(f"{module}.weight")
        scale = checkpoint.tensors[f"{module}.{SCALE}"]
        if weight is None:
            return f"'{module}': {SCALE} without a weight"
        if weight.dtype != "F8_E4M3" or len(weight.shape) != 2:
            return f"'{module}.weight': {weight.dtype}{list(weight.shape)}, expected a 2-D F8_E4M3 weight"
        expected = blocks.grid(weight.shape, block_size(checkpoint))
        if scale.dtype not in SCALE_DTYPES or (tuple(scale.shape) != expected and scale.numel != 1):
            return f"'{module}.{SCALE}': {scale.dtype}{list(scale.shape)}, expected F32{list(expected)} (one per block)"
        return None

    def check(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> list[str]:
        try:
            block_size(checkpoint)
        except QuantkitError as e:
            return [e.message]
        return [p for p in (self._problem(checkpoint, m) for m in modules) if p]
