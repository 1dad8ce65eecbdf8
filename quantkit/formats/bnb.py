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
import re
from collections.abc import Callable

import numpy as np

from quantkit import dtypes
from quantkit.errors import QuantkitError
from quantkit.formats.safetensors import OutputTensor, ShardReader
from quantkit.plan import (
    QuantOptions,
    TensorSink,
    WeightSource,
    head_modules,
    is_conv1d,
    is_linear_weight,
    module_of,
    register,
    register_dequantizer,
)
from quantkit.schemes import int8, native, nf4
from quantkit.source import Checkpoint

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
STORAGE_DTYPES = {"uint8": "U8", "bfloat16": "BF16", "float16": "F16", "float32": "F32"}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
QUANT_STATE_MAX = 256  # bytes reserved for the quant_state JSON; its length depends on the offset's digits
CHUNK_ELEMENTS = 1 << 22


def quant_state_key(quant_type: str) -> str:
    return f"quant_state.bitsandbytes__{quant_type}"


def quant_state_json(quant_type: str, blocksize: int, dtype: str, shape: tuple[int, ...], offset: float | None) -> bytes:
    """The non-tensor part of a 4-bit quant_state, serialised exactly as bitsandbytes packs it."""
    state: dict[str, object] = {"quant_type": quant_type, "blocksize": blocksize, "dtype": dtype, "shape": list(shape)}
    if offset is not None:
        state.update({"nested_blocksize": nf4.NESTED_BLOCKSIZE, "nested_dtype": "float32", "nested_offset": float(offset)})
    return json.dumps(state).encode()


def config_dict(options: QuantOptions, skip_modules: list[str] | None) -> dict:
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


