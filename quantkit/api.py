"""What a method provides, and the registries the methods fill (never importing them by name).

A *quantizer* writes a safetensors checkpoint in its format (options, layout, quantize a module, config);
a *reader* (dequantizer) reads one `quant_method` back (modules, layout, dequantize, checks, error bound);
a *file format* is a source that is not a safetensors folder (a .gguf file, PyTorch .bin), found by its
path; a *converter* is one `convert --to` target. Each method's folder registers its own at import;
`quantkit.methods.load()` imports the folders. Registries are plain dicts with a duplicate check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from quantkit import dtypes
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import OutputTensor, ShardReader, TensorInfo
from quantkit.io.source import Checkpoint
from quantkit.io.staged import LEFTOVER, copy_side_files, leftovers_of
from quantkit.io.stream import Entry, Progress, ShardWeight, TensorReads
from quantkit.numerics import ErrorSums

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

    def partner(self, module: str) -> WeightSource | None:
        """The weight of another module of the checkpoint (None if it has none): NVFP4 scales q/k/v together."""
        ...


class Unfit(Exception):
    """Raised by a quantizer's `layout` for a module the method cannot hold (a width its groups or blocks do
    not divide): the plan keeps that module dense and warns once, naming every such module."""


class TensorSink(Protocol):
    def write(self, name: str, chunk: np.ndarray | bytes) -> None: ...

    def done(self, name: str) -> None: ...


class Quantizer(Protocol):
    """A quantization method: its options, checks, output layout, a module's quantization, its config.

    `presets` are the settings `inspect` sizes a checkpoint for (label -> options).
    Optional: `transcode(module, blocks, dtype, options, sink) -> bool` writes IntegerBlocks as they are when
    the method holds them exactly (source `dtype` as planned), and returns False, writing nothing, otherwise."""

    methods: tuple[str, ...]
    options: type[Options]

    def check(self, options: Options) -> None: ...

    def layout(self, module: str, shape: tuple[int, ...], source_dtype: str, options: Options) -> list[OutputTensor]:
        """The tensors a module becomes, from its shape alone; raises Unfit for a module kept dense."""
        ...

    def quantize(self, module: str, weight: WeightSource, options: Options, sink: TensorSink) -> None: ...

    def config(self, options: Options, skipped: list[str], head: list[str]) -> dict: ...

    def presets(self) -> dict[str, Options]: ...


class Dequantizer(Protocol):
    """Reads one quantized format back: which tensors form each module, and their dense values.

    `modules` maps each quantized module to its tensors, the dense weight's name first; `layout` gives the
    dense outputs of one module; `dequantize` writes them through the sink, reading inputs with `read`.
    `check` returns problems (strings) for verify: companions missing, shapes or config disagreeing;
    `options` the options that would write this checkpoint (verify compares sizes with its layout), None
    where quantkit does not write this layout;
    `error_bound` the relative weight error above which verify fails a layer of `scheme`; `describe` the
    method and its salient settings from a `quantization_config`, for inspect; `fix` (verify --fix) repairs
    in place what `check` finds that metadata alone can repair, and returns what it changed.

    Optional: `integers(checkpoint, module, names, read) -> IntegerBlocks | None`, the module's values as
    signed integers times per-block float16 factors when they are exactly that (lossless transcoding);
    `mxfp4(checkpoint, module, names, read) -> Mxfp4Blocks | None`, the module's MXFP4 blocks as stored
    (`read` a TensorReads: they are read by expert).
    """

    quant_method: str

    def modules(self, checkpoint: Checkpoint) -> dict[str, list[str]]: ...

    def default_dtype(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> str | None: ...

    def layout(self, checkpoint: Checkpoint, module: str, names: list[str], dtype: str) -> list[OutputTensor]: ...

    def dequantize(self, checkpoint: Checkpoint, module: str, names: list[str], read: Callable[[str], np.ndarray],
                   dtype: str, sink: TensorSink) -> None: ...

    def check(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> list[str]: ...

    def scheme(self, checkpoint: Checkpoint) -> str: ...

    def options(self, checkpoint: Checkpoint) -> Options | None: ...

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


def read_floats(checkpoint: Checkpoint, read: Callable[[str], np.ndarray], name: str) -> np.ndarray:
    """A float companion (scales, absmax, SCB) as float32 values, decoded as its header declares (F16,
    BF16, F32, F64): real writers store scales in the model's dtype (GPTQModel's AWQ scales are BF16 from a
    bf16 model). `read` gives stored bits, so the dtype must come from the header, never be assumed."""
    info = checkpoint.tensors[name]
    if info.dtype not in dtypes.FLOATS:
        raise QuantkitError(f"{info.file}: tensor '{name}' is {info.dtype}, expected a float dtype")
    return dtypes.to_float32(read(name), info.dtype)


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
    as float32, one at a time (verify --logits). Optional: `source(path) -> TensorSource`, the file as dense
    tensors for quantize and convert."""

    name: str

    def detect(self, path: Path) -> bool: ...

    def inspect(self, path: Path) -> dict: ...

    def verify(self, path: Path, reference: str | None, max_error: float | None, progress: Progress) -> Report | None: ...

    def to_dense(self, src: str, path: Path, out: Path, dtype: str | None, force: bool, max_shard_size: int,
                 progress: Progress) -> Result: ...

    def weights(self, path: Path) -> DenseWeights: ...


