"""The meta skeleton: every input tensor's fate and every output tensor, before any weight is read.

Which tensors are quantized follows transformers' quantizer integrations, from names, shapes and
config.json alone (quantkit.modules): every linear weight (GPT-2's Conv1D too) except the output head,
modules tied to the input embeddings and modules the user skips. The method comes from the registry;
its options are validated here, whether they come from flags or a recipe.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

from quantkit import api, methods
from quantkit.dtypes import BY_NAME as NAME_TO_DTYPE
from quantkit.dtypes import FLOATS, NAME_OF
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import OutputTensor
from quantkit.io.source import Checkpoint
from quantkit.io.stream import Entry
from quantkit.modules import HEAD_LEAVES, NON_PERSISTENT, head_modules, is_conv1d, is_linear_weight, leaf, matches, module_of


def quantizer_for(method: str) -> api.Quantizer:
    methods.load()
    return api.quantizer_for(method)


def dequantizer_for(checkpoint: Checkpoint) -> api.Dequantizer:
    methods.load()
    return api.dequantizer_for(checkpoint)


@dataclass
class Plan:
    method: str
    options: api.Options
    entries: list[Entry]
    quantization_config: dict
    skipped_modules: list[str] = field(default_factory=list)
    unmatched_skips: list[str] = field(default_factory=list)  # --skip globs that matched no linear module
    unfit_modules: dict[str, str] = field(default_factory=dict)  # module -> why the method cannot hold it (kept dense)

    @property
    def outputs(self) -> list[OutputTensor]:
        return [o for e in self.entries for o in e.outputs]

    @property
    def output_bytes(self) -> int:
        return sum(o.nbytes for o in self.outputs)

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for e in self.entries:
            counts[e.fate] = counts.get(e.fate, 0) + 1
        return counts


# ---------------------------------------------------------------- recipes


def load_recipe(path: Path) -> dict:
    """A TOML recipe: method, scheme settings and skip globs; flags given on the command line win.
    Keys and value types are checked against the method's options in `merge_options`."""
    try:
        recipe = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise QuantkitError(f"{path}: cannot read recipe ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise QuantkitError(f"{path}: not valid TOML ({e})") from None
    recipe.pop("description", None)
    return recipe


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int, what: str = "--max-shard-size") -> int:
    """A size such as 5GB, 500MB or 2GiB (or a number of bytes) in bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 1:
            raise QuantkitError(f"{what} {text!r}: must be positive")
        return text
    match = _SIZE.match(text)
    if not match:
        raise QuantkitError(f"{what} {text!r}: not a size", "write it like 5GB, 500MB or 2GiB")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()]
    if value < 1:
        raise QuantkitError(f"{what} {text!r}: must be positive")
    return int(value)


_EXPECTED = {bool: "true or false", int: "a whole number", float: "a number", str: "a string", tuple: "a list of strings"}


def _typed(key: str, value: object, kind: type, where: str) -> object:
    """`value` if it has the option's type (TOML has booleans and integers: nothing else is accepted)."""
    if kind is tuple:
        if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            return tuple(value)
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif key == "max_shard_size" and isinstance(value, str):  # a size like "500MB", as on the command line
        return parse_size(value, f"{where}: {key} =")
    elif isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        if key == "max_shard_size" and value < 1:
            raise QuantkitError(f"{where}: {key} = {value!r}: must be positive")
        return value
    raise QuantkitError(f"{where}: {key} = {value!r}: expected {_EXPECTED.get(kind, kind.__name__)}")


