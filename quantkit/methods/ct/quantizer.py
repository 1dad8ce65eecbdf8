"""The compressed-tensors quantizer: `quantize --method fp8 | fp8-block | w4a16 | w4a16-asym | w8a16 |
nvfp4a16 | mxfp4a16` writes what llm-compressor's `model_free_ptq` writes for the preset of that name.

A quantized module `m` loses `m.weight` and gains the scheme's tensors (schemes.layout); the weight is read
and its main tensor written in row chunks, the scales (a small fraction of it) gathered and written after.
`ignore` lists every module kept dense (the head, --skip, modules the scheme cannot hold), by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from quantkit import api, dtypes
from quantkit.api import TensorSink, WeightSource
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import OutputTensor
from quantkit.methods.ct import native, schemes
from quantkit.methods.ct.integers import to_packed
from quantkit.modules import matches
from quantkit.numerics import CHUNK_ELEMENTS

# Modules sharing one NVFP4 global scale (llm-compressor's fused sets): (parent suffixes, leaf names).
FUSED_SETS = ((("attn", "attention"), ("q_proj", "k_proj", "v_proj")), (("attn", "attention"), ("wq_a", "wkv_a_with_mqa")),
              (("mlp",), ("gate_proj", "up_proj")), (("",), ("w1", "w3")))  # fmt: skip
SOURCE_DTYPES = ("BF16", "F16", "F32")


@dataclass(frozen=True)
class CtOptions(api.Options):
    """compressed-tensors settings: `method` one of schemes.SCHEMES; `group_size` for the integer schemes
    (default 128; the float ones have theirs fixed)."""

    group_size: int | None = None


def group_size_of(options: CtOptions) -> int:
    scheme = schemes.SCHEMES[options.method]
    return options.group_size or scheme.group_size or 0


def fused_partners(module: str) -> list[str]:
    """The other modules whose weights share `module`'s NVFP4 global scale."""
    parent, _, name = module.rpartition(".")
    for suffixes, leaves in FUSED_SETS:
        if name in leaves and parent.endswith(suffixes):
            return [f"{parent}.{other}" if parent else other for other in leaves if other != name]
    return []


