"""bitsandbytes checkpoints: tensor names, the packed quant_state JSON, and the config dict.

What transformers + bitsandbytes write for a module `m` quantized to 4 bits: `m.weight` (packed codes),
`m.weight.absmax`, `m.weight.quant_map`, with double quantization `m.weight.nested_absmax` and
`m.weight.nested_quant_map`, and `m.weight.quant_state.bitsandbytes__<nf4|fp4>` (JSON bytes).
For LLM.int8: `m.weight` (int8), `m.SCB` and `m.weight_format`.
"""

from __future__ import annotations

import functools
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from quantkit import api, dtypes
from quantkit.api import TensorSink, WeightSource
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import OutputTensor
from quantkit.methods.bnb import int8, native, nf4
from quantkit.numerics import CHUNK_ELEMENTS

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
STORAGE_DTYPES = {"uint8": "U8", "bfloat16": "BF16", "float16": "F16", "float32": "F32"}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
# With double quantization the quant_state JSON holds the absmax mean, whose digits vary: the layout
# reserves room for the longest float repr (a float32 value never needs more).
LONGEST_OFFSET = -1.2345678901234567e-45


@dataclass(frozen=True)
class BnbOptions(api.Options):
    """bitsandbytes settings: `method` nf4, fp4 or int8."""

    double_quant: bool = False
    blocksize: int = 64
    compute_dtype: str = "float32"
    quant_storage: str = "uint8"
    backend: str = "auto"
    device: str = "cpu"


def quant_state_key(quant_type: str) -> str:
    return f"quant_state.bitsandbytes__{quant_type}"