def merge_options(recipe: dict, flags: dict, recipe_path: Path | None = None) -> api.Options:
    """defaults < recipe < flags (flags left at None do not override), as the method's options class.
    A setting the method does not have is refused, naming where it came from."""
    given = {k: v for k, v in flags.items() if v is not None}
    method = given.get("method", recipe.get("method"))
    if method is None:
        raise QuantkitError("no quantization method given", "pass --method or a --recipe that sets one")
    if not isinstance(method, str):
        raise QuantkitError(f"{recipe_path}: method = {method!r}: expected a string")
    quantizer = quantizer_for(method)
    fields = api.option_fields(quantizer.options)
    values = {}
    for source, settings in ((str(recipe_path), recipe), (None, given)):
        for key, value in settings.items():
            if key not in fields:
                what = f"{source}: {key}" if source else f"--{key.replace('_', '-')}"
                known = any(key in api.option_fields(q.options) for q in api.QUANTIZERS.values())
                raise QuantkitError(f"{what} does not apply to method {method}" if known else f"{what}: unknown setting",
                                    f"{method} takes {', '.join(sorted(f for f in fields if f != 'method'))}")
            values[key] = _typed(key, value, fields[key], source) if source else value
    return quantizer.options(**values)


def make_plan(checkpoint: Checkpoint, options: api.Options, skip_source: str = "--skip", refusals: bool = False) -> Plan:
    """Every tensor's fate, with its reason, and output spec for quantizing `checkpoint` with `options`.
    Reads no data. A weight the method cannot hold (a width that does not fit its groups) is refused,
    naming the tensor; with `refusals` such weights stay in the plan as fate "refuse" (for --dry-run)."""
    if checkpoint.quantization_config is not None:
        method = checkpoint.quantization_config.get("quant_method", "unknown")
        raise QuantkitError(
            f"{checkpoint.root / 'config.json'}: the checkpoint is already quantized ({method})",
            "dequantize it first: quantkit dequantize SRC OUT",
        )
    quantizer = quantizer_for(options.method)
    quantizer.check(options)
    heads = head_modules(checkpoint)
    entries: list[Entry] = []
    skipped: set[str] = set()
    unfit: dict[str, str] = {}
    for name, info in checkpoint.tensors.items():
        module = module_of(name)
        if name.endswith(NON_PERSISTENT):
            entries.append(Entry(name, "drop", module, reason="non-persistent buffer; transformers does not save it"))
            continue
        kept = (OutputTensor(name, info.dtype, info.shape),)
        if not is_linear_weight(name, info):
            entries.append(Entry(name, "keep", module, kept, reason=_why_not_linear(name, info)))
        elif module in heads:
            why = "output head" if leaf(module) in HEAD_LEAVES else "tied to the input embeddings"
            entries.append(Entry(name, "keep", module, kept, reason=f"{why}; transformers keeps it dense"))
        elif matches(module, options.skip):
            skipped.add(module)
            glob = next(g for g in options.skip if matches(module, (g,)))
            entries.append(Entry(name, "keep", module, kept, reason=f"skipped: matches {glob!r} from {skip_source}"))
        else:
            transposed = is_conv1d(checkpoint.config, module)
            shape = info.shape[::-1] if transposed else info.shape
            if math.prod(shape) == 0:
                raise QuantkitError(f"{info.file}: tensor '{name}' is empty and cannot be quantized")
            try:
                outputs = tuple(quantizer.layout(module, shape, info.dtype, options))
            except api.Unfit as e:
                unfit[module] = str(e)
                entries.append(Entry(name, "keep", module, kept, reason=f"kept dense: {e}"))
                continue
            except QuantkitError as e:
                if not refusals:
                    raise
                entries.append(Entry(name, "refuse", module, kept, reason=e.message + (f" ({e.hint})" if e.hint else "")))
                continue
            reason = f"linear weight {shape[0]}x{shape[1]}" + (" (GPT-2 Conv1D, transposed)" if transposed else "")
            entries.append(Entry(name, "quantize", module, outputs, transposed, reason=reason))
    if not any(e.fate == "quantize" for e in entries):
        raise QuantkitError(f"{checkpoint.root}: no linear weights to quantize", "check --skip and the model's tensors")
    # transformers writes null when nothing is skipped; a user-given list replaces the default, so it
    # must name the head too.
    # Modules the method cannot hold are kept as if skipped.
    skipped_list = sorted(skipped | set(unfit) | set(heads)) if skipped or unfit else []
    config = quantizer.config(options, skipped_list, heads)
    unmatched = [g for g in options.skip if not any(matches(m, (g,)) for m in skipped)]
    return Plan(options.method, options, entries, config, sorted(skipped), unmatched, unfit)


