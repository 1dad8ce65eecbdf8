"""The GPTQ quantizer: group-wise integers (groupwise.py) written in the GPTQ checkpoint layout (layout.py)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantkit import api, dtypes
from quantkit.api import IntegerBlocks, TensorSink, WeightSource
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import OutputTensor
from quantkit.methods.gptq import groupwise
from quantkit.methods.gptq.integers import to_qweight
from quantkit.methods.gptq.layout import (
    _V1_OFFSET,
    CHECKPOINT_FORMATS,
    COMPANIONS,
    group_index,
    pack_qweight,
    pack_qzeros,
    quantization_config,
)
from quantkit.numerics import CHUNK_ELEMENTS


@dataclass(frozen=True)
class GptqOptions(api.Options):
    """Group-wise integer settings (`method` gptq)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    format: str | None = None
    optimize: bool = False
    backend: str = "auto"


def version_of(options: GptqOptions) -> str:
    """--format, by default v1 for symmetric output (the classic layout) and v2 for asymmetric."""
    return options.format or ("v1" if options.sym else "v2")


class Gptq:
    """Group-wise integer quantization written in the GPTQ checkpoint layout."""

    methods = ("gptq",)
    options = GptqOptions

    def presets(self) -> dict[str, GptqOptions]:
        return {f"gptq-{bits}bit-g128": GptqOptions(method="gptq", bits=bits, group_size=128) for bits in (4, 8)}

    def check(self, options: GptqOptions) -> None:
        if options.bits not in groupwise.SUPPORTED_BITS:
            raise QuantkitError(f"--bits {options.bits}: gptq output supports {', '.join(map(str, groupwise.SUPPORTED_BITS))}")
        if options.group_size != -1 and options.group_size <= 0:
            raise QuantkitError(f"--group-size {options.group_size}: must be positive, or -1 for whole rows")
        if options.format not in (None, *CHECKPOINT_FORMATS):
            raise QuantkitError(f"--format {options.format}: choose v1 or v2")
        if options.backend not in ("auto", "numba", "numpy"):
            raise QuantkitError(f"--backend {options.backend}: gptq runs on numba or numpy (the same bytes)")

    def layout(self, module: str, shape: tuple[int, ...], source_dtype: str, options: GptqOptions) -> list[OutputTensor]:
        groupwise.check_shape(f"{module}.weight", shape, options.bits, options.group_size)
        parts = groupwise.layout(shape, options.bits, options.group_size)
        return [OutputTensor(f"{module}.{part}", dtype, shape) for part, (dtype, shape) in parts.items()]

    def config(self, options: GptqOptions, skipped: list[str], head: list[str]) -> dict:
        dense = tuple(m for m in skipped if m not in head)
        return quantization_config(options.bits, options.group_size, options.sym, version_of(options), dense)

    def quantize(self, module: str, weight: WeightSource, options: GptqOptions, sink: TensorSink) -> None:
        bits, group_size, version = options.bits, options.group_size, version_of(options)
        out_features, in_features = weight.shape
        min_zero = _V1_OFFSET if version == "v1" and not options.sym else 0
        qweight = np.empty((in_features * bits // groupwise.PACK_BITS, out_features), np.int32)
        scales = np.empty((out_features, groupwise.n_groups(in_features, group_size)), np.float32)
        zeros = np.empty(scales.shape, np.uint8)
        start = 0
        for chunk in weight.chunks(max(1, CHUNK_ELEMENTS // in_features)):
            stop = start + chunk.shape[0]
            try:
                if options.backend == "numpy":
                    quant = groupwise.quantize_reference(dtypes.to_float32(chunk, weight.dtype), bits, group_size,
                                                         options.sym, min_zero, options.optimize)  # fmt: skip
                    qweight[:, start:stop] = pack_qweight(quant.codes, bits)
                    scales[start:stop] = quant.scales
                    zeros[start:stop] = quant.zeros
                else:
                    groupwise.quantize_into(chunk, weight.dtype, bits, group_size, options.sym, min_zero, options.optimize,
                                            qweight, start, scales, zeros)  # fmt: skip
            except QuantkitError as e:
                raise QuantkitError(f"tensor '{module}.weight': {e.message}", e.hint) from None
            start = stop
        _write(module, qweight, zeros, scales, options, sink)

    def transcode(self, module: str, blocks: IntegerBlocks, dtype: str, options: GptqOptions, sink: TensorSink) -> bool:
        """Write IntegerBlocks as they are (no rounding) when these options' groups can hold them; False
        (nothing written) when they cannot. GPTQ scales are float16 whatever the source `dtype`."""
        found = to_qweight(blocks, options.bits, options.group_size, options.sym)
        if found is None:
            return False
        qweight, scales, zeros = found
        _write(module, qweight, zeros, scales, options, sink)
        return True


def _write(module: str, qweight: np.ndarray, zeros: np.ndarray, scales: np.ndarray, options: GptqOptions,
           sink: TensorSink) -> None:
    """A module's GPTQ tensors from packed codes and its zero points and scales `[out, groups]`."""
    tensors = {
        "qweight": qweight,
        "qzeros": pack_qzeros(zeros, options.bits, version_of(options)),
        "scales": np.ascontiguousarray(scales.T).astype(np.float16),
        "g_idx": group_index(qweight.shape[0] * groupwise.PACK_BITS // options.bits, options.group_size),
    }
    for part in COMPANIONS:
        sink.write(f"{module}.{part}", tensors[part])
        sink.done(f"{module}.{part}")