def quant_state_json(quant_type: str, blocksize: int, dtype: str, shape: tuple[int, ...], offset: float | None) -> bytes:
    """The non-tensor part of a 4-bit quant_state, serialised exactly as bitsandbytes packs it."""
    state: dict[str, object] = {"quant_type": quant_type, "blocksize": blocksize, "dtype": dtype, "shape": list(shape)}
    if offset is not None:
        state.update({"nested_blocksize": nf4.NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": float(offset)})
    return json.dumps(state).encode()


def config_dict(options: BnbOptions, skip_modules: list[str] | None) -> dict:
    """`BitsAndBytesConfig(...).to_dict()` as transformers writes it into config.json."""
    four_bit = options.method in ("nf4", "fp4")
    return {
        "_load_in_4bit": four_bit,
        "_load_in_8bit": not four_bit,
        "bnb_4bit_compute_dtype": options.compute_dtype if four_bit else "float32",
        "bnb_4bit_quant_storage": options.quant_storage if four_bit else "uint8",
        "bnb_4bit_quant_type": options.method if four_bit else "fp4",
        "bnb_4bit_use_double_quant": bool(options.double_quant) if four_bit else False,
        "llm_int8_enable_fp32_cpu_offload": False,
        "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": skip_modules or None,
        "llm_int8_threshold": 6.0,
        "load_in_4bit": four_bit,
        "load_in_8bit": not four_bit,
        "quant_method": "bitsandbytes",
    }


def rows_per_chunk(shape: tuple[int, ...], blocksize: int) -> int:
    """Rows per chunk: about CHUNK_ELEMENTS values, a whole number of quantization blocks."""
    cols = math.prod(shape[1:])
    unit = blocksize // math.gcd(cols, blocksize)
    return max(unit, (CHUNK_ELEMENTS // max(cols, 1)) // unit * unit)


class BitsAndBytes:
    """Quantizer for bitsandbytes NF4 / FP4 (4-bit) and LLM.int8."""

    methods = ("nf4", "fp4", "int8")
    options = BnbOptions

    def presets(self) -> dict[str, BnbOptions]:
        presets = {}
        for method in self.methods:
            presets[method] = BnbOptions(method=method)
            if method != "int8":
                presets[f"{method}-dq"] = BnbOptions(method=method, double_quant=True)
        return presets

    def check(self, options: BnbOptions) -> None:
        if options.blocksize != 64:
            raise QuantkitError(
                f"--blocksize {options.blocksize}: transformers' BitsAndBytesConfig has no blocksize field",
                "loaders assume 64; only --blocksize 64 is written for bitsandbytes output",
            )
        if options.compute_dtype not in COMPUTE_DTYPES:
            raise QuantkitError(f"--compute-dtype {options.compute_dtype}: choose one of {', '.join(COMPUTE_DTYPES)}")
        if options.quant_storage not in STORAGE_DTYPES:
            raise QuantkitError(f"--quant-storage {options.quant_storage}: choose one of {', '.join(STORAGE_DTYPES)}")
        if options.backend not in ("auto", "c", "torch", "numpy"):
            raise QuantkitError(f"--backend {options.backend}: choose auto, c, torch or numpy (numba is for gptq)")
        if options.backend == "c" and not native.AVAILABLE:
            raise QuantkitError("--backend c: quantkit's compiled kernels (quantkit.native._kernels) are not built",
                                "reinstall quantkit where a C compiler is present, or use --backend numpy")
        if options.device == "cuda":
            _check_cuda()
        elif options.device != "cpu":
            raise QuantkitError(f"--device {options.device}: choose cpu or cuda")

    def layout(self, module: str, shape: tuple[int, ...], source_dtype: str, options: BnbOptions) -> list[OutputTensor]:
        if options.method == "int8":
            return [OutputTensor(f"{module}.{k}", dt, s) for k, (dt, s) in int8.layout(shape).items()]
        weight = f"{module}.weight"
        outputs = [OutputTensor(weight + k, dt, s) for k, (dt, s) in nf4.layout(shape, options.blocksize, options.double_quant).items()]
        storage = STORAGE_DTYPES[options.quant_storage]
        packed_bytes = outputs[0].nbytes
        if packed_bytes % dtypes.itemsize(storage):
            raise QuantkitError(f"'{weight}': {packed_bytes} packed bytes do not fill whole {options.quant_storage} values")
        outputs[0] = OutputTensor(weight, storage, (packed_bytes // dtypes.itemsize(storage), 1))
        # Exact without double quantization; with it, the most the offset's digits can take (variable).
        offset = LONGEST_OFFSET if options.double_quant else None
        state = quant_state_json(options.method, options.blocksize, dtypes.NAME_OF[source_dtype], shape, offset)
        outputs.append(OutputTensor(f"{weight}.{quant_state_key(options.method)}", "U8", (len(state),),
                                    variable=options.double_quant))
        return outputs

    def config(self, options: BnbOptions, skipped: list[str], head: list[str]) -> dict:
        return config_dict(options, skipped)

    def quantize(self, module: str, weight: WeightSource, options: BnbOptions, sink: TensorSink) -> None:
        if options.method == "int8":
            self._quantize_int8(module, weight, options, sink)
        else:
            self._quantize_4bit(module, weight, options, sink)

    def _quantize_4bit(self, module: str, weight: WeightSource, options: BnbOptions, sink: TensorSink) -> None:
        name = f"{module}.weight"
        kernel = nf4_kernel(options)
        absmax_parts = []
        for chunk in weight.chunks(rows_per_chunk(weight.shape, options.blocksize)):
            packed, absmax = kernel(chunk, weight.dtype, options.blocksize, options.method)
            if not np.isfinite(absmax).all():
                raise QuantkitError(f"tensor '{name}' has NaN or infinite values", "fix the checkpoint before quantizing")
            sink.write(name, packed)
            absmax_parts.append(absmax)
        sink.done(name)
        absmax = np.concatenate(absmax_parts) if absmax_parts else np.zeros(0, np.float32)
        offset = None
        if options.double_quant:
            codes, nested_absmax, offset = nf4.double_quantize(absmax)
            for suffix, value in ((".absmax", codes), (".nested_absmax", nested_absmax), (".nested_quant_map", nf4.DYNAMIC_MAP)):
                sink.write(name + suffix, value)
                sink.done(name + suffix)
        else:
            sink.write(name + ".absmax", absmax)
            sink.done(name + ".absmax")
        sink.write(name + ".quant_map", nf4.CODES[options.method])
        sink.done(name + ".quant_map")
        source_dtype = dtypes.NAME_OF[weight.dtype]
        state = quant_state_json(options.method, options.blocksize, source_dtype, weight.shape, offset)
        key = f"{name}.{quant_state_key(options.method)}"
        sink.write(key, state)
        sink.done(key)

    def _quantize_int8(self, module: str, weight: WeightSource, options: BnbOptions, sink: TensorSink) -> None:
        kernel = int8_kernel(options)
        scb_parts = []
        for chunk in weight.chunks(max(1, CHUNK_ELEMENTS // max(weight.shape[1], 1))):
            codes, scb = kernel(chunk, weight.dtype)
            if not np.isfinite(scb).all():
                raise QuantkitError(
                    f"tensor '{module}.weight' has values that are NaN, infinite or beyond float16's range (65504)",
                    "LLM.int8 casts weights to float16 first",
                )
            sink.write(f"{module}.weight", codes)
            scb_parts.append(scb)
        sink.done(f"{module}.weight")
        sink.write(f"{module}.SCB", np.concatenate(scb_parts))
        sink.done(f"{module}.SCB")
        sink.write(f"{module}.weight_format", np.zeros((), np.uint8))
        sink.done(f"{module}.weight_format")


def _check_cuda() -> None:
    try:
        import torch
    except ImportError:
        raise QuantkitError("--device cuda needs torch with CUDA, and torch is not installed") from None
    if not torch.cuda.is_available():
        raise QuantkitError("--device cuda: no CUDA device is available", "use --device cpu")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise QuantkitError("--device cuda needs bitsandbytes, which is not installed", "pip install bitsandbytes") from None


def resolve_backend(options: BnbOptions) -> str:
    if options.device == "cuda":
        return "cuda"
    if options.backend != "auto":
        return options.backend
    if native.AVAILABLE:
        return "c"
    _warn_numpy_fallback()
    return "numpy"


@functools.cache
def _warn_numpy_fallback() -> None:
    """Once per process; logging's last-resort handler writes it to stderr as one line."""
    logging.getLogger(__name__).warning(
        "warning: quantkit's compiled kernels (quantkit.native._kernels) are missing, so the slow numpy path runs; "
        "reinstall quantkit where a C compiler is present")


def _kernel(options: BnbOptions, name: str, reference: Callable):
    """The scheme function `name` of the chosen compute path (c, torch, cuda) or the numpy reference."""
    backend = resolve_backend(options)
    if backend == "numpy":
        return reference
    if backend == "c":
        module = native
    elif backend == "torch":
        from quantkit.methods.bnb import torch_path as module  # imports torch
    else:
        from quantkit.methods.bnb import cuda_path as module  # imports torch and bitsandbytes
    return getattr(module, name)


def nf4_kernel(options: BnbOptions):
    """(stored bits of a row chunk, dtype, blocksize, quant_type) -> (packed uint8, absmax float32)."""
    reference = lambda chunk, dtype, blocksize, quant_type: nf4.quantize_4bit(dtypes.to_float32(chunk, dtype), blocksize, quant_type)  # noqa: E731
    return _kernel(options, "quantize_4bit", reference)


def int8_kernel(options: BnbOptions):
    """(stored bits of a row chunk, dtype) -> (codes int8, SCB float32)."""
    return _kernel(options, "quantize_int8", lambda chunk, dtype: int8.quantize_int8(dtypes.to_float32(chunk, dtype)))


def dequantize_kernel(options: BnbOptions):
    """(packed, absmax, decode table, blocksize, first element, count, dtype) -> stored bits in `dtype`."""
    def reference(packed, absmax, table, blocksize, first, count, dtype):
        return dtypes.from_float32(nf4.dequantize_range(packed, absmax, table, blocksize, first, count), dtype)

    return _kernel(options, "dequantize_4bit", reference)