def _why_not_linear(name: str, info) -> str:
    if info.dtype not in FLOATS:
        return f"not a float tensor ({info.dtype})"
    if len(info.shape) == 2 and name.endswith(".weight"):
        return "embedding"
    if name.endswith(".bias"):
        return "bias"
    return f"not a linear weight ({len(info.shape)}-D)"


def plan_warnings(plan: Plan, skip_source: str = "--skip") -> list[str]:
    """Modules the method cannot hold (kept dense), in one warning; globs given with --skip that matched
    nothing, one warning each. A recipe names modules of several families, so its globs warn only when
    none of them matched (then the recipe does not fit the model)."""
    warnings = []
    if plan.unfit_modules:
        reasons = "; ".join(sorted(set(plan.unfit_modules.values())))
        warnings.append(f"warning: {len(plan.unfit_modules)} module(s) kept dense, {plan.method} cannot hold them "
                        f"({reasons}): {', '.join(sorted(plan.unfit_modules))}")
    if not plan.unmatched_skips:
        return warnings
    if skip_source == "--skip":
        return warnings + [f"warning: --skip {glob!r} matched no linear module" for glob in plan.unmatched_skips]
    if len(plan.unmatched_skips) < len(plan.options.skip):
        return warnings
    return warnings + [f"warning: {skip_source}: none of its skip globs ({', '.join(plan.unmatched_skips)}) matched a linear module"]


def source_bytes(checkpoint: Checkpoint) -> int:
    return sum(info.nbytes for info in checkpoint.tensors.values())


def num_parameters(checkpoint: Checkpoint) -> int:
    return sum(info.numel for info in checkpoint.tensors.values() if info.dtype in FLOATS)


@dataclass
class DequantPlan:
    dequantizer: api.Dequantizer
    modules: dict[str, list[str]]  # quantized module -> its tensors, the dense weight's name first
    entries: list[Entry]
    dtype: str  # safetensors dtype of the dense weights


def make_dequant_plan(checkpoint: Checkpoint, dtype: str | None) -> DequantPlan:
    """Dense outputs for a quantized checkpoint: each quantized module's weight in `dtype` (default: the
    dtype the checkpoint records), every other tensor copied as is. Reads no weight data."""
    dequantizer = dequantizer_for(checkpoint)
    modules = dequantizer.modules(checkpoint)
    dtype = dtype or dequantizer.default_dtype(checkpoint, modules) or default_dense_dtype(checkpoint, modules)
    if dtype not in NAME_TO_DTYPE:
        raise QuantkitError(f"--dtype {dtype}: choose one of {', '.join(NAME_TO_DTYPE)}")
    consumed = {name: module for module, names in modules.items() for name in names}
    entries = []
    for name, info in checkpoint.tensors.items():
        module = consumed.get(name)
        if module is None:
            entries.append(Entry(name, "keep", module_of(name), (OutputTensor(name, info.dtype, info.shape),)))
        elif name == modules[module][0]:
            outputs = tuple(dequantizer.layout(checkpoint, module, modules[module], NAME_TO_DTYPE[dtype]))
            entries.append(Entry(name, "dequantize", module, outputs))
        else:
            entries.append(Entry(name, "consume", module))
    return DequantPlan(dequantizer, modules, entries, NAME_TO_DTYPE[dtype])


def default_dense_dtype(checkpoint: Checkpoint, modules: dict[str, list[str]]) -> str:
    """config.json's dtype (or torch_dtype), else the dtype of the unquantized float tensors."""
    for key in ("dtype", "torch_dtype"):
        if checkpoint.config.get(key) in NAME_TO_DTYPE:
            return checkpoint.config[key]
    quantized = {n for names in modules.values() for n in names}
    for name, info in checkpoint.tensors.items():
        if name not in quantized and info.dtype in FLOATS:
            return NAME_OF[info.dtype]
    return "float32"
