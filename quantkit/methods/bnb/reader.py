"""Reading bitsandbytes checkpoints back: the modules, their dense values (chunked, through the compiled
dequantization kernel), and verify's checks of companions, quant_state and the skip list."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable

import numpy as np

from quantkit import dtypes
from quantkit.api import TensorSink, read_floats
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import OutputTensor, ShardReader
from quantkit.io.source import Checkpoint
from quantkit.methods.bnb import int8, nf4
from quantkit.methods.bnb.quantizer import BLOCKSIZES, BnbOptions, dequantize_kernel, rows_per_chunk
from quantkit.modules import head_modules, is_conv1d, is_linear_weight, module_of
from quantkit.numerics import CHUNK_ELEMENTS

# Relative weight error (||W - W'|| / ||W||) above which a layer fails, per scheme.
ERROR_BOUND = {"nf4": 0.2, "fp4": 0.3, "int8": 0.05}


_STATE_KEY = re.compile(r"^(.*)\.weight\.quant_state\.bitsandbytes__(nf4|fp4)$")
_FOUR_BIT_PARTS = (".absmax", ".quant_map", ".nested_absmax", ".nested_quant_map")


def read_quant_state(checkpoint: Checkpoint, key: str) -> dict:
    info = checkpoint.tensors[key]
    with ShardReader(info.file) as reader:
        return parse_quant_state(reader.read(info), f"{info.file}: tensor '{key}'")


def parse_quant_state(raw: np.ndarray, where: str) -> dict:
    """A quant_state tensor's JSON, validated (`where` names the file and tensor in errors)."""
    try:
        state = json.loads(raw.tobytes())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise QuantkitError(f"{where} does not hold quant_state JSON") from None
    shape = state.get("shape") if isinstance(state, dict) else None
    if not isinstance(shape, list) or not all(isinstance(d, int) and d > 0 for d in shape) or state.get("dtype") not in dtypes.BY_NAME:
        raise QuantkitError(f"{where}: quant_state lacks a valid shape or dtype")
    if state.get("blocksize") not in BLOCKSIZES or state.get("quant_type") not in ("nf4", "fp4"):
        raise QuantkitError(f"{where}: quant_state has an invalid blocksize or quant_type")
    if "nested_offset" in state:  # double quantization: the offset added back and the nested block size
        offset, nested = state["nested_offset"], state.setdefault("nested_blocksize", nf4.NESTED_BLOCKSIZE)
        if not _number(offset) or not math.isfinite(offset):
            raise QuantkitError(f"{where}: quant_state nested_offset {offset!r} is not a finite number")
        if not _number(nested) or isinstance(nested, float) or nested not in BLOCKSIZES:
            raise QuantkitError(f"{where}: quant_state nested_blocksize {nested!r} is not one of "
                                f"{', '.join(map(str, BLOCKSIZES))}")
    return state


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def weight_format_problem(checkpoint: Checkpoint, module: str, read: Callable[[str], np.ndarray] | None = None) -> str | None:
    """An int8 module's `weight_format` must be the U8 scalar 0 (row-major), all bitsandbytes writes or reads.
    `read` reads it where given (a module just written, read back from memory)."""
    info = checkpoint.tensors[f"{module}.weight_format"]
    if info.dtype != "U8" or info.numel != 1:
        return f"'{info.name}': {info.dtype}{list(info.shape)}, expected a U8 scalar"
    if read is None:
        with ShardReader(info.file) as reader:
            value = int(reader.read(info).reshape(-1)[0])
    else:
        value = int(read(info.name).reshape(-1)[0])
    return None if value == 0 else f"'{info.name}' is {value}; only 0 (row-major) is a bitsandbytes weight format"


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

    def options(self, checkpoint: Checkpoint) -> BnbOptions:
        qc = checkpoint.quantization_config or {}
        return BnbOptions(method=self.scheme(checkpoint), double_quant=bool(qc.get("bnb_4bit_use_double_quant")),
                            quant_storage=qc.get("bnb_4bit_quant_storage") or "uint8")

    def describe(self, qc: dict) -> dict:
        if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
            return {"method": qc.get("bnb_4bit_quant_type", "fp4"), "double_quant": qc.get("bnb_4bit_use_double_quant", False),
                    "compute_dtype": qc.get("bnb_4bit_compute_dtype"), "quant_storage": qc.get("bnb_4bit_quant_storage", "uint8")}  # fmt: skip
        return {"method": "int8", "threshold": qc.get("llm_int8_threshold")}

    def error_bound(self, scheme: str) -> float:
        return ERROR_BOUND[scheme]

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
                int8.dequantize_int8(read(weight), read_floats(checkpoint, read, f"{module}.SCB"))
            sink.write(weight, dtypes.from_float32(np.ascontiguousarray(dense.T), dtype))
        elif _STATE_KEY.match(names[-1]):
            for chunk in self._chunks_4bit(checkpoint, names, read, dtype):
                sink.write(weight, chunk)
        else:
            problem = weight_format_problem(checkpoint, module, read) if f"{module}.weight_format" in names else None
            if problem:
                raise QuantkitError(f"{checkpoint.tensors[weight].file}: {problem}")
            codes, scb = read(weight), read_floats(checkpoint, read, f"{module}.SCB")
            step = max(1, CHUNK_ELEMENTS // max(codes.shape[1], 1))
            for start in range(0, codes.shape[0], step):
                dense = int8.dequantize_int8(codes[start : start + step], scb[start : start + step])
                sink.write(weight, dtypes.from_float32(dense, dtype))
        sink.done(weight)

    def _absmax(self, checkpoint: Checkpoint, state: dict, weight: str, read: Callable[[str], np.ndarray]) -> np.ndarray:
        if "nested_offset" not in state:
            return read_floats(checkpoint, read, weight + ".absmax")
        codes, nested = checkpoint.tensors[weight + ".absmax"], state["nested_blocksize"]
        nested_absmax = read_floats(checkpoint, read, weight + ".nested_absmax")
        code = read_floats(checkpoint, read, weight + ".nested_quant_map")
        if codes.dtype != "U8" or nested_absmax.size != -(-codes.numel // nested) or code.size != 256:
            raise QuantkitError(f"{codes.file}: tensor '{weight}': double-quantized absmax {codes.dtype}{list(codes.shape)}, "
                                f"nested_absmax {list(nested_absmax.shape)} and nested_quant_map {list(code.shape)} do not fit "
                                f"nested_blocksize {nested}")
        return nf4.dequantize_absmax(read(weight + ".absmax"), nested_absmax, code, state["nested_offset"], nested)

    def _chunks_4bit(self, checkpoint: Checkpoint, names: list[str], read: Callable[[str], np.ndarray], dtype: str):
        """Dense rows of a 4-bit weight, a chunk at a time, in `dtype`'s stored bits."""
        state = parse_quant_state(read(names[-1]), f"tensor '{names[-1]}'")
        shape, blocksize = tuple(state["shape"]), state["blocksize"]
        absmax, packed = self._absmax(checkpoint, state, names[0], read), read(names[0])
        table = nf4.decode_table(state["quant_type"], shape)
        kernel = dequantize_kernel(BnbOptions(method=state["quant_type"]))
        cols = math.prod(shape[1:])
        rows = rows_per_chunk(shape, blocksize)
        for start in range(0, shape[0], rows):
            count = (min(shape[0], start + rows) - start) * cols
            yield kernel(packed, absmax, table, blocksize, start * cols, count, dtype)

    def _dense_4bit(self, checkpoint: Checkpoint, names: list[str], read: Callable[[str], np.ndarray]) -> np.ndarray:
        state = parse_quant_state(read(names[-1]), f"tensor '{names[-1]}'")
        absmax = self._absmax(checkpoint, state, names[0], read)
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
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            return [*problems, f"llm_int8_skip_modules {skip!r} is not a list of module names"]
        for module in modules:
            if skip_matches(module, skip):
                problems.append(f"'{module}' is quantized but llm_int8_skip_modules lists it")
        for name, info in checkpoint.tensors.items():
            module = module_of(name)
            if is_linear_weight(name, info) and module not in modules and not skip_matches(module, skip):
                problems.append(f"'{module}' should be quantized (not in llm_int8_skip_modules) but is dense")
        return problems

    def fix(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> list[str]:
        return []  # nothing check finds here can be repaired from metadata alone

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
        expected = nf4.layout(tuple(state["shape"]), state["blocksize"], nested, state.get("nested_blocksize", nf4.NESTED_BLOCKSIZE))
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
        else:
            problems += filter(None, [weight_format_problem(checkpoint, module)])
        return problems
