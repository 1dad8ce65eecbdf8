"""What a method provides, and the registries the methods fill (never importing them by name).

A *quantizer* writes a safetensors checkpoint in its format (options, layout, quantize a module, config);
a *reader* (dequantizer) reads one `quant_method` back (modules, layout, dequantize, checks, error bound);
a *file format* is a source that is not a safetensors folder (a .gguf file, PyTorch .bin), found by its
path; a *converter* is one `convert --to` target. Each method's folder registers its own at import;
`quantkit.methods.load()` imports the folders. Registries are plain dicts with a duplicate check.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from quantkit.errors import QuantkitError
from quantkit.io.safetensors import OutputTensor
from quantkit.io.source import Checkpoint
from quantkit.io.staged import LEFTOVER, leftovers_of
from quantkit.io.stream import Progress

# ---------------------------------------------------------------------------------------------- options


@dataclass(frozen=True)
class Options:
    """Settings every quantize run has; each method's options class adds its own fields."""

    method: str
    skip: tuple[str, ...] = ()
    max_shard_size: int = 5 * 10**9


def option_fields(cls: type[Options]) -> dict[str, type]:
    """Each field's type as a plain Python type (bool, int, float, str, tuple), for validating input."""
    hints = typing.get_type_hints(cls)
    plain = {}
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
            hint = args[0]
        plain[f.name] = typing.get_origin(hint) or hint
    return plain


# -------------------------------------------------------------------------------------------- contracts


class WeightSource(Protocol):
    """A weight as a quantizer sees it: logical shape [out, in], read in row chunks of stored bits."""

    shape: tuple[int, ...]
    dtype: str

    def chunks(self, rows: int) -> Iterator[np.ndarray]: ...


class TensorSink(Protocol):
    def write(self, name: str, chunk: np.ndarray | bytes) -> None: ...

    def done(self, name: str) -> None: ...


class Quantizer(Protocol):
    """A quantization method: its options, checks, output layout, a module's quantization, its config.

    `presets` are the settings `inspect` sizes a checkpoint for (label -> options)."""

    methods: tuple[str, ...]
    options: type[Options]

    def check(self, options: Options) -> None: ...

    def layout(self, module: str, shape: tuple[int, ...], source_dtype: str, options: Options) -> list[OutputTensor]: ...

    def quantize(self, module: str, weight: WeightSource, options: Options, sink: TensorSink) -> None: ...

    def config(self, options: Options, skipped: list[str], head: list[str]) -> dict: ...

    def presets(self) -> dict[str, Options]: ...


class Dequantizer(Protocol):
    """Reads one quantized format back: which tensors form each module, and their dense values.

    `modules` maps each quantized module to its tensors, the dense weight's name first; `layout` gives the
    dense outputs of one module; `dequantize` writes them through the sink, reading inputs with `read`.
    `check` returns problems (strings) for verify: companions missing, shapes or config disagreeing;
    `options` the options that would write this checkpoint (verify compares sizes with its layout);
    `error_bound` the relative weight error above which verify fails a layer of `scheme`; `describe` the
    method and its salient settings from a `quantization_config`, for inspect; `fix` (verify --fix) repairs
    in place what `check` finds that metadata alone can repair, and returns what it changed.
    """

    quant_method: str

    def modules(self, checkpoint: Checkpoint) -> dict[str, list[str]]: ...

    def default_dtype(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> str | None: ...

    def layout(self, checkpoint: Checkpoint, module: str, names: list[str], dtype: str) -> list[OutputTensor]: ...

    def dequantize(self, checkpoint: Checkpoint, module: str, names: list[str], read: Callable[[str], np.ndarray],
                   dtype: str, sink: TensorSink) -> None: ...

    def check(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> list[str]: ...

    def scheme(self, checkpoint: Checkpoint) -> str: ...

    def options(self, checkpoint: Checkpoint) -> Options: ...

    def error_bound(self, scheme: str) -> float: ...

    def describe(self, config: dict) -> dict: ...

    def fix(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> list[str]: ...


@dataclass
class DenseWeights:
    """A checkpoint's tensors as a model would load them: HF names, dense shapes, float32 values read one
    tensor at a time (quantized ones dequantized). `read_rows(name, start, stop)` reads rows of a 2-D
    tensor without the rest, for the names in `row_readable`; `tokenizer(scratch)` is the folder holding
    its tokenizer files (a folder's own; a single file writes them into `scratch`)."""

    config: dict
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], np.ndarray]
    read_rows: Callable[[str, int, int], np.ndarray]
    row_readable: frozenset[str]
    tokenizer: Callable[[Path], Path]


# ---------------------------------------------------------------------------------------------- results


@dataclass
class Result:
    """What quantize, dequantize and convert return: OUT, the files written, a summary (what --json
    prints beside `out` and `files`), and warnings for people."""

    out: Path
    files: list[str]
    summary: dict
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"out": str(self.out), "files": self.files, **self.summary}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Layer:
    name: str
    scheme: str
    rel_error: float
    snr_db: float
    max_error: float
    ok: bool


