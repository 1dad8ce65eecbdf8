"""Reading gpt-oss MXFP4 checkpoints (quant_method "mxfp4") back: each expert tensor's `_blocks` and `_scales`."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from quantkit import dtypes
from quantkit.api import Mxfp4Blocks, TensorSink
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import OutputTensor
from quantkit.io.source import Checkpoint
from quantkit.io.stream import TensorReads
from quantkit.methods.mxfp4 import blocks, native
from quantkit.native import DENSE
from quantkit.numerics import CHUNK_ELEMENTS

ERROR_BOUND = 0.3  # relative weight error of FP4 with power-of-two scales


class Mxfp4Reader:
    """Dequantizer and checker for checkpoints whose quant_method is "mxfp4" (gpt-oss)."""

    quant_method = "mxfp4"

    def modules(self, checkpoint: Checkpoint) -> dict[str, list[str]]:
        found = {}
        for name in checkpoint.tensors:
            if name.endswith("_blocks"):
                module = name.removesuffix("_blocks")
                found[module] = [p for p in (name, f"{module}_scales") if p in checkpoint.tensors]
        return found

    def scheme(self, checkpoint: Checkpoint) -> str:
        return "mxfp4"

    def options(self, checkpoint: Checkpoint) -> None:
        return None  # no writer: verify has no layout to compare sizes with

    def describe(self, qc: dict) -> dict:
        return {"method": self.quant_method, "modules_to_not_convert": qc.get("modules_to_not_convert")}

    def error_bound(self, scheme: str) -> float:
        return ERROR_BOUND

    def default_dtype(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> str | None:
        return None

    def layout(self, checkpoint: Checkpoint, module: str, names: list[str], dtype: str) -> list[OutputTensor]:
        return [OutputTensor(module, dtype, blocks.dense_shape(checkpoint.tensors[f"{module}_blocks"].shape))]

    def dequantize(self, checkpoint: Checkpoint, module: str, names: list[str], read: Callable[[str], np.ndarray],
                   dtype: str, sink: TensorSink) -> None:  # fmt: skip
        problem = self._problem(checkpoint, module)
        if problem:
            raise QuantkitError(problem)
        packed = read(f"{module}_blocks")
        scales = read(f"{module}_scales")
        *lead, rows, groups, _ = packed.shape
        packed = packed.reshape(-1, rows, groups, blocks.BYTES)
        scales = scales.reshape(-1, rows, groups)
        step = max(1, CHUNK_ELEMENTS // (rows * blocks.GROUP))  # groups per chunk: output rows of 32 inputs each
        fast = native.AVAILABLE and dtype in DENSE and packed.flags.c_contiguous and scales.flags.c_contiguous
        for expert in range(packed.shape[0]):
            for g in range(0, groups, step):
                if fast:
                    sink.write(module, native.dense_groups(packed[expert], scales[expert], g, min(step, groups - g), dtype))
                    continue
                values = blocks.dequantize_groups(packed[expert, :, g : g + step], scales[expert, :, g : g + step])
                sink.write(module, dtypes.from_float32(np.ascontiguousarray(values.T), dtype))
        sink.done(module)

    def mxfp4(self, checkpoint: Checkpoint, module: str, names: list[str], read: TensorReads) -> Mxfp4Blocks:
        """The module's blocks and scales as stored, read by expert (GGUF keeps them as they are)."""
        problem = self._problem(checkpoint, module)
        if problem:
            raise QuantkitError(problem)
        stored, scales = f"{module}_blocks", f"{module}_scales"
        return Mxfp4Blocks(tuple(checkpoint.tensors[stored].shape),
                           lambda start, stop: (read.rows(stored, start, stop), read.rows(scales, start, stop)))

    def _problem(self, checkpoint: Checkpoint, module: str) -> str | None:
        packed = checkpoint.tensors[f"{module}_blocks"]
        scales = checkpoint.tensors.get(f"{module}_scales")
        if scales is None:
            return f"'{module}_blocks': no {module}_scales beside it"
        if packed.dtype != "U8" or len(packed.shape) < 3 or packed.shape[-1] != blocks.BYTES:
            return f"'{module}_blocks': {packed.dtype}{list(packed.shape)}, expected U8[..., rows, groups, 16]"
        if scales.dtype != "U8" or tuple(scales.shape) != tuple(packed.shape[:-1]):
            return f"'{module}_scales': {scales.dtype}{list(scales.shape)}, expected U8{list(packed.shape[:-1])}"
        if math.prod(packed.shape) == 0:
            return f"'{module}_blocks' is empty"
        return None

    def check(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> list[str]:
        return [p for p in (self._problem(checkpoint, m) for m in modules) if p]