@dataclass(frozen=True)
class ConvertRequest:
    """`convert SRC OUT --to X` as a converter receives it; `source` is SRC opened as dense tensors
    (`TensorSource`) for converters that take any format (GGUF output), None for the others."""

    src: str
    out: Path
    gguf_type: str = "F16"
    dtype: str | None = None
    force: bool = False
    revision: str | None = None
    max_shard_size: int = 5 * 10**9
    imatrix: str | None = None  # --imatrix: llama.cpp's importance matrix for --to gguf
    source: TensorSource | None = None


Converter = Callable[[ConvertRequest, Progress], Result]


@dataclass
class PlannedTensor:
    """One source tensor in a preview: its fate (quantize, keep, drop, convert, refuse), why, and its outputs
    ({name, dtype, shape, nbytes}; dtype may be a block type such as Q4_K)."""

    name: str
    fate: str
    reason: str
    outputs: list[dict] = field(default_factory=list)


def output_dict(t: OutputTensor) -> dict:
    return {"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "nbytes": t.nbytes}


@dataclass
class Preview:
    """What a run would write, from headers only (`quantize --dry-run`, `inspect --method`, `convert --dry-run`).

    `files`: each output file and its bytes, exact unless `exact` is False (then at most);
    `working_bytes`: the most data the run holds in memory at once beyond its fixed buffers."""

    target: str
    tensors: list[PlannedTensor]
    files: dict[str, int]
    exact: bool = True
    working_bytes: int = 0
    warnings: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)


ConvertPreview = Callable[[ConvertRequest], Preview]


# ------------------------------------------------------------------------- any source as dense tensors


