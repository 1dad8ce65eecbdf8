"""Reading compressed-tensors checkpoints back (quant_method "compressed-tensors"): which modules are
quantized and by which config group, their dense values a row chunk at a time (formats.py), and verify's
checks of the companions against the config."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np

from quantkit import dtypes, native
from quantkit.api import IntegerBlocks, TensorSink
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import OutputTensor, ShardReader
from quantkit.io.source import Checkpoint
from quantkit.methods.ct import formats, schemes
from quantkit.methods.ct import native as ct_native
from quantkit.methods.ct.integers import from_packed
from quantkit.methods.ct.quantizer import CtOptions
from quantkit.modules import head_modules, is_linear_weight, module_of
from quantkit.numerics import CHUNK_ELEMENTS

MAIN = ("weight_packed", "weight")  # the stored weight of a quantized module, by format
COMPANIONS = ("weight_scale", "weight_zero_point", "weight_global_scale", "weight_shape")
# Relative weight error (||W - W'|| / ||W||) above which verify fails a layer, per scheme.
ERROR_BOUND = {"fp8": 0.05, "fp8-block": 0.05, "w8a16": 0.01, "w4a16": 0.15, "w4a16-asym": 0.12, "nvfp4a16": 0.2,
               "mxfp4a16": 0.3}  # fmt: skip
DEFAULT_BOUND = 0.3


def read_tensor(checkpoint: Checkpoint, name: str) -> np.ndarray:
    info = checkpoint.tensors[name]
    with ShardReader(info.file) as reader:
        return reader.read(info)


def ignored(module: str, ignore: list[str]) -> bool:
    """compressed-tensors' rule: an entry names the module exactly, or is `re:` and a regex matched from the start."""
    return any(re.match(entry[3:], module) if entry.startswith("re:") else entry == module for entry in ignore)


def group_of(qc: dict, module: str) -> tuple[str, dict]:
    """(format, config group) that quantized `module`: a group naming it (exactly or by `re:`) wins over
    one targeting the Linear type."""
    groups = qc.get("config_groups")
    if not isinstance(groups, dict) or not groups:
        raise QuantkitError("config.json: compressed-tensors quantization_config has no config_groups")
    by_type = None
    for group in groups.values():
        targets = group.get("targets") or [] if isinstance(group, dict) else []
        if any(t != "Linear" and ignored(module, [t]) for t in targets):
            by_type = group
            break
        if "Linear" in targets and by_type is None:
            by_type = group
    if by_type is None or not isinstance(by_type.get("weights"), dict):
        raise QuantkitError(f"config.json: no config group with weights targets '{module}'")
    fmt = by_type.get("format") or qc.get("format")
    if fmt not in formats.FORMATS:
        raise QuantkitError(f"config.json: compressed-tensors format {fmt!r} is not supported",
                            f"quantkit reads {', '.join(formats.FORMATS)}")
    return fmt, by_type


def scheme_of(fmt: str, weights: dict) -> schemes.Scheme | None:
    """The preset a config group is (compared on what shapes the data), if it is one of ours."""
    keys = ("num_bits", "type", "strategy", "symmetric", "block_structure")
    for scheme in schemes.SCHEMES.values():
        same_group = scheme.method in schemes.INT_METHODS or weights.get("group_size") == scheme.weights["group_size"]
        if scheme.format == fmt and same_group and all(weights.get(k) == scheme.weights[k] for k in keys):
            return scheme
    return None


