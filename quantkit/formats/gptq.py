"""The GPTQ and AWQ (GEMM) checkpoint layouts: companion tensor names, int32 packing, the v1 / v2
zero-point conventions, and the `quantization_config` that loaders read.

GPTQ: `qweight` `[in / f, out]` packs f = 32 / bits codes along input features (code k of a word in
bits [k * bits, (k + 1) * bits)), `qzeros` `[groups, out / f]` packs zero points along output features
the same way, `scales` float16 `[groups, out]`, `g_idx` int32 `[in]` (group of each input feature).
v1 ("gptq") stores every zero point minus one, v2 ("gptq_v2") stores it as is.
AWQ GEMM (4-bit): `qweight` `[in, out / 8]` and `qzeros` `[groups, out / 8]` pack along output
features with the interleave below, zero points as is, `scales` `[groups, out]`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantkit import __version__, dtypes
from quantkit.errors import QuantkitError
from quantkit.formats.safetensors import OutputTensor, ShardReader
from quantkit.plan import QuantOptions, TensorSink, WeightSource, is_conv1d, register, register_dequantizer
from quantkit.schemes import groupwise
from quantkit.source import Checkpoint

COMPANIONS = ("qweight", "qzeros", "scales", "g_idx")
AWQ_COMPANIONS = ("qweight", "qzeros", "scales")
CHECKPOINT_FORMATS = {"v1": "gptq", "v2": "gptq_v2"}
VERSIONS = {name: version for version, name in CHECKPOINT_FORMATS.items()}
AWQ_ORDER = np.array([0, 2, 4, 6, 1, 3, 5, 7])  # nibble k of an AWQ word holds column AWQ_ORDER[k]
_V1_OFFSET = 1
CHUNK_ELEMENTS = 1 << 22  # weights quantized per step


@dataclass(frozen=True)
class GptqConfig:
    """What a checkpoint's `quantization_config` says about its packed weights."""

    method: str  # "gptq" or "awq"
    bits: int
    group_size: int
    sym: bool
    desc_act: bool
    version: str | None  # "v1" / "v2" for GPTQ, None for AWQ (zero points as is)


def module_of(weight_name: str) -> str:
    """`x.weight` -> `x`: companions are named `x.qweight`, `x.qzeros`, ..."""
    return weight_name.removesuffix(".weight")


def companion_names(module: str, method: str = "gptq") -> dict[str, str]:
    return {part: f"{module}.{part}" for part in (COMPANIONS if method == "gptq" else AWQ_COMPANIONS)}


# ---- packing ------------------------------------------------------------------------------------