@dataclass(frozen=True)
class Mxfp4Blocks:
    """A weight as OCP MXFP4, as gpt-oss stores its experts: blocks uint8 [..., out, in / 32, 16], two e2m1
    codes a byte (input 2k in the low nibble, 2k + 1 in the high one), scales uint8 [..., out, in / 32], the
    e8m0 exponent of each run of 32 inputs: value = e2m1(code) * 2**(scale - 127). `read(start, stop)` gives
    (blocks, scales) of [start, stop) along the first axis (experts), mapped when asked: memory follows them."""

    shape: tuple[int, ...]  # the blocks'
    read: Callable[[int, int], tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class IntegerBlocks:
    """A weight `[out, in]` as signed integers times one float16 factor per `block` consecutive inputs:
    value = float32(q) * float32(d). GPTQ / AWQ groups whose zero point is the middle of the range (or one
    below it, with the sign of the scale turned) and GGUF Q4_0 / Q8_0 blocks all compute exactly this, so
    a weight moves between them without rounding when the target's blocks can hold the factors."""

    bits: int
    block: int
    q: np.ndarray  # int8 [out, in], in [-2**(bits-1), 2**(bits-1) - 1]
    d: np.ndarray  # float16 [out, in // block], any sign

    def values(self) -> np.ndarray:
        return self.q.astype(np.float32) * np.repeat(self.d.astype(np.float32), self.block, axis=1)

    def regroup(self, block: int) -> IntegerBlocks | None:
        """The same values with one factor per `block` inputs; None when a coarser block would need two."""
        out_features, in_features = self.q.shape
        if block == self.block:
            return self
        if block <= 0 or in_features % block:
            return None
        if self.block % block == 0:
            return replace(self, block=block, d=np.repeat(self.d, self.block // block, axis=1))
        if block % self.block:
            return None
        bits = self.d.view(np.uint16).reshape(out_features, in_features // block, block // self.block)
        if not np.all(bits == bits[..., :1]):
            return None
        return replace(self, block=block, d=np.ascontiguousarray(bits[..., 0]).view(np.float16))


@dataclass
class SourceTensor:
    """One tensor of any source as a WeightSource: row chunks of the stored bits of a dense tensor, or of
    float32 values dequantized in the source's own arithmetic (`scheme` then names the source's
    quantization of it). `integers` gives its IntegerBlocks where its values are exactly that."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    rows: Callable[[int], Iterator[np.ndarray]]
    scheme: str = ""
    integers: Callable[[], IntegerBlocks | None] = lambda: None
    mxfp4: Callable[[], Mxfp4Blocks | None] = lambda: None
    partners: Callable[[str], WeightSource | None] = lambda module: None
    extent: tuple[Path, int] | None = None  # (file, offset) where its stored bytes lie as they are, if they do

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        return self.rows(rows)

    def partner(self, module: str) -> WeightSource | None:
        """Another module's weight (NVFP4 shares one scale over q/k/v); None where the source cannot say."""
        return self.partners(module)


def array_rows(values: np.ndarray) -> Callable[[int], Iterator[np.ndarray]]:
    """`SourceTensor.rows` over an array in memory (one module at most)."""
    return lambda rows: (values[start : start + rows] for start in range(0, values.shape[0], rows))


@dataclass
class TensorSource:
    """Any checkpoint quantkit reads, as dense tensors with Hugging Face names.

    `checkpoint` is the dense view planning reads: config.json without `quantization_config`, every tensor
    as it will come out (dequantized weights as F32 in their logical shape). `stream(entries)` yields each
    entry's tensor one at a time in the order given (Conv1D weights turned to [out, in] where the entry
    says `transposed`); `side_files(folder)` writes tokenizer and side files as for a dense source;
    `scheme` is the source's quantization ("" for a dense source); `card`: model card metadata of a source
    that has no README.md (a GGUF's general.* keys), carried into the output's card."""

    checkpoint: Checkpoint
    scheme: str
    stream: Callable[[list[Entry]], Iterator[tuple[Entry, SourceTensor]]]
    side_files: Callable[[Path], list[str]]
    card: dict = field(default_factory=dict)


def folder_source(checkpoint: Checkpoint) -> TensorSource:
    """A safetensors folder as dense tensors: dense tensors as stored, each quantized module (any registered
    reader) dequantized to float32 one module at a time, its companions consumed."""
    if checkpoint.quantization_config is None:
        return TensorSource(checkpoint, "", lambda entries: _stream_folder(checkpoint, entries, None, {}),
                            lambda folder: copy_side_files(checkpoint, folder))
    reader = dequantizer_for(checkpoint)
    modules = reader.modules(checkpoint)
    consumed = {name for names in modules.values() for name in names}
    tensors = {name: info for name, info in checkpoint.tensors.items() if name not in consumed}
    dense: dict[str, tuple] = {}  # dense name -> (module, the tensor whose place it takes, dense shape)
    for module, names in modules.items():
        first = checkpoint.tensors[names[0]]
        for out in reader.layout(checkpoint, module, names, "F32"):
            tensors[out.name] = TensorInfo(out.name, out.dtype, out.shape, first.file, first.start, first.start + out.nbytes)
            dense[out.name] = (module, first, out.shape)
    config = {k: v for k, v in checkpoint.config.items() if k != "quantization_config"}
    view = Checkpoint(checkpoint.root, config, checkpoint.files, dict(sorted(tensors.items(), key=lambda t: (
        checkpoint.files.index(t[1].file), t[1].start))))
    scheme = reader.scheme(checkpoint)
    return TensorSource(view, scheme, lambda entries: _stream_folder(checkpoint, entries, (reader, modules, scheme), dense),
                        lambda folder: copy_side_files(checkpoint, folder, dense=True))


def _stream_folder(checkpoint: Checkpoint, entries: list[Entry], quantized: tuple | None,
                   dense: dict[str, tuple]) -> Iterator[tuple[Entry, SourceTensor]]:
    reader: ShardReader | None = None
    try:
        for entry in entries:
            module, info, shape = dense.get(entry.source) or (None, checkpoint.tensors[entry.source], ())
            if reader is None or reader.path != info.file:
                if reader is not None:
                    reader.close()
                reader = ShardReader(info.file)
            if module is None:
                weight = ShardWeight(reader, info, entry.transposed, checkpoint)
                yield entry, SourceTensor(entry.source, weight.shape, info.dtype, weight.chunks, partners=weight.partner,
                                          extent=None if entry.transposed else (info.file, info.start))
            else:
                yield entry, _dequantized(checkpoint, entry, module, shape, quantized, TensorReads(checkpoint, reader))
    finally:
        # Closed early (the run failed, or the generator is collected): the failure is being reported already,
        # and a second one from closing the shard (its map faulted too) would only print "Exception ignored".
        if reader is not None:
            with contextlib.suppress(QuantkitError) if sys.exc_info()[0] is not None else contextlib.nullcontext():
                reader.close()


def _dequantized(checkpoint: Checkpoint, entry: Entry, module: str, shape: tuple[int, ...], quantized: tuple,
                 read: TensorReads) -> SourceTensor:
    """One module dequantized by its reader into float32 when its rows are first asked for (a module at a time
    in memory): a module moved as its integers (lossless) is never dequantized."""
    reader, modules, scheme = quantized
    values: list[np.ndarray] = []

    def rows(count: int) -> Iterator[np.ndarray]:
        if not values:
            sink = CollectingSink()
            reader.dequantize(checkpoint, module, modules[module], read, "F32", sink)
            whole = sink.array(entry.source).reshape(shape)
            values.append(np.ascontiguousarray(whole.T) if entry.transposed else whole)
        return array_rows(values[0])(count)

    def packed(kind: str) -> Callable:
        method = getattr(reader, kind, None)
        return (lambda: method(checkpoint, module, modules[module], read)) if method else (lambda: None)

    return SourceTensor(entry.source, shape[::-1] if entry.transposed else shape, "F32", rows, scheme,
                        packed("integers"), packed("mxfp4"))


class CollectingSink:
    """A TensorSink that keeps what is written, for reading it back (one module's tensors)."""

    def __init__(self, forward: TensorSink | None = None):
        self.forward = forward
        self.parts: dict[str, list[np.ndarray]] = {}

    def write(self, name: str, chunk: np.ndarray | bytes) -> None:
        if self.forward is not None:
            self.forward.write(name, chunk)
        array = np.frombuffer(chunk, np.uint8) if isinstance(chunk, bytes) else np.asarray(chunk)  # writers never reuse a chunk
        self.parts.setdefault(name, []).append(array)

    def done(self, name: str) -> None:
        if self.forward is not None:
            self.forward.done(name)

    def array(self, name: str) -> np.ndarray:
        parts = self.parts[name]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p.reshape(-1, *parts[0].shape[1:]) if p.ndim else p.reshape(1) for p in parts])



def transcoding_summary(scheme: str, lossless: list[str], requantized: dict[str, ErrorSums]) -> dict:
    """What --json reports for a quantized source: the tensors moved without rounding, and per re-quantized
    tensor the error it gained against the source's dequantized values."""
    rows = []
    for name, sums in requantized.items():
        rel, snr = sums.figures()
        rows.append({"tensor": name, "rel_error": rel, "snr_db": snr})
    return {"from": scheme, "lossless": lossless, "requantized": rows}


# ------------------------------------------------------------------------------------------- registries

QUANTIZERS: dict[str, Quantizer] = {}
DEQUANTIZERS: dict[str, Dequantizer] = {}
FILE_FORMATS: dict[str, FileFormat] = {}
CONVERTERS: dict[str, Converter] = {}
CONVERT_PREVIEWS: dict[str, ConvertPreview] = {}  # target -> what a run would write (optional)
CONVERT_PRESETS: dict[str, Callable[[], dict[str, dict]]] = {}  # target -> () -> {label: ConvertRequest fields}
CONVERT_DESCRIPTIONS: dict[str, Callable[[], dict]] = {}  # target -> () -> what it reads and writes (for `formats`)


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


def register_converter(target: str, converter: Converter, preview: ConvertPreview | None = None,
                       presets: Callable[[], dict[str, dict]] | None = None,
                       describe: Callable[[], dict] | None = None) -> Converter:
    """A `convert --to target`; `preview` sizes a run from headers (for --dry-run and inspect), `presets`
    lists the settings inspect's size table shows, `describe` what it reads and writes (types,
    architectures) for `quantkit formats`. The last two are called only when needed: they may import
    the format's library."""
    _add(CONVERTERS, target, converter, "convert target")
    for registry, value in ((CONVERT_PREVIEWS, preview), (CONVERT_PRESETS, presets), (CONVERT_DESCRIPTIONS, describe)):
        if value is not None:
            registry[target] = value
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