class CompressedTensorsReader:
    """Dequantizer and checker for checkpoints with quant_method "compressed-tensors"."""

    quant_method = "compressed-tensors"

    def modules(self, checkpoint: Checkpoint) -> dict[str, list[str]]:
        found = {}
        for name in checkpoint.tensors:
            module, _, part = name.rpartition(".")
            if part == "weight_scale":
                main = next((f"{module}.{m}" for m in MAIN if f"{module}.{m}" in checkpoint.tensors), None)
                if main is None:
                    raise QuantkitError(f"{checkpoint.tensors[name].file}: '{name}' has no weight or weight_packed beside it")
                found[module] = [main, *(f"{module}.{c}" for c in COMPANIONS if f"{module}.{c}" in checkpoint.tensors)]
        return found

    def _group(self, checkpoint: Checkpoint, module: str) -> tuple[str, dict]:
        return group_of(checkpoint.quantization_config or {}, module)

    def scheme(self, checkpoint: Checkpoint) -> str:
        return self.options(checkpoint).method

    def options(self, checkpoint: Checkpoint) -> CtOptions:
        groups = (checkpoint.quantization_config or {}).get("config_groups") or {}
        group = next(iter(groups.values()), {}) if len(groups) == 1 else {}
        fmt = group.get("format") or (checkpoint.quantization_config or {}).get("format")
        scheme = scheme_of(fmt, group.get("weights") or {})
        if scheme is None:
            return CtOptions(method=f"compressed-tensors {fmt}")
        size = group["weights"].get("group_size") if scheme.method in schemes.INT_METHODS else None
        return CtOptions(method=scheme.method, group_size=size)

    def error_bound(self, scheme: str) -> float:
        return ERROR_BOUND.get(scheme, DEFAULT_BOUND)

    def describe(self, qc: dict) -> dict:
        groups = qc.get("config_groups") if isinstance(qc.get("config_groups"), dict) else {}
        weights = [g.get("weights") or {} for g in groups.values() if isinstance(g, dict)]
        return {"method": "compressed-tensors", "format": qc.get("format"), "config_groups": sorted(groups),
                "weights": [{k: w.get(k) for k in ("num_bits", "type", "strategy", "group_size", "block_structure", "symmetric")
                             if w.get(k) is not None} for w in weights],
                "ignore": qc.get("ignore") or [], "version": qc.get("version")}  # fmt: skip

    def default_dtype(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> str | None:
        """What the library decompresses to: bfloat16 for the fp4 formats, else the scale's dtype."""
        for module in modules:
            fmt, _ = self._group(checkpoint, module)
            if fmt in formats.FP4_FORMATS:
                return "bfloat16"
            scale = checkpoint.tensors[f"{module}.weight_scale"].dtype
            if scale in dtypes.FLOATS:
                return dtypes.NAME_OF[scale]
        return None

    def _shape(self, checkpoint: Checkpoint, module: str, names: list[str],
               read: Callable[[str], np.ndarray] | None = None) -> tuple[int, int]:
        """The dense [out, in]; `read` reads weight_shape where given (a written module read back from memory)."""
        main = checkpoint.tensors[names[0]]
        if names[0].endswith(".weight"):
            return main.shape
        if f"{module}.weight_shape" in checkpoint.tensors:
            shape = (read or (lambda name: read_tensor(checkpoint, name)))(f"{module}.weight_shape").reshape(-1)
            if shape.size != 2 or (shape <= 0).any():
                raise QuantkitError(f"{main.file}: '{module}.weight_shape' does not hold a 2-D shape")
            return int(shape[0]), int(shape[1])
        if self._group(checkpoint, module)[0] not in formats.FP4_FORMATS:
            raise QuantkitError(f"{main.file}: '{module}': missing companion tensor {module}.weight_shape")
        return main.shape[0], main.shape[1] * 2  # fp4: two values per byte

    def layout(self, checkpoint: Checkpoint, module: str, names: list[str], dtype: str) -> list[OutputTensor]:
        return [OutputTensor(f"{module}.weight", dtype, self._shape(checkpoint, module, names))]

    def dequantize(self, checkpoint: Checkpoint, module: str, names: list[str], read: Callable[[str], np.ndarray],
                   dtype: str, sink: TensorSink) -> None:
        fmt, group = self._group(checkpoint, module)
        args = group["weights"]
        rows, cols = self._shape(checkpoint, module, names, read)
        stored = {name.rpartition(".")[2]: read(name) for name in names}
        kinds = {name.rpartition(".")[2]: checkpoint.tensors[name].dtype for name in names}
        stored.pop("weight_shape", None)
        zero = stored.pop("weight_zero_point", None)
        if zero is not None and not args.get("symmetric", True):
            stored["zero"] = formats.unpack_zero_points(zero, args["num_bits"], rows) if fmt == "pack-quantized" \
                else dtypes.to_float32(zero, kinds["weight_zero_point"]) if kinds["weight_zero_point"] in dtypes.FLOATS \
                else zero.astype(np.float32)  # fmt: skip
        unit = args["block_structure"][0] if args.get("strategy") == "block" else 1
        step = max(unit, CHUNK_ELEMENTS // max(cols, 1) // unit * unit)
        scale_dtype = kinds["weight_scale"]
        main = stored["weight_packed" if "weight_packed" in stored else "weight"]
        fast = self._native_decoder(fmt, kinds, args, "zero" in stored, main.shape, rows, cols)
        if fast is not None and dtype in native.DENSE and (scale_dtype in native.DENSE or fmt in formats.FP4_FORMATS):
            try:
                grid, block = formats.scale_grid(stored["weight_scale"], rows, cols, args)
                zeros = formats.scale_grid(stored["zero"], rows, cols, args, "weight_zero_point")[0] if "zero" in stored else None
            except QuantkitError as e:
                raise QuantkitError(f"{checkpoint.tensors[names[0]].file}: '{module}': {e.message}") from None
            by_row = block[0] == 1  # a scale row per weight row: converted a chunk at a time
            round_dtype = "BF16" if fmt in formats.FP4_FORMATS else scale_dtype
            for start in range(0, rows, step):
                rows_of = slice(start, start + step) if by_row else slice(None)
                scales = formats.scale_values(fmt, grid[rows_of], stored, kinds)
                chunk_zeros = None if zeros is None else zeros[rows_of].astype(np.float32)
                sink.write(f"{module}.weight", fast(main[start : start + step], cols, scales, chunk_zeros, block,
                                                    0 if by_row else start, round_dtype, dtype))  # fmt: skip
            sink.done(f"{module}.weight")
            return
        per_row = [k for k, v in stored.items() if v.ndim == 2 and v.shape[0] == rows and args.get("strategy") != "block"]
        main_name = "weight_packed" if "weight_packed" in stored else "weight"
        for start in range(0, rows, step):
            parts = {k: v[start : start + step] if k in per_row or k == main_name else v for k, v in stored.items()}
            values = formats.decode(fmt, parts, kinds, args, cols, start)
            sink.write(f"{module}.weight", dtypes.from_float32(values, dtype))
        sink.done(f"{module}.weight")

    @staticmethod
    def _native_decoder(fmt: str, kinds: dict[str, str], args: dict, asymmetric: bool, shape: tuple[int, ...],
                        rows: int, cols: int) -> Callable | None:
        """The C kernel decoding this module's codes (`shape` as stored, [rows, cols] dense) with its scales'
        grid (native.fp8_dense for FP8 codes, ct.native.int_dense for 4- or 8-bit packed words, int8 codes and fp4
        bytes), or None: the numpy reference (which also meets codes of an unexpected shape)."""
        if kinds.get("weight") == "F8_E4M3" and not asymmetric and native.DENSE_KERNELS:
            return lambda codes, cols, grid, zeros, block, start, scale_dtype, dtype: native.fp8_dense(
                codes, grid, block, start, scale_dtype, dtype)
        if not ct_native.DENSE_AVAILABLE:
            return None
        e2m1 = fmt in formats.FP4_FORMATS
        if e2m1 and kinds.get("weight_packed") == "U8" and cols % 8 == 0 and tuple(shape) == (rows, cols // 2):
            bits = 4  # the bytes read as little-endian int32 words: nibbles in the same order
        elif fmt == "pack-quantized" and kinds.get("weight_packed") == "I32" and args.get("num_bits") in (4, 8):
            bits = args["num_bits"]
        elif fmt in ("int-quantized", "naive-quantized") and kinds.get("weight") == "I8":
            bits = 0
        else:
            return None
        if not e2m1 and tuple(shape) != (rows, -(-cols * bits // 32) if bits else cols):
            return None
        return lambda codes, cols, grid, zeros, block, start, scale_dtype, dtype: ct_native.int_dense(
            codes.view(np.uint32) if e2m1 else codes, bits, cols, grid, zeros, block, start, scale_dtype, dtype, e2m1)

    def integers(self, checkpoint: Checkpoint, module: str, names: list[str],
                 read: Callable[[str], np.ndarray]) -> IntegerBlocks | None:
        """A pack-quantized integer module by groups or channels (no act-order g_idx) as IntegerBlocks, when
        its values are exactly q * d with a float16 d (ct/integers.py), else None."""
        fmt, group = self._group(checkpoint, module)
        args = group["weights"]
        if fmt != "pack-quantized" or args.get("type") != "int" or args.get("strategy") not in ("group", "channel") \
                or f"{module}.weight_g_idx" in checkpoint.tensors:  # fmt: skip
            return None
        rows, cols = self._shape(checkpoint, module, names, read)
        size = args.get("group_size") if args.get("strategy") == "group" else cols
        bits = args["num_bits"]
        if not isinstance(size, int) or size <= 0 or cols % size or bits not in (4, 8):
            return None
        zero = None
        if not args.get("symmetric", True):
            zero = formats.unpack_zero_points(read(f"{module}.weight_zero_point"), bits, rows)
        scale = checkpoint.tensors[f"{module}.weight_scale"]
        return from_packed(read(f"{module}.weight_packed"), read(scale.name).reshape(rows, -1), scale.dtype, zero,
                           bits, size, cols)

    def check(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> list[str]:
        qc = checkpoint.quantization_config or {}
        problems = []
        for module, names in modules.items():
            try:
                fmt, group = self._group(checkpoint, module)
                shape = self._shape(checkpoint, module, names)
            except QuantkitError as e:
                problems.append(e.message)
                continue
            problems += self._check_module(checkpoint, module, fmt, group["weights"], shape)
        ignore = qc.get("ignore") or []
        heads = head_modules(checkpoint)
        for module in modules:
            if ignored(module, ignore):
                problems.append(f"'{module}' is quantized but the config's ignore list names it")
        for name, info in checkpoint.tensors.items():
            module = module_of(name)
            if is_linear_weight(name, info) and module not in modules and module not in heads and not ignored(module, ignore):
                problems.append(f"'{module}' is dense but not in the config's ignore list (loaders expect it quantized)")
        return problems

    def _check_module(self, checkpoint: Checkpoint, module: str, fmt: str, args: dict, shape: tuple[int, int]) -> list[str]:
        scheme = scheme_of(fmt, args)
        if scheme is None:
            return []  # a format we read but do not write: its decoder checks what it uses
        group_size = args.get("group_size") or scheme.group_size
        if schemes.unfit(scheme, shape, group_size):
            return [f"'{module}': {shape[1]} input features do not fit {scheme.name} ({schemes.unfit(scheme, shape, group_size)})"]
        problems = []
        for suffix, dtype, expected in schemes.layout(scheme, shape, checkpoint.tensors[f"{module}.weight_scale"].dtype, group_size):
            info = checkpoint.tensors.get(f"{module}.{suffix}")
            if info is None:
                problems.append(f"'{module}': missing companion tensor {module}.{suffix}")
            elif info.shape != expected or (info.dtype != dtype and suffix != "weight_scale"):
                problems.append(f"'{module}.{suffix}': {info.dtype}{list(info.shape)}, expected {dtype}{list(expected)}")
        if math.prod(shape) == 0:
            problems.append(f"'{module}': empty weight")
        return problems
