"""The meta skeleton: every input tensor's fate and every output tensor, before any weight is read.

Which tensors are quantized follows transformers' quantizer integrations, from names, shapes and
config.json alone: every linear weight (GPT-2's Conv1D too) except the output head, modules tied to
the input embeddings and modules the user skips. Quantizers come from a registry keyed by method.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import tomllib

from quantkit.dtypes import BY_NAME as NAME_TO_DTYPE
from quantkit.dtypes import FLOATS, NAME_OF
from quantkit.errors import QuantkitError
from quantkit.formats.safetensors import OutputTensor, TensorInfo
from quantkit.source import Checkpoint

CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
CONV1D_LEAVES = {"c_attn", "c_proj", "c_fc", "q_attn"}
EMBEDDING_LEAVES = {"wte", "wpe", "shared", "tok_embeddings"}
HEAD_LEAVES = {"lm_head"}
# Buffers transformers does not save (non-persistent); dropped so our output matches what it writes.
NON_PERSISTENT = ("position_ids", "rotary_emb.inv_freq", "attn.masked_bias")


@dataclass(frozen=True)
class QuantOptions:
    """One validated set of quantization settings: defaults < recipe < command-line flags."""

    method: str
    double_quant: bool = False
    blocksize: int = 64
    compute_dtype: str = "float32"
    quant_storage: str = "uint8"
    skip: tuple[str, ...] = ()
    backend: str = "auto"
    device: str = "cpu"
    max_shard_size: int = 5 * 10**9
    # group-wise (GPTQ) settings
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    format: str | None = None
    optimize: bool = False


@dataclass(frozen=True)
class Entry:
    """One input tensor's fate: keep (copied as is), drop, or quantize as part of `module`."""

    source: str
    fate: str
    module: str = ""
    outputs: tuple[OutputTensor, ...] = ()
    transposed: bool = False
    reason: str = ""


@dataclass
class Plan:
    method: str
    options: QuantOptions
    entries: list[Entry]
    quantization_config: dict
    skipped_modules: list[str] = field(default_factory=list)
    unmatched_skips: list[str] = field(default_factory=list)  # --skip globs that matched no linear module

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


class WeightSource(Protocol):
    """A weight as a quantizer sees it: logical shape [out, in], read in row chunks of stored bits."""

    shape: tuple[int, ...]
    dtype: str

    def chunks(self, rows: int) -> Iterator[np.ndarray]: ...


class TensorSink(Protocol):
    def write(self, name: str, chunk: np.ndarray | bytes) -> None: ...

    def done(self, name: str) -> None: ...


class Quantizer(Protocol):
    """A quantization method: validate, lay out, quantize one module, describe itself in config.json."""

    methods: tuple[str, ...]

    def check(self, options: QuantOptions) -> None: ...

    def layout(self, module: str, shape: tuple[int, ...], source_dtype: str, options: QuantOptions) -> list[OutputTensor]: ...

    def quantize(self, module: str, weight: WeightSource, options: QuantOptions, sink: TensorSink) -> None: ...

    def config(self, options: QuantOptions, skipped: list[str], head: list[str]) -> dict: ...