def _rows_per_chunk(shape: tuple[int, ...], blocksize: int) -> int:
    """Rows per chunk: about CHUNK_ELEMENTS values, a whole number of quantization blocks."""
    cols = math.prod(shape[1:])
    unit = blocksize // math.gcd(cols, blocksize)
    return max(unit, (CHUNK_ELEMENTS // max(cols, 1)) // unit * unit)


class BitsAndBytes:
    """Quantizer for bitsandbytes NF4 / FP4 (4-bit) and LLM.int8."""

    methods = ("nf4", "fp4", "int8")

    def check(self, options: QuantOptions) -> None:
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
            raise QuantkitError("--backend c: quantkit's compiled kernels (quantkit._kernels) are not built",
                                "reinstall quantkit where a C compiler is present, or use --backend numpy")
        if options.device == "cuda":
            _check_cuda()
        elif options.device != "cpu":
            raise QuantkitError(f"--device {options.device}: choose cpu or cuda")

    def layout(self, module: str, shape: tuple[int, ...], source_dtype: str, options: QuantOptions) -> list[OutputTensor]:
        if options.method == "int8":
            return [OutputTensor(f"{module}.{k}", dt, s) for k, (dt, s) in int8.layout(shape).items()]
        weight = f"{module}.weight"
        outputs = [OutputTensor(weight + k, dt, s) for k, (dt, s) in nf4.layout(shape, options.blocksize, options.double_quant).items()]
        storage = STORAGE_DTYPES[options.quant_storage]
        packed_bytes = outputs[0].nbytes
        if packed_bytes % dtypes.itemsize(storage):
            raise QuantkitError(f"'{weight}': {packed_bytes} packed bytes do not fill whole {options.quant_storage} values")
        outputs[0] = OutputTensor(weight, storage, (packed_bytes // dtypes.itemsize(storage), 1))
        outputs.append(OutputTensor(f"{weight}.{quant_state_key(options.method)}", "U8", (QUANT_STATE_MAX,), variable=True))
        return outputs

    def config(self, options: QuantOptions, skipped: list[str], head: list[str]) -> dict:
        return config_dict(options, skipped)

    def quantize(self, module: str, weight: WeightSource, options: QuantOptions, sink: TensorSink) -> None:
        if options.method == "int8":
            self._quantize_int8(module, weight, options, sink)
        else:
            self._quantize_4bit(module, weight, options, sink)

    def _quantize_4bit(self, module: str, weight: WeightSource, options: QuantOptions, sink: TensorSink) -> None:
        name = f"{module}.weight"
        kernel = nf4_kernel(options)
        absmax_parts = []
        for chunk in weight.chunks(_rows_per_chunk(weight.shape, options.blocksize)):
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

    def _quantize_int8(self, module: str, weight: WeightSource, options: QuantOptions, sink: TensorSink) -> None:
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


def resolve_backend(options: QuantOptions) -> str:
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
        "warning: quantkit's compiled kernels (quantkit._kernels) are missing, so the slow numpy path runs; "
        "reinstall quantkit where a C compiler is present")


def _kernel(options: QuantOptions, name: str, reference: Callable):
    """The scheme function `name` of the chosen compute path (c, torch, cuda) or the numpy reference."""
    backend = resolve_backend(options)
    if backend == "numpy":
        return reference
    if backend == "c":
        module = native
    elif backend == "torch":
        from quantkit.schemes import torch_path as module
    else:
        from quantkit.schemes import cuda_path as module
    return getattr(module, name)


def nf4_kernel(options: QuantOptions):
    """(stored bits of a row chunk, dtype, blocksize, quant_type) -> (packed uint8, absmax float32)."""
    reference = lambda chunk, dtype, blocksize, quant_type: nf4.quantize_4bit(dtypes.to_float32(chunk, dtype), blocksize, quant_type)  # noqa: E731
    return _kernel(options, "quantize_4bit", reference)


def int8_kernel(options: QuantOptions):
    """(stored bits of a row chunk, dtype) -> (codes int8, SCB float32)."""
    return _kernel(options, "quantize_int8", lambda chunk, dtype: int8.quantize_int8(dtypes.to_float32(chunk, dtype)))


def dequantize_kernel(options: QuantOptions):
    """(packed, absmax, decode table, blocksize, first element, count, dtype) -> stored bits in `dtype`."""
    def reference(packed, absmax, table, blocksize, first, count, dtype):
        return dtypes.from_float32(nf4.dequantize_range(packed, absmax, table, blocksize, first, count), dtype)

    return _kernel(options, "dequantize_4bit", reference)


register(BitsAndBytes())


# ---------------------------------------------------------------- reading bitsandbytes checkpoints

_STATE_KEY = re.compile(r"^(.*)\.weight\.quant_state\.bitsandbytes__(nf4|fp4)$")
_FOUR_BIT_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


def read_quant_state(checkpoint: Checkpoint, key: str) -> dict:
    info = checkpoint.tensors[key]
    with ShardReader(info.file) as reader:
        raw = reader.read(info).tobytes()
    try:
        state = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise QuantkitError(f"{info.file}: tensor '{key}' does not hold quant_state JSON") from None
    shape = state.get("shape") if isinstance(state, dict) else None
    if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape) or state.get("dtype") not in dtypes.BY_NAME:
        raise QuantkitError(f"{info.file}: tensor '{key}': quant_state lacks a valid shape or dtype")
    if state.get("blocksize") not in BLOCKSIZES or state.get("quant_type") not in ("nf4", "fp4"):
        raise QuantkitError(f"{info.file}: tensor '{key}': quant_state has an invalid blocksize or quant_type")
    return state


def skip_matches(module: str, patterns: list[str]) -> bool:
    """transformers' rule: a pattern matches from the start up to a module boundary, or as a suffix."""
    for pattern in patterns:
        try:
            if re.match(rf"(?:{pattern})(?:(?<=\.)|(?=\.|$))", module) or module.endswith(pattern):
                return True
        except re.error:
            if module.endswith(pattern):
                return True
    return False


class BitsAndBytesReader:
    """Dequantizer and checker for checkpoints with quant_method "bitsandbytes"."""

    quant_method = "bitsandbytes"

    def modules(self, checkpoint: Checkpoint) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {}
        for name in checkpoint.tensors:
            match = _STATE_KEY.match(name)
            if match:
                weight = match.group(1) + ".weight"
                parts = [weight + p for p in _FOUR_BIT_PARTS if weight + p in checkpoint.tensors]
                found[match.group(1)] = [weight, *parts, name]
            elif name.endswith(".SCB"):
                module = name[: -len(".SCB")]
                parts = [n for n in (f"{module}.weight_format",) if n in checkpoint.tensors]
                found[module] = [f"{module}.weight", name, *parts]
        return found

    def scheme(self, checkpoint: Checkpoint) -> str:
        qc = checkpoint.quantization_config or {}
        return qc.get("bnb_4bit_quant_type", "fp4") if qc.get("load_in_4bit") else "int8"

    def options(self, checkpoint: Checkpoint) -> QuantOptions:
        qc = checkpoint.quantization_config or {}
        return QuantOptions(method=self.scheme(checkpoint), double_quant=bool(qc.get("bnb_4bit_use_double_quant")),
                            quant_storage=qc.get("bnb_4bit_quant_storage") or "uint8")

    def default_dtype(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> str | None:
        for names in modules.values():
            if _STATE_KEY.match(names[-1]):
                return read_quant_state(checkpoint, names[-1])["dtype"]
        return None

    def _logical_shape(self, checkpoint: Checkpoint, names: list[str]) -> tuple[int, ...]:
        if _STATE_KEY.match(names[-1]):
            return tuple(read_quant_state(checkpoint, names[-1])["shape"])
        return checkpoint.tensors[names[0]].shape

    def layout(self, checkpoint: Checkpoint, module: str, names: list[str], dtype: str) -> list[OutputTensor]:
        shape = self._logical_shape(checkpoint, names)
        if is_conv1d(checkpoint.config, module):
            shape = shape[::-1]
        return [OutputTensor(names[0], dtype, shape)]

    def dequantize(self, checkpoint: Checkpoint, module: str, names: list[str], read: Callable[[str], np.ndarray],
                   dtype: str, sink: TensorSink) -> None:
        weight = names[0]
        if is_conv1d(checkpoint.config, module):  # Conv1D weights are small: turn them around whole
            dense = self._dense_4bit(checkpoint, names, read) if _STATE_KEY.match(names[-1]) else \
                int8.dequantize_int8(read(weight), read(f"{module}.SCB"))
            sink.write(weight, dtypes.from_float32(np.ascontiguousarray(dense.T), dtype))
        elif _STATE_KEY.match(names[-1]):
            for chunk in self._chunks_4bit(checkpoint, names, read, dtype):
                sink.write(weight, chunk)
        else:
            codes, scb = read(weight), read(f"{module}.SCB")
            step = max(1, CHUNK_ELEMENTS // max(codes.shape[1], 1))
            for start in range(0, codes.shape[0], step):
                dense = int8.dequantize_int8(codes[start : start + step], scb[start : start + step])
                sink.write(weight, dtypes.from_float32(dense, dtype))
        sink.done(weight)

    def _absmax(self, state: dict, weight: str, read: Callable[[str], np.ndarray]) -> np.ndarray:
        absmax = read(weight + ".absmax")
        if "nested_offset" not in state:
            return absmax
        return nf4.dequantize_absmax(absmax, read(weight + ".nested_absmax"), read(weight + ".nested_quant_map"),
                                     state["nested_offset"], state.get("nested_blocksize", nf4.NESTED_BLOCKSIZE))

    def _chunks_4bit(self, checkpoint: Checkpoint, names: list[str], read: Callable[[str], np.ndarray], dtype: str):
        """Dense rows of a 4-bit weight, a chunk at a time, in `dtype`'s stored bits."""
        state = read_quant_state(checkpoint, names[-1])
        shape, blocksize = tuple(state["shape"]), state["blocksize"]
        absmax, packed = self._absmax(state, names[0], read), read(names[0])
        table = nf4.decode_table(state["quant_type"], shape)
        kernel = dequantize_kernel(QuantOptions(method=state["quant_type"]))
        cols = math.prod(shape[1:])
        rows = _rows_per_chunk(shape, blocksize)
        for start in range(0, shape[0], rows):
            count = (min(shape[0], start + rows) - start) * cols
            yield kernel(packed, absmax, table, blocksize, start * cols, count, dtype)

    def _dense_4bit(self, checkpoint: Checkpoint, names: list[str], read: Callable[[str], np.ndarray]) -> np.ndarray:
        state = read_quant_state(checkpoint, names[-1])
        absmax = self._absmax(state, names[0], read)
        return nf4.dequantize_4bit(read(names[0]), absmax, tuple(state["shape"]), state["blocksize"], state["quant_type"])

    def check(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> list[str]:
        qc = checkpoint.quantization_config or {}
        problems: list[str] = []
        four_bit = bool(qc.get("load_in_4bit"))
        for module, names in modules.items():
            stored_4bit = bool(_STATE_KEY.match(names[-1]))
            problems += self._check_4bit(checkpoint, module, names, qc) if stored_4bit else self._check_int8(checkpoint, module)
            if four_bit != stored_4bit:
                problems.append(f"'{module}': stored as {'4-bit' if stored_4bit else 'int8'} but config says {'4-bit' if four_bit else 'int8'}")
        skip = qc.get("llm_int8_skip_modules") or head_modules(checkpoint)
        for module in modules:
            if skip_matches(module, skip):
                problems.append(f"'{module}' is quantized but llm_int8_skip_modules lists it")
        for name, info in checkpoint.tensors.items():
            module = module_of(name)
            if is_linear_weight(name, info) and module not in modules and not skip_matches(module, skip):
                problems.append(f"'{module}' should be quantized (not in llm_int8_skip_modules) but is dense")
        return problems

    def _check_4bit(self, checkpoint: Checkpoint, module: str, names: list[str], qc: dict) -> list[str]:
        weight = f"{module}.weight"
        try:
            state = read_quant_state(checkpoint, names[-1])
        except QuantkitError as e:
            return [e.message]
        nested = "nested_offset" in state
        required = [".absmax", ".quant_map"] + ([".nested_absmax", ".nested_quant_map"] if nested else [])
        missing = [weight + r for r in required if weight + r not in checkpoint.tensors]
        if missing:
            return [f"'{module}': missing companion tensor(s) {', '.join(missing)}"]
        problems = []
        if not nested and any(weight + p in checkpoint.tensors for p in (".nested_absmax", ".nested_quant_map")):
            problems.append(f"'{module}': nested_* tensors present but the quant_state has no nested_offset")
        expected = nf4.layout(tuple(state["shape"]), state["blocksize"], nested)
        packed = checkpoint.tensors[weight]
        if packed.nbytes != math.prod(expected[""][1]):
            problems.append(f"'{weight}': {packed.nbytes} packed bytes, quant_state shape {state['shape']} needs {math.prod(expected[''][1])}")
        for suffix, (dtype, shape) in expected.items():
            info = checkpoint.tensors[weight + suffix]
            if suffix and (info.dtype, info.shape) != (dtype, shape):
                problems.append(f"'{weight + suffix}': {info.dtype}{list(info.shape)}, expected {dtype}{list(shape)}")
        if state["quant_type"] != qc.get("bnb_4bit_quant_type", "fp4"):
            problems.append(f"'{module}': quant_type {state['quant_type']} but config says {qc.get('bnb_4bit_quant_type')}")
        if nested != bool(qc.get("bnb_4bit_use_double_quant")):
            problems.append(f"'{module}': double quantization {'present' if nested else 'absent'} but config says otherwise")
        return problems

    def _check_int8(self, checkpoint: Checkpoint, module: str) -> list[str]:
        weight, scb = checkpoint.tensors.get(f"{module}.weight"), checkpoint.tensors[f"{module}.SCB"]
        if weight is None:
            return [f"'{module}': SCB without an int8 weight"]
        problems = []
        if weight.dtype != "I8" or len(weight.shape) != 2:
            problems.append(f"'{module}.weight': {weight.dtype}{list(weight.shape)}, expected a 2-D I8 tensor")
        elif (scb.dtype, scb.shape) != ("F32", weight.shape[:1]):
            problems.append(f"'{module}.SCB': {scb.dtype}{list(scb.shape)}, expected F32[{weight.shape[0]}]")
        if f"{module}.weight_format" not in checkpoint.tensors:
            problems.append(f"'{module}': missing companion tensor {module}.weight_format")
        return problems


register_dequantizer(BitsAndBytesReader())