def pack_rows(codes: np.ndarray, bits: int) -> np.ndarray:
    """`[n, m]` codes -> int32 `[n / f, m]`, f = 32 / bits consecutive rows to a word, lowest bits first."""
    per_word = groupwise.PACK_BITS // bits
    n, m = codes.shape
    fields = codes.astype(np.uint32).reshape(n // per_word, per_word, m)
    shifts = (np.arange(per_word, dtype=np.uint32) * np.uint32(bits))[None, :, None]
    return np.bitwise_or.reduce(fields << shifts, axis=1).view(np.int32)


def unpack_rows(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of `pack_rows`: int32 `[n / f, m]` -> uint8 `[n, m]`."""
    per_word = groupwise.PACK_BITS // bits
    shifts = (np.arange(per_word, dtype=np.uint32) * np.uint32(bits))[None, :, None]
    fields = (words.view(np.uint32)[:, None, :] >> shifts) & np.uint32(2**bits - 1)
    return fields.reshape(-1, words.shape[1]).astype(np.uint8)


def pack_columns(values: np.ndarray, bits: int) -> np.ndarray:
    """`[n, m]` -> int32 `[n, m / f]`, f consecutive columns to a word, lowest bits first."""
    return np.ascontiguousarray(pack_rows(values.T, bits).T)


def unpack_columns(words: np.ndarray, bits: int) -> np.ndarray:
    return np.ascontiguousarray(unpack_rows(np.ascontiguousarray(words.T), bits).T)


# ---- GPTQ tensors --------------------------------------------------------------------------------


def pack_qweight(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes of output rows `[rows, in]` -> their `qweight` columns `[in / f, rows]`."""
    return pack_rows(np.ascontiguousarray(codes.T), bits)


def pack_qzeros(zeros: np.ndarray, bits: int, version: str) -> np.ndarray:
    """Zero points `[out, groups]` -> `qzeros` `[groups, out / f]`, minus one for v1."""
    stored = zeros.T.astype(np.int64)
    if version == "v1":
        if np.any(stored < _V1_OFFSET):
            raise QuantkitError("GPTQ v1 cannot store a zero point of 0", "write --format v2")
        stored = stored - _V1_OFFSET
    return pack_columns(stored.astype(np.uint8), bits)


def group_index(in_features: int, group_size: int) -> np.ndarray:
    """`g_idx` without act-order: input feature i belongs to group i // group_size."""
    size = in_features if group_size == -1 else group_size
    return (np.arange(in_features) // size).astype(np.int32)


def zero_points(qzeros: np.ndarray, bits: int, version: str | None) -> np.ndarray:
    """True zero points `[groups, out]` (int64) from stored `qzeros`; v1 stores them minus one."""
    stored = unpack_columns(qzeros, bits).astype(np.int64)
    return stored + _V1_OFFSET if version == "v1" else stored


def dequantize_gptq(tensors: dict[str, np.ndarray], bits: int, version: str, module: str) -> np.ndarray:
    """float32 `[out, in]` weight from GPTQ companions (either version, act-order `g_idx` included)."""
    problem = companion_problem({part: (t.dtype, t.shape) for part, t in tensors.items()}, bits)
    problem = problem or g_idx_problem(tensors["g_idx"], tensors["scales"].shape[0])
    if problem:
        raise QuantkitError(f"{module}: {problem}")
    g_idx = tensors["g_idx"].astype(np.int64)
    codes = unpack_rows(tensors["qweight"], bits).astype(np.float32)  # [in, out]
    zeros = zero_points(tensors["qzeros"], bits, version).astype(np.float32)
    scales = tensors["scales"].astype(np.float32)
    return np.ascontiguousarray(((codes - zeros[g_idx]) * scales[g_idx]).T)


def g_idx_problem(g_idx: np.ndarray, groups: int) -> str | None:
    if g_idx.size and (g_idx.min() < 0 or g_idx.max() >= groups):
        return f"g_idx points outside the {groups} groups"
    return None


def companion_problem(parts: dict[str, tuple[np.dtype, tuple[int, ...]]], bits: int, group_size: int | None = None) -> str | None:
    """What is wrong with a module's GPTQ companions, given each one's (dtype, shape), or None.

    Without `group_size` the group count is taken from `scales`; with it, it must match.
    """
    missing = [part for part in COMPANIONS if part not in parts]
    if missing:
        return f"missing {', '.join(missing)}"
    for part, want in (("qweight", "int32"), ("qzeros", "int32"), ("scales", "float16"), ("g_idx", "int32")):
        if np.dtype(parts[part][0]) != np.dtype(want):
            return f"{part} is {np.dtype(parts[part][0])}, expected {want}"
    per_word = groupwise.PACK_BITS // bits
    qweight, scales = parts["qweight"][1], parts["scales"][1]
    if len(qweight) != 2 or len(scales) != 2:
        return "qweight and scales must be 2-D"
    in_features, out_features = qweight[0] * per_word, qweight[1]
    groups = scales[0] if group_size is None else groupwise.n_groups(in_features, group_size)
    expected = {"scales": (groups, out_features), "qzeros": (groups, out_features // per_word), "g_idx": (in_features,)}
    for part, shape in expected.items():
        if tuple(parts[part][1]) != shape:
            return f"{part} has shape {list(parts[part][1])}, expected {list(shape)} at {bits} bits"
    return None


# ---- v1 <-> v2 ------------------------------------------------------------------------------------


def convert_qzeros(qzeros: np.ndarray, bits: int, source: str, target: str, module: str) -> np.ndarray:
    """Rewrite stored zero points from one GPTQ version to the other (a no-op when they agree)."""
    if source == target:
        return qzeros
    zeros = zero_points(qzeros, bits, source)
    stored = zeros - _V1_OFFSET if target == "v1" else zeros
    if np.any(stored < 0):
        raise QuantkitError(
            f"{module}: a zero point is 0, which GPTQ v1 cannot store", "keep this checkpoint in v2"
        )
    if np.any(stored > 2**bits - 1):
        raise QuantkitError(f"{module}: a v1 zero point field holds {2**bits - 1}, which no loader can read back")
    return pack_columns(stored.astype(np.uint8), bits)


def infer_version(qzeros: np.ndarray, bits: int, sym: bool) -> str | None:
    """The GPTQ version the stored zero points themselves prove, or None when they cannot tell.

    Symmetric: every zero point is 2**(bits-1), stored as such in v2 and minus one in v1.
    Asymmetric: only a field at the top of the range proves v2 (in v1 it would mean 2**bits).
    """
    stored = unpack_columns(qzeros, bits)
    if stored.size == 0:
        return None
    mid = 2 ** (bits - 1)
    if sym:
        if np.all(stored == mid):
            return "v2"
        if np.all(stored == mid - 1):
            return "v1"
        return None
    return "v2" if np.any(stored == 2**bits - 1) else None


# ---- AWQ GEMM -----------------------------------------------------------------------------------


def unpack_awq(words: np.ndarray) -> np.ndarray:
    """AWQ 4-bit words `[n, m / 8]` -> codes `[n, m]` in natural column order."""
    nibbles = unpack_columns(words, 4).reshape(words.shape[0], -1, 8)
    natural = np.empty_like(nibbles)
    natural[:, :, AWQ_ORDER] = nibbles
    return natural.reshape(words.shape[0], -1)


def pack_awq(codes: np.ndarray) -> np.ndarray:
    """Inverse of `unpack_awq` (used by tests and by nothing that writes AWQ)."""
    grouped = codes.reshape(codes.shape[0], -1, 8)[:, :, AWQ_ORDER]
    return pack_columns(grouped.reshape(codes.shape[0], -1), 4)


def dequantize_awq(tensors: dict[str, np.ndarray], group_size: int, module: str) -> np.ndarray:
    """float32 `[out, in]` weight from AWQ GEMM companions."""
    missing = [part for part in AWQ_COMPANIONS if part not in tensors]
    if missing:
        raise QuantkitError(f"{module}: missing {', '.join(missing)}")
    codes = unpack_awq(tensors["qweight"]).astype(np.float32)  # [in, out]
    zeros = unpack_awq(tensors["qzeros"]).astype(np.float32)  # [groups, out]
    scales = tensors["scales"].astype(np.float32)
    in_features = codes.shape[0]
    size = in_features if group_size == -1 else group_size
    if scales.shape != zeros.shape or scales.shape[0] * size != in_features or scales.shape[1] != codes.shape[1]:
        raise QuantkitError(f"{module}: AWQ scales {list(scales.shape)} do not fit qweight {list(codes.shape)}")
    group = np.arange(in_features) // size
    return np.ascontiguousarray(((codes - zeros[group]) * scales[group]).T)


# ---- config -------------------------------------------------------------------------------------


def quantization_config(
    bits: int, group_size: int, sym: bool, version: str, dense_modules: tuple[str, ...] = ()
) -> dict:
    """config.json's `quantization_config` for what `pack_gptq` writes.

    Modules left dense inside the quantized blocks are excluded through GPTQModel's `dynamic` rules
    (`-:` + a regex of the full module name); the output head is never quantized (`lm_head: false`).
    """
    fmt = CHECKPOINT_FORMATS[version]
    config = {
        "quant_method": "gptq",
        "bits": bits,
        "group_size": group_size,
        "desc_act": False,
        "sym": sym,
        "checkpoint_format": fmt,
        "format": fmt,
        "pack_dtype": "int32",
        "lm_head": False,
        "meta": {"quantizer": [f"quantkit:{__version__}"]},
    }
    if dense_modules:
        config["dynamic"] = {f"-:^{re.escape(name)}$": {} for name in dense_modules}
    return config


def read_config(config: dict, where: str = "config.json") -> GptqConfig | None:
    """The GPTQ / AWQ settings of a `quantization_config`, None when it is some other method."""
    method = str(config.get("quant_method", "")).lower()
    if method not in ("gptq", "awq"):
        return None
    bits = config.get("bits", config.get("w_bit"))
    group_size = config.get("group_size", config.get("q_group_size"))
    if not isinstance(bits, int) or not isinstance(group_size, int):
        raise QuantkitError(f"{where}: quantization_config needs integer bits and group_size")
    if method == "awq":
        version_name = str(config.get("version", "gemm")).lower()
        if version_name != "gemm" or bits != 4:
            raise QuantkitError(f"{where}: only 4-bit AWQ GEMM is supported, not {bits}-bit {version_name}")
        return GptqConfig("awq", bits, group_size, not config.get("zero_point", True), False, None)
    if bits not in groupwise.SUPPORTED_BITS:
        raise QuantkitError(f"{where}: {bits}-bit GPTQ is not supported", f"supported: {groupwise.SUPPORTED_BITS}")
    fmt = config.get("checkpoint_format", config.get("format", "gptq"))
    if fmt not in VERSIONS:
        raise QuantkitError(f"{where}: unknown GPTQ checkpoint_format {fmt!r}", "expected gptq or gptq_v2")
    return GptqConfig("gptq", bits, group_size, bool(config.get("sym", True)), bool(config.get("desc_act")), VERSIONS[fmt])


def with_version(config: dict, version: str) -> dict:
    """The same `quantization_config` declaring `version`: `checkpoint_format` and `format` both."""
    fmt = CHECKPOINT_FORMATS[version]
    return dict(config, checkpoint_format=fmt, format=fmt)


# ---- the quantizer the pipeline calls ---------------------------------------------------------


def version_of(options: QuantOptions) -> str:
    """--format, by default v1 for symmetric output (the classic layout) and v2 for asymmetric."""
    return options.format or ("v1" if options.sym else "v2")


class Gptq:
    """Group-wise integer quantization written in the GPTQ checkpoint layout."""

    methods = ("gptq",)

    def check(self, options: QuantOptions) -> None:
        if options.bits not in groupwise.SUPPORTED_BITS:
            raise QuantkitError(f"--bits {options.bits}: gptq output supports {', '.join(map(str, groupwise.SUPPORTED_BITS))}")
        if options.group_size != -1 and options.group_size <= 0:
            raise QuantkitError(f"--group-size {options.group_size}: must be positive, or -1 for whole rows")
        if options.format not in (None, *CHECKPOINT_FORMATS):
            raise QuantkitError(f"--format {options.format}: choose v1 or v2")
        if options.backend not in ("auto", "numba", "numpy"):
            raise QuantkitError(f"--backend {options.backend}: gptq runs on numba or numpy (the same bytes)")
        if options.device != "cpu":
            raise QuantkitError(f"--device {options.device}: gptq output is computed on the CPU")

    def layout(self, module: str, shape: tuple[int, ...], source_dtype: str, options: QuantOptions) -> list[OutputTensor]:
        groupwise.check_shape(f"{module}.weight", shape, options.bits, options.group_size)
        parts = groupwise.layout(shape, options.bits, options.group_size)
        return [OutputTensor(f"{module}.{part}", dtype, shape) for part, (dtype, shape) in parts.items()]

    def config(self, options: QuantOptions, skipped: list[str], head: list[str]) -> dict:
        dense = tuple(m for m in skipped if m not in head)
        return quantization_config(options.bits, options.group_size, options.sym, version_of(options), dense)

    def quantize(self, module: str, weight: WeightSource, options: QuantOptions, sink: TensorSink) -> None:
        bits, group_size, version = options.bits, options.group_size, version_of(options)
        out_features, in_features = weight.shape
        kernel = groupwise.quantize_reference if options.backend == "numpy" else groupwise.quantize
        min_zero = _V1_OFFSET if version == "v1" and not options.sym else 0
        qweight = np.empty((in_features * bits // groupwise.PACK_BITS, out_features), np.int32)
        scales = np.empty((out_features, groupwise.n_groups(in_features, group_size)), np.float32)
        zeros = np.empty(scales.shape, np.uint8)
        start = 0
        for chunk in weight.chunks(max(1, CHUNK_ELEMENTS // in_features)):
            try:
                quant = kernel(dtypes.to_float32(chunk, weight.dtype), bits, group_size, options.sym, min_zero, options.optimize)
            except QuantkitError as e:
                raise QuantkitError(f"tensor '{module}.weight': {e.message}", e.hint) from None
            stop = start + chunk.shape[0]
            qweight[:, start:stop] = pack_qweight(quant.codes, bits)
            scales[start:stop] = quant.scales
            zeros[start:stop] = quant.zeros
            start = stop
        tensors = {
            "qweight": qweight,
            "qzeros": pack_qzeros(zeros, bits, version),
            "scales": np.ascontiguousarray(scales.T).astype(np.float16),
            "g_idx": group_index(in_features, group_size),
        }
        for part in COMPANIONS:
            sink.write(f"{module}.{part}", tensors[part])
            sink.done(f"{module}.{part}")


register(Gptq())


# ---- reading GPTQ / AWQ checkpoints back: dequantize, verify, convert between versions ----------


def checkpoint_config(checkpoint: Checkpoint) -> GptqConfig:
    config = read_config(checkpoint.quantization_config or {}, str(checkpoint.root / "config.json"))
    if config is None:
        raise QuantkitError(f"{checkpoint.root / 'config.json'}: not a GPTQ or AWQ checkpoint")
    return config


def read_tensor(checkpoint: Checkpoint, name: str) -> np.ndarray:
    info = checkpoint.tensors[name]
    with ShardReader(info.file) as reader:
        return reader.read(info)


class GptqReader:
    """Dequantizer and checker for checkpoints whose quant_method is "gptq" or "awq" (GEMM)."""

    def __init__(self, quant_method: str):
        self.quant_method = quant_method
        self.parts = COMPANIONS if quant_method == "gptq" else AWQ_COMPANIONS

    def modules(self, checkpoint: Checkpoint) -> dict[str, list[str]]:
        found = {}
        for name in checkpoint.tensors:
            if name.endswith(".qweight"):
                module = name.removesuffix(".qweight")
                found[module] = [f"{module}.{part}" for part in self.parts if f"{module}.{part}" in checkpoint.tensors]
        return found

    def scheme(self, checkpoint: Checkpoint) -> str:
        config = checkpoint_config(checkpoint)
        return f"{config.method}-{config.bits}"

    def options(self, checkpoint: Checkpoint) -> QuantOptions:
        config = checkpoint_config(checkpoint)
        return QuantOptions(method=config.method, bits=config.bits, group_size=config.group_size, sym=config.sym,
                            format=config.version)  # fmt: skip

    def default_dtype(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> str | None:
        return None  # scales are float16 whatever the model was; config.json's dtype says more

    def layout(self, checkpoint: Checkpoint, module: str, names: list[str], dtype: str) -> list[OutputTensor]:
        config = checkpoint_config(checkpoint)
        rows, cols = checkpoint.tensors[f"{module}.qweight"].shape
        per_word = groupwise.PACK_BITS // config.bits
        shape = (cols, rows * per_word) if config.method == "gptq" else (cols * per_word, rows)
        return [OutputTensor(f"{module}.weight", dtype, shape[::-1] if is_conv1d(checkpoint.config, module) else shape)]

    def dequantize(self, checkpoint: Checkpoint, module: str, names: list[str], read: Callable[[str], np.ndarray],
                   dtype: str, sink: TensorSink) -> None:  # fmt: skip
        config = checkpoint_config(checkpoint)
        missing = [part for part in self.parts if f"{module}.{part}" not in names]
        if missing:
            raise QuantkitError(f"{module}: missing {', '.join(missing)}")
        tensors = {part: read(f"{module}.{part}") for part in self.parts}
        if config.method == "awq":
            values = dequantize_awq(tensors, config.group_size, module)
        else:
            values = dequantize_gptq(tensors, config.bits, config.version, module)
        if is_conv1d(checkpoint.config, module):  # GPT-2's Conv1D stores [in, out]
            values = np.ascontiguousarray(values.T)
        name = f"{module}.weight"
        rows = max(1, CHUNK_ELEMENTS // values.shape[1])
        for start in range(0, values.shape[0], rows):
            sink.write(name, dtypes.from_float32(values[start : start + rows], dtype))
        sink.done(name)

    def check(self, checkpoint: Checkpoint, modules: dict[str, list[str]]) -> list[str]:
        try:
            config = checkpoint_config(checkpoint)
        except QuantkitError as e:
            return [e.message]
        problems = []
        for module in modules:
            parts = {p: checkpoint.tensors[f"{module}.{p}"] for p in self.parts if f"{module}.{p}" in checkpoint.tensors}
            if config.method == "awq":
                problems += self._check_awq(module, parts, config)
                continue
            problem = companion_problem({p: (dtypes.STORAGE[i.dtype], i.shape) for p, i in parts.items()}, config.bits,
                                        config.group_size)  # fmt: skip
            if problem:
                problems.append(f"'{module}': {problem}")
                continue
            problem = g_idx_problem(read_tensor(checkpoint, f"{module}.g_idx"), parts["scales"].shape[0])
            if problem:
                problems.append(f"'{module}': {problem}")
            found = infer_version(read_tensor(checkpoint, f"{module}.qzeros"), config.bits, config.sym)
            if found and found != config.version:
                problems.append(
                    f"'{module}': zero points are stored as GPTQ {found} but config.json declares "
                    f"checkpoint_format {CHECKPOINT_FORMATS[config.version]!r} ({config.version})"
                )
        return problems

    def _check_awq(self, module: str, parts: dict, config: GptqConfig) -> list[str]:
        missing = [p for p in AWQ_COMPANIONS if p not in parts]
        if missing:
            return [f"'{module}': missing {', '.join(missing)}"]
        rows, cols = parts["qweight"].shape
        groups = groupwise.n_groups(rows, config.group_size)
        expected = {"qzeros": ("I32", (groups, cols)), "scales": ("F16", (groups, cols * 8)), "qweight": ("I32", (rows, cols))}
        return [
            f"'{module}.{p}': {parts[p].dtype}{list(parts[p].shape)}, expected {d}{list(shape)}"
            for p, (d, shape) in expected.items() if (parts[p].dtype, parts[p].shape) != (d, shape)
        ]  # fmt: skip


register_dequantizer(GptqReader("gptq"))
register_dequantizer(GptqReader("awq"))


def convert_version(src: str, out: Path, version: str, force: bool = False, revision: str | None = None,
                    max_shard_size: int = 5 * 10**9, progress: Callable[[int, int, str], None] | None = None) -> dict:
    """`convert --to gptq-v1|gptq-v2`: rewrite every `qzeros` and the declared format, copy the rest as is.

    Every zero point is checked (one small tensor at a time) before anything is written, so a v2
    checkpoint holding a zero point of 0 is refused up front, naming the module.
    """
    from quantkit import pipeline
    from quantkit.plan import Entry

    checkpoint = pipeline.open_checkpoint(pipeline.resolve(src, revision))
    config = checkpoint_config(checkpoint)
    if config.method != "gptq":
        raise QuantkitError(f"{checkpoint.root}: --to gptq-{version} converts GPTQ checkpoints, this one is {config.method}")
    modules = GptqReader("gptq").modules(checkpoint)
    for module in modules:
        qzeros = f"{module}.qzeros"
        if qzeros in checkpoint.tensors:
            convert_qzeros(read_tensor(checkpoint, qzeros), config.bits, config.version, version, module)
    rewritten = {f"{module}.qzeros": module for module in modules}
    entries = pipeline.ordered(checkpoint, [
        Entry(name, "rewrite" if name in rewritten else "keep", outputs=(OutputTensor(name, info.dtype, info.shape),))
        for name, info in checkpoint.tensors.items()
    ])  # fmt: skip
    pipeline.check_output(checkpoint.root, out, force)
    pipeline.check_free_space(out, sum(info.nbytes for info in checkpoint.tensors.values()))

    def handle(reader: ShardReader, entry: Entry, info, writer) -> None:
        if entry.fate == "keep":
            pipeline.copy_tensor(reader, info, entry.source, writer)
            return
        module = rewritten[entry.source]
        writer.write(entry.source, convert_qzeros(reader.read(info), config.bits, config.version, version, module))
        writer.done(entry.source)

    def finish(folder: Path) -> list[str]:
        declared = with_version(checkpoint.quantization_config, version)
        pipeline.write_config(folder, dict(checkpoint.config, quantization_config=declared))
        side = pipeline.copy_side_files(checkpoint, folder)
        _rewrite_quantize_config(folder / "quantize_config.json", version)
        return side

    fill = lambda writer: pipeline.stream_entries(checkpoint, entries, writer, handle, progress or pipeline._no_progress)  # noqa: E731
    files, _ = pipeline.write_staged(out, [o for e in entries for o in e.outputs], max_shard_size, fill, finish)
    return {"out": str(out), "to": f"gptq-{version}", "from": f"gptq-{config.version}", "modules": len(modules),
            "tensors": len(entries), "files": files, "output_bytes": sum((out / f).stat().st_size for f in files),
            "fallbacks": [], "warnings": []}  # fmt: skip


def _rewrite_quantize_config(path: Path, version: str) -> None:
    """GPTQModel also writes quantize_config.json; it must declare the same format as config.json."""
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        return
    if isinstance(config, dict) and config.get("quant_method", "gptq") == "gptq":
        path.write_text(json.dumps(with_version(config, version), indent=2) + "\n", encoding="utf-8")