class CompressedTensors:
    """Quantizer for the compressed-tensors presets (quant_method "compressed-tensors")."""

    methods = tuple(schemes.SCHEMES)
    options = CtOptions

    def presets(self) -> dict[str, CtOptions]:
        return {method: CtOptions(method=method) for method in ("fp8", "w4a16", "nvfp4a16")}

    def check(self, options: CtOptions) -> None:
        if options.group_size is None:
            return
        if options.method not in schemes.INT_METHODS:
            fixed = schemes.SCHEMES[options.method].group_size
            if options.group_size != fixed:
                raise QuantkitError(f"--group-size {options.group_size}: {options.method} has "
                                    f"{f'groups of {fixed}' if fixed else 'no groups'}, which compressed-tensors fixes")
        elif options.group_size <= 0 or options.group_size % 8:
            raise QuantkitError(f"--group-size {options.group_size}: {options.method} takes a positive multiple of 8 (default 128)")

    def layout(self, module: str, shape: tuple[int, ...], source_dtype: str, options: CtOptions) -> list[OutputTensor]:
        scheme = schemes.SCHEMES[options.method]
        if len(shape) != 2:
            raise QuantkitError(f"'{module}.weight': expected a 2-D linear weight, got shape {list(shape)}")
        if source_dtype not in SOURCE_DTYPES:
            raise QuantkitError(f"'{module}.weight' is {source_dtype}: compressed-tensors quantizes bf16, fp16 or fp32 weights")
        why = schemes.unfit(scheme, shape, group_size_of(options))
        if why:
            raise api.Unfit(why)
        return [OutputTensor(f"{module}.{suffix}", dtype, part_shape)
                for suffix, dtype, part_shape in schemes.layout(scheme, shape, source_dtype, group_size_of(options))]

    def config(self, options: CtOptions, skipped: list[str], head: list[str]) -> dict:
        ignore = sorted(set(skipped) | set(head))
        return schemes.quantization_config(schemes.SCHEMES[options.method], group_size_of(options), ignore)

    def quantize(self, module: str, weight: WeightSource, options: CtOptions, sink: TensorSink) -> None:
        scheme = schemes.SCHEMES[options.method]
        dtype, (rows, cols) = weight.dtype, weight.shape
        group_size = group_size_of(options)
        global_scale = self._global_scale(module, weight, options) if scheme.method == "nvfp4a16" else None
        step = max(scheme.row_unit, CHUNK_ELEMENTS // cols // scheme.row_unit * scheme.row_unit)
        main = f"{module}.{schemes.layout(scheme, weight.shape, dtype, group_size)[0][0]}"
        parts: dict[str, list[np.ndarray]] = {}
        for chunk in weight.chunks(step):
            stored, companions = self._chunk(scheme, chunk, dtype, group_size, global_scale)
            sink.write(main, stored)
            for suffix, value in companions.items():
                parts.setdefault(suffix, []).append(value)
        sink.done(main)
        tensors = {suffix: np.concatenate(values) for suffix, values in parts.items()}
        if tensors["weight_scale"].dtype == np.float32:  # values of the source dtype (fp4 scales are codes)
            tensors["weight_scale"] = dtypes.from_float32(tensors["weight_scale"], dtype)
        if scheme.method in schemes.INT_METHODS:
            tensors["weight_shape"] = np.array([rows, cols], np.int64)
        if "zero" in tensors:
            tensors["weight_zero_point"] = schemes.pack_zero_points(tensors.pop("zero"), scheme.bits)
        if global_scale is not None:
            tensors["weight_global_scale"] = np.array([global_scale], np.float32)
        for suffix, _, _ in schemes.layout(scheme, weight.shape, dtype, group_size)[1:]:
            sink.write(f"{module}.{suffix}", tensors[suffix])
            sink.done(f"{module}.{suffix}")

    def transcode(self, module: str, blocks: api.IntegerBlocks, dtype: str, options: CtOptions, sink: TensorSink) -> bool:
        """Write IntegerBlocks as they are (W4A16 / W8A16 / W4A16_ASYM) when the scheme holds them exactly with
        scales of `dtype` (the source's, as planned); False (nothing written) when it cannot."""
        scheme = schemes.SCHEMES[options.method]
        if scheme.method not in schemes.INT_METHODS:
            return False
        found = to_packed(blocks, scheme.bits, group_size_of(options), scheme.symmetric, dtype)
        if found is None:
            return False
        packed, scale, zero = found
        tensors = {"weight_packed": packed, "weight_scale": scale, "weight_shape": np.array(blocks.q.shape, np.int64)}
        if zero is not None:
            tensors["weight_zero_point"] = schemes.pack_zero_points(zero, scheme.bits)
        for suffix, _, _ in schemes.layout(scheme, blocks.q.shape, dtype, group_size_of(options)):
            sink.write(f"{module}.{suffix}", tensors[suffix])
            sink.done(f"{module}.{suffix}")
        return True

    def _chunk(self, scheme: schemes.Scheme, chunk: np.ndarray, dtype: str, group_size: int,
               global_scale: np.float32 | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One row chunk: (its stored main tensor, its rows of each companion)."""
        if scheme.method == "fp8" and native.AVAILABLE and dtype in native.DTYPES:
            codes, scale = native.fp8_channel(chunk, dtype)
            return codes, {"weight_scale": scale}
        if scheme.method == "fp8-block" and native.BLOCK_AVAILABLE and dtype in native.DTYPES:
            found = native.fp8_block(chunk, dtype, schemes.FP8_BLOCK)
            if found is not None:
                return found[0], {"weight_scale": found[1]}
        if scheme.method in schemes.INT_METHODS and dtype in native.DTYPES and group_size <= 4096 \
                and (native.INT_AVAILABLE if scheme.symmetric else native.ASYM_AVAILABLE):  # fmt: skip
            kernel = native.int_symmetric if scheme.symmetric else native.int_asymmetric
            found = kernel(chunk, dtype, scheme.bits, group_size)
            if found is not None:
                return found[0], dict(zip(("weight_scale", "zero"), found[1:]))
        if scheme.method in ("nvfp4a16", "mxfp4a16") and native.FP4_AVAILABLE and dtype in native.DTYPES:
            found = native.fp4(chunk, dtype, scheme.method == "mxfp4a16", global_scale)
            if found is not None:
                return found[0], {"weight_scale": found[1]}
        w = dtypes.to_float32(chunk, dtype)
        if scheme.method == "fp8":
            codes, scale = schemes.fp8_channel(w, dtype)
        elif scheme.method == "fp8-block":
            codes, scale = schemes.fp8_block(w, dtype)
        elif scheme.method == "nvfp4a16":
            codes, scale = schemes.nvfp4(w, dtype, global_scale)
        elif scheme.method == "mxfp4a16":
            codes, scale = schemes.mxfp4(w, dtype)
        elif scheme.symmetric:
            codes, scale = schemes.int_symmetric(w, dtype, scheme.bits, group_size)
            codes = schemes.pack_int32(codes, scheme.bits)
        else:
            codes, scale, zero = schemes.int_asymmetric(w, dtype, scheme.bits, group_size)
            return schemes.pack_int32(codes, scheme.bits), {"weight_scale": scale, "zero": zero}
        return codes, {"weight_scale": scale}

    def _global_scale(self, module: str, weight: WeightSource, options: CtOptions) -> np.float32:
        """NVFP4's global scale from max |w| over the module and those of its fused partners that are
        quantized too (each member is scanned again for each module of its set: three small extra reads)."""
        nvfp4 = schemes.SCHEMES["nvfp4a16"]
        fused = [weight]
        for other in fused_partners(module):
            partner = weight.partner(other)
            if partner is not None and not matches(other, options.skip) and not schemes.unfit(nvfp4, partner.shape, 16):
                fused.append(partner)
        def peak(chunk: np.ndarray, dtype: str) -> float:
            if native.FP4_AVAILABLE and dtype in native.DTYPES:
                return native.global_absmax(chunk, dtype)
            return schemes.global_absmax(dtypes.to_float32(chunk, dtype))

        absmax = max(peak(chunk, member.dtype) for member in fused for chunk in member.chunks(max(1, CHUNK_ELEMENTS // member.shape[1])))
        return schemes.nvfp4_global_scale(absmax, weight.dtype)