class Dequantizer(Protocol):
    """Reads one quantized format back: which tensors form each module, and their dense values.

    `modules` maps each quantized module to its tensors, the dense weight's name first; `layout` gives the
    dense outputs of one module; `dequantize` writes them through the sink, reading inputs with `read`.
    `check` returns problems (strings) for verify: companions missing, shapes or config disagreeing;
    `options` the QuantOptions that would write this checkpoint (verify compares sizes with its layout).
    """

    quant_method: str

    def modules(self, checkpoint: Checkpoint) -> dict[str, list[str]]: ...

    def default_dtype(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> str | None: ...

    def layout(self, checkpoint: Checkpoint, module: str, names: list[str], dtype: str) -> list[OutputTensor]: ...

    def dequantize(self, checkpoint: Checkpoint, module: str, names: list[str], read: Callable[[str], np.ndarray],
                   dtype: str, sink: TensorSink) -> None: ...

    def check(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> list[str]: ...

    def scheme(self, checkpoint: Checkpoint) -> str: ...

    def options(self, checkpoint: Checkpoint) -> QuantOptions: ...


QUANTIZERS: dict[str, Quantizer] = {}
DEQUANTIZERS: dict[str, Dequantizer] = {}


def register_dequantizer(dequantizer: Dequantizer) -> Dequantizer:
    if dequantizer.quant_method in DEQUANTIZERS:
        raise ValueError(f"dequantizer for {dequantizer.quant_method!r} registered twice")
    DEQUANTIZERS[dequantizer.quant_method] = dequantizer
    return dequantizer


def dequantizer_for(checkpoint: Checkpoint) -> Dequantizer:
    qc = checkpoint.quantization_config
    if qc is None:
        raise QuantkitError(f"{checkpoint.root / 'config.json'}: the checkpoint is not quantized (no quantization_config)")
    _load_builtin_quantizers()
    method = qc.get("quant_method")
    if method not in DEQUANTIZERS:
        raise QuantkitError(f"{checkpoint.root / 'config.json'}: quant_method {method!r} is not supported",
                            f"quantkit reads {', '.join(sorted(DEQUANTIZERS))}")
    return DEQUANTIZERS[method]


def register(quantizer: Quantizer) -> Quantizer:
    for method in quantizer.methods:
        if method in QUANTIZERS:
            raise ValueError(f"quantization method {method!r} registered twice")
        QUANTIZERS[method] = quantizer
    return quantizer


def quantizer_for(method: str) -> Quantizer:
    _load_builtin_quantizers()
    if method not in QUANTIZERS:
        raise QuantkitError(f"unknown method {method!r}", f"choose one of {', '.join(sorted(QUANTIZERS))}")
    return QUANTIZERS[method]


def _load_builtin_quantizers() -> None:
    import quantkit.formats.bnb  # noqa: F401  (registers nf4, fp4, int8)
    import quantkit.formats.gptq  # noqa: F401  (registers gptq and the GPTQ/AWQ reader)


# ---------------------------------------------------------------- recipes


def load_recipe(path: Path) -> dict:
    """A TOML recipe: method, scheme settings and skip globs; flags given on the command line win."""
    try:
        recipe = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise QuantkitError(f"{path}: cannot read recipe ({e.strerror})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise QuantkitError(f"{path}: not valid TOML ({e})") from None
    known = {f for f in QuantOptions.__dataclass_fields__} | {"description"}
    unknown = sorted(set(recipe) - known)
    if unknown:
        raise QuantkitError(f"{path}: unknown recipe key(s) {', '.join(unknown)}")
    if "skip" in recipe and not (isinstance(recipe["skip"], list) and all(isinstance(s, str) for s in recipe["skip"])):
        raise QuantkitError(f"{path}: skip must be a list of module-name globs")
    recipe.pop("description", None)
    if "skip" in recipe:
        recipe["skip"] = tuple(recipe["skip"])
    return recipe


def merge_options(recipe: dict, flags: dict) -> QuantOptions:
    """defaults < recipe < flags (flags left at None do not override)."""
    values = {**recipe, **{k: v for k, v in flags.items() if v is not None}}
    if "method" not in values:
        raise QuantkitError("no quantization method given", "pass --method or a --recipe that sets one")
    try:
        return QuantOptions(**values)
    except TypeError as e:
        raise QuantkitError(f"bad options: {e}") from None


# ---------------------------------------------------------------- module classification


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def leaf(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def is_conv1d(config: dict, module: str) -> bool:
    return config.get("model_type") in CONV1D_MODEL_TYPES and leaf(module) in CONV1D_LEAVES


def is_linear_weight(name: str, info: TensorInfo) -> bool:
    """A 2-D float `.weight` of a module that is not an embedding."""
    if not name.endswith(".weight") or len(info.shape) != 2 or info.dtype not in FLOATS:
        return False
    module = module_of(name)
    return "embed" not in leaf(module) and leaf(module) not in EMBEDDING_LEAVES


def head_modules(checkpoint: Checkpoint) -> list[str]:
    """Modules transformers keeps in full precision: the output head and whatever shares the embedding."""
    heads = sorted({module_of(n) for n in checkpoint.tensors if leaf(module_of(n)) in HEAD_LEAVES})
    if checkpoint.config.get("tie_word_embeddings", True):
        # A head tied to the input embeddings (BERT's MLM decoder, say) carries their shape.
        embeddings = {info.shape for n, info in checkpoint.tensors.items() if "word_embeddings" in n or "embed_tokens" in n}
        heads += sorted(
            module_of(n) for n, info in checkpoint.tensors.items()
            if n.endswith("decoder.weight") and info.shape in embeddings and module_of(n) not in heads
        )  # fmt: skip
    return heads or ["lm_head"]


def matches(module: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(module, g) for g in globs)


def make_plan(checkpoint: Checkpoint, options: QuantOptions) -> Plan:
    """Every tensor's fate and output spec for quantizing `checkpoint` with `options`. Reads no data."""
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
    for name, info in checkpoint.tensors.items():
        module = module_of(name)
        if name.endswith(NON_PERSISTENT):
            entries.append(Entry(name, "drop", module, reason="non-persistent buffer; transformers does not save it"))
        elif is_linear_weight(name, info) and module not in heads:
            if matches(module, options.skip):
                skipped.add(module)
                entries.append(Entry(name, "keep", module, (OutputTensor(name, info.dtype, info.shape),), reason="skipped"))
                continue
            transposed = is_conv1d(checkpoint.config, module)
            shape = info.shape[::-1] if transposed else info.shape
            if math.prod(shape) == 0:
                raise QuantkitError(f"{info.file}: tensor '{name}' is empty and cannot be quantized")
            outputs = tuple(quantizer.layout(module, shape, info.dtype, options))
            entries.append(Entry(name, "quantize", module, outputs, transposed))
        else:
            entries.append(Entry(name, "keep", module, (OutputTensor(name, info.dtype, info.shape),)))
    if not any(e.fate == "quantize" for e in entries):
        raise QuantkitError(f"{checkpoint.root}: no linear weights to quantize", "check --skip and the model's tensors")
    # transformers writes null when nothing is skipped; a user-given list replaces the default, so it
    # must name the head too.
    skipped_list = sorted(skipped | set(heads)) if skipped else []
    config = quantizer.config(options, skipped_list, heads)
    unmatched = [g for g in options.skip if not any(matches(m, (g,)) for m in skipped)]
    return Plan(options.method, options, entries, config, sorted(skipped), unmatched)


def source_bytes(checkpoint: Checkpoint) -> int:
    return sum(info.nbytes for info in checkpoint.tensors.values())


def num_parameters(checkpoint: Checkpoint) -> int:
    return sum(info.numel for info in checkpoint.tensors.values() if info.dtype in FLOATS)


@dataclass
class DequantPlan:
    dequantizer: Dequantizer
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