@dataclass
class Report:
    """What verify found: named checks, with a reference one row per layer, with --logits the logit figures."""

    path: str
    checks: list[Check] = field(default_factory=list)
    layers: list[Layer] = field(default_factory=list)
    logits: dict | None = None  # verify --logits: KL divergence, top-1 agreement, perplexities
    fixed: list[str] = field(default_factory=list)  # verify --fix: what was rewritten

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks) and all(layer.ok for layer in self.layers)

    def as_dict(self) -> dict:
        found = {"ok": self.ok, "path": self.path, "checks": [asdict(c) for c in self.checks], "layers": [asdict(x) for x in self.layers]}
        found |= {"fixed": self.fixed} if self.fixed else {}
        return found if self.logits is None else {**found, "logits": self.logits}


def check_leftovers(path: Path) -> Check:
    """An interrupted run leaves `.NAME.quantkit-partial-PID` beside OUT; that is never a finished checkpoint."""
    if LEFTOVER.search(path.name):
        return Check("leftovers", False, f"{path.name} is the temporary folder of an interrupted run")
    siblings = leftovers_of(path)
    if siblings:
        return Check("leftovers", False, f"an interrupted run left {siblings[0]} beside it; re-run with --force")
    return Check("leftovers", True, "no temporary files of interrupted runs")


def first_of(problems: list[str], more: str = "") -> str:
    """The first problem and how many more there are (or `more` when there are none)."""
    if not problems:
        return more
    extra = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
    return problems[0] + extra


class FileFormat(Protocol):
    """A source that is not a safetensors folder, recognised by its path (a .gguf file, PyTorch .bin).

    `to_dense` writes it as a dense safetensors checkpoint; `verify` returns None where the format has no
    checks of its own (the folder checks then report it); `weights` gives its tensors with their HF names
    as float32, one at a time (verify --logits)."""

    name: str

    def detect(self, path: Path) -> bool: ...

    def inspect(self, path: Path) -> dict: ...

    def verify(self, path: Path, reference: str | None, max_error: float | None) -> Report | None: ...

    def to_dense(self, src: str, path: Path, out: Path, dtype: str | None, force: bool, max_shard_size: int,
                 progress: Progress) -> Result: ...

    def weights(self, path: Path) -> DenseWeights: ...


@dataclass(frozen=True)
class ConvertRequest:
    """`convert SRC OUT --to X` as a converter receives it."""

    src: str
    out: Path
    gguf_type: str = "F16"
    dtype: str | None = None
    force: bool = False
    revision: str | None = None
    max_shard_size: int = 5 * 10**9


Converter = Callable[[ConvertRequest, Progress], Result]


# ------------------------------------------------------------------------------------------- registries

QUANTIZERS: dict[str, Quantizer] = {}
DEQUANTIZERS: dict[str, Dequantizer] = {}
FILE_FORMATS: dict[str, FileFormat] = {}
CONVERTERS: dict[str, Converter] = {}


def _add(registry: dict, key: str, value: object, what: str) -> None:
    if key in registry:
        raise ValueError(f"{what} {key!r} registered twice")
    registry[key] = value


def register(quantizer: Quantizer) -> Quantizer:
    for method in quantizer.methods:
        _add(QUANTIZERS, method, quantizer, "quantization method")
    return quantizer


def register_dequantizer(dequantizer: Dequantizer) -> Dequantizer:
    _add(DEQUANTIZERS, dequantizer.quant_method, dequantizer, "dequantizer for")
    return dequantizer


def register_file_format(file_format: FileFormat) -> FileFormat:
    _add(FILE_FORMATS, file_format.name, file_format, "file format")
    return file_format


def register_converter(target: str, converter: Converter) -> Converter:
    _add(CONVERTERS, target, converter, "convert target")
    return converter


def quantizer_for(method: str) -> Quantizer:
    if method not in QUANTIZERS:
        raise QuantkitError(f"unknown method {method!r}", f"choose one of {', '.join(sorted(QUANTIZERS))}")
    return QUANTIZERS[method]


def dequantizer_for(checkpoint: Checkpoint) -> Dequantizer:
    qc = checkpoint.quantization_config
    if qc is None:
        raise QuantkitError(f"{checkpoint.root / 'config.json'}: the checkpoint is not quantized (no quantization_config)")
    method = qc.get("quant_method")
    if method not in DEQUANTIZERS:
        raise QuantkitError(f"{checkpoint.root / 'config.json'}: quant_method {method!r} is not supported",
                            f"quantkit reads {', '.join(sorted(DEQUANTIZERS))}")
    return DEQUANTIZERS[method]


def file_format_of(path: Path) -> FileFormat | None:
    return next((f for f in FILE_FORMATS.values() if f.detect(path)), None)
