"""HF checkpoint <-> GGUF: which type each tensor gets (with llama-quantize's fallbacks), then streaming.

to_gguf reads one source tensor at a time, permutes Q/K where llama.cpp expects it, quantizes in row
chunks and writes each chunk as it is produced. from_gguf yields HF-named float32 tensors one at a time
(dequantized by gguf-py, Q/K permutation undone) with the rebuilt config.json.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType
from gguf.quants import dequantize

from quantkit.dtypes import to_float32
from quantkit.errors import QuantkitError
from quantkit.formats import gguf as gf
from quantkit.formats.gguf_vocab import read_vocab, write_hf_tokenizer
from quantkit.formats.safetensors import ShardReader, TensorInfo, iter_row_chunks
from quantkit.schemes import ggml
from quantkit.source import Checkpoint

QType = GGMLQuantizationType
GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q6_K")
FILE_TYPE = {
    QType.F32: LlamaFileType.ALL_F32, QType.F16: LlamaFileType.MOSTLY_F16, QType.BF16: LlamaFileType.MOSTLY_BF16,
    QType.Q8_0: LlamaFileType.MOSTLY_Q8_0, QType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    QType.Q4_1: LlamaFileType.MOSTLY_Q4_1, QType.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    QType.Q5_1: LlamaFileType.MOSTLY_Q5_1, QType.Q4_K: LlamaFileType.MOSTLY_Q4_K_S,
    QType.Q6_K: LlamaFileType.MOSTLY_Q6_K,
}  # fmt: skip
# llama-quantize's choice when a row does not hold whole 256-value super-blocks.
FALLBACK = {QType.Q4_K: QType.Q5_0, QType.Q6_K: QType.Q8_0}
CHUNK_BYTES = 16 << 20  # source bytes read and quantized per chunk


def parse_type(name: str) -> QType:
    if name.upper() not in GGUF_TYPES:
        raise QuantkitError(f"unknown GGUF type {name!r}", f"choose one of {', '.join(GGUF_TYPES)}")
    return QType[name.upper()]


@dataclass(frozen=True)
class Entry:
    hf_name: str
    out: gf.TensorOut
    permute_heads: int  # 0: no Q/K permutation, else the head count to permute with


@dataclass
class Plan:
    arch: gf.Architecture
    hyper: gf.Hyper
    qtype: QType
    entries: list[Entry]
    fallbacks: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # tensors llama.cpp needs that the source lacks

    @property
    def nbytes(self) -> int:
        return sum(e.out.nbytes for e in self.entries)


def _tensor_type(name: str, shape: tuple[int, ...], want: QType, fallbacks: list[str]) -> QType:
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return QType.F32  # norms and 1-D tensors stay F32, as llama.cpp's converter keeps them
    chosen = want
    if not ggml.fits(chosen, shape[-1]) and chosen in FALLBACK:
        chosen = FALLBACK[chosen]
    if not ggml.fits(chosen, shape[-1]):
        chosen = QType.F16
    if chosen != want:
        fallbacks.append(f"{name}: rows of {shape[-1]} do not fit {want.name} blocks of "
                         f"{GGML_QUANT_SIZES[want][0]}; stored as {chosen.name}")
    return chosen


def plan_gguf(config: dict, shapes: dict[str, tuple[int, ...]], qtype: QType) -> Plan:
    """Every source tensor's GGUF name, type and shape; no data read."""
    arch = gf.architecture_of(config)
    hyper = gf.Hyper.from_config(config)
    table = gf.name_table(arch, hyper.n_layers)
    missing, wrong = gf.shape_problems(config, shapes)
    if wrong:
        raise QuantkitError(f"config.json and the weights disagree: {wrong[0]}"
                            + (f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else ""),
                            "llama.cpp would refuse such a GGUF")
    fallbacks: list[str] = []
    entries = []
    for hf_name, shape in shapes.items():
        if hf_name not in table:
            raise QuantkitError(f"tensor {hf_name} has no GGUF name for {arch.gguf_arch}",
                                "is the checkpoint what its config.json says?")
        gguf_name = table[hf_name]
        heads = gf.permuted_heads(arch, hf_name, hyper.n_head, hyper.n_kv_head)
        t_type = _tensor_type(gguf_name, tuple(shape), qtype, fallbacks)
        entries.append(Entry(hf_name, gf.TensorOut(gguf_name, tuple(shape), t_type), heads))
    return Plan(arch, hyper, qtype, entries, fallbacks, missing)


@dataclass
class GGUFReport:
    path: Path
    bytes_written: int
    tensors: int
    fallbacks: list[str]
    warnings: list[str]


def _source_rows(reader: ShardReader, info: TensorInfo, permute_heads: int) -> Iterator[np.ndarray]:
    """Row chunks of a source tensor as stored; Q/K with a head permutation are read whole (rows move)."""
    if permute_heads:
        yield gf.permute_qk(reader.read(info), permute_heads)
        return
    for start, stop in iter_row_chunks(info, CHUNK_BYTES):
        yield reader.read_rows(info, start, stop)


def _quantized(rows: Iterator[np.ndarray], dtype: str, qtype: QType) -> Iterator[np.ndarray]:
    for chunk in rows:
        yield ggml.quantize_stored(chunk.reshape(-1, chunk.shape[-1]) if chunk.ndim > 1 else chunk[None], dtype, qtype)


def to_gguf(checkpoint: Checkpoint, out: Path, qtype: QType,
            progress: Callable[[int, int, str], None] | None = None) -> GGUFReport:
    """Write `out` (.gguf) from a safetensors checkpoint, one shard open at a time, in shard order."""
    shapes = {name: info.shape for name, info in checkpoint.tensors.items()}
    plan = plan_gguf(checkpoint.config, shapes, qtype)
    warnings: list[str] = []
    if plan.missing:
        warnings.append(f"llama.cpp will not load this GGUF: {plan.missing[0]}"
                        + (f" (+{len(plan.missing) - 1} more)" if len(plan.missing) > 1 else ""))
    vocab = read_vocab(checkpoint.root, checkpoint.config, warnings)

    def add_metadata(writer) -> None:
        writer.add_name(checkpoint.root.name)
        gf.write_hyper(writer, plan.hyper)
        writer.add_file_type(int(FILE_TYPE[qtype]))
        writer.add_quantization_version(2)
        if vocab is not None:
            vocab.write(writer)

    def chunks():
        reader: ShardReader | None = None
        done, total = 0, plan.nbytes
        try:
            for e in plan.entries:
                info = checkpoint.tensors[e.hf_name]
                if reader is None or reader.path != info.file:
                    if reader is not None:
                        reader.close()
                    reader = ShardReader(info.file)
                yield e.out, _quantized(_source_rows(reader, info, e.permute_heads), info.dtype, e.out.qtype)
                done += e.out.nbytes
                if progress:
                    progress(done, total, e.hf_name)
        finally:
            if reader is not None:
                reader.close()

    written = gf.write_gguf(Path(out), plan.arch.gguf_arch, add_metadata, [e.out for e in plan.entries], chunks())
    return GGUFReport(Path(out), written, len(plan.entries), plan.fallbacks, warnings)


# ------------------------------------------------------------------------------------------ GGUF -> HF


@dataclass
class FromGGUF:
    config: dict
    names: dict[str, gf.TensorInfo]  # HF name -> stored tensor
    file: gf.GGUFFile
    warnings: list[str]

    def chunks(self, hf_name: str, max_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
        """float32 row chunks of one tensor, in HF order (Q/K, whose rows move, come whole)."""
        t = self.names[hf_name]
        arch = gf.BY_GGUF_ARCH[self.file.metadata["general.architecture"]]
        heads = gf.permuted_heads(arch, hf_name, self.config["num_attention_heads"], self.config["num_key_value_heads"])
        if heads:
            yield gf.unpermute_qk(dequantize_rows(self.file, t).reshape(t.shape), heads)
            return
        n_rows = math.prod(t.shape[:-1])
        step = max(1, max_bytes // (4 * t.shape[-1]))
        for start in range(0, n_rows, step):
            yield dequantize_rows(self.file, t, start, start + step)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(HF name, whole float32 tensor) one at a time."""
        for hf_name, t in self.names.items():
            yield hf_name, np.concatenate([c.reshape(-1) for c in self.chunks(hf_name)]).reshape(t.shape)


def dequantize_rows(file: gf.GGUFFile, t: gf.TensorInfo, start: int = 0, stop: int | None = None) -> np.ndarray:
    try:
        return np.asarray(dequantize(file.rows(t, start, stop), t.qtype), dtype=np.float32)
    except NotImplementedError:
        raise QuantkitError(f"{file.path}: tensor {t.name} is {t.qtype.name}, which gguf-py cannot "
                            "dequantize") from None


def default_dtype(file: gf.GGUFFile) -> str:
    """float16 or bfloat16 when every matrix is stored so, else float32."""
    kinds = {t.qtype for t in file.tensors if len(t.shape) >= 2}
    return {frozenset({QType.F16}): "float16", frozenset({QType.BF16}): "bfloat16"}.get(frozenset(kinds), "float32")


def from_gguf(path: Path, dtype: str | None = None) -> FromGGUF:
    file = gf.read_gguf(path)
    meta = file.metadata
    config = gf.hf_config(meta, {t.name for t in file.tensors}, dtype or default_dtype(file))
    arch = gf.BY_GGUF_ARCH[meta["general.architecture"]]
    reverse = {g: hf for hf, g in gf.name_table(arch, config["num_hidden_layers"]).items()}
    names = {}
    for t in file.tensors:
        if t.name not in reverse:
            raise QuantkitError(f"{path}: tensor {t.name} has no HF name for {arch.gguf_arch}")
        names[reverse[t.name]] = t
    return FromGGUF(config, names, file, [])


def write_tokenizer_files(conv: FromGGUF, out: Path) -> list[str]:
    return write_hf_tokenizer(conv.file.metadata, Path(out), conv.warnings)


# ------------------------------------------------------------------------------ commands' entry points


def _check_file_output(src: Path, out: Path, force: bool) -> None:
    """A single-file OUT: never the source, replaced (only once complete) with --force."""
    if out.resolve() == src.resolve():
        raise QuantkitError(f"{out}: output is the source", "choose another OUT")
    if out.is_dir():
        raise QuantkitError(f"{out}: is a folder; GGUF output is a single .gguf file")
    if out.exists() and not force:
        raise QuantkitError(f"{out}: already exists", "pass --force to replace it")


def convert_to_gguf(src: str, out: Path, gguf_type: str = "F16", force: bool = False, revision: str | None = None,
                    progress: Callable[[int, int, str], None] | None = None) -> GGUFReport:
    """`quantkit convert SRC OUT.gguf --to gguf`: validated and planned before a weight is read."""
    from quantkit.pipeline import check_free_space
    from quantkit.source import open_checkpoint, resolve

    qtype = parse_type(gguf_type)
    checkpoint = open_checkpoint(resolve(src, revision))
    if checkpoint.quantization_config is not None:
        raise QuantkitError(f"{src}: is already quantized ({checkpoint.quantization_config.get('quant_method')})",
                            "dequantize it first: quantkit dequantize SRC DENSE")
    out = Path(out)
    _check_file_output(checkpoint.root, out, force)
    plan = plan_gguf(checkpoint.config, {n: i.shape for n, i in checkpoint.tensors.items()}, qtype)
    check_free_space(out, plan.nbytes)
    return to_gguf(checkpoint, out, qtype, progress)


@dataclass
class DenseResult:
    out: Path
    files: list[str]
    tensors: int
    dtype: str
    warnings: list[str]


def gguf_to_safetensors(src: Path, out: Path, dtype: str | None = None, force: bool = False,
                        max_shard_size: int = 5 * 10**9,
                        progress: Callable[[int, int, str], None] | None = None) -> DenseResult:
    """`convert MODEL.gguf OUT --to safetensors` / `dequantize MODEL.gguf OUT`: HF names, config.json,
    tokenizer files; every tensor dequantized by gguf-py, one at a time."""
    from quantkit.dtypes import BY_NAME, from_float32
    from quantkit.formats.safetensors import OutputTensor
    from quantkit.pipeline import check_free_space, check_output, write_config, write_staged

    conv = from_gguf(Path(src), dtype)
    dtype = conv.config["dtype"]
    if dtype not in BY_NAME:
        raise QuantkitError(f"--dtype {dtype}: not a float dtype", f"choose one of {', '.join(BY_NAME)}")
    st_dtype = BY_NAME[dtype]
    check_output(Path(src), Path(out), force)
    outputs = [OutputTensor(name, st_dtype, t.shape) for name, t in conv.names.items()]
    total = sum(o.nbytes for o in outputs)
    check_free_space(Path(out), total)
    def fill(writer) -> None:
        done = 0
        for o in outputs:
            for values in conv.chunks(o.name):
                writer.write(o.name, from_float32(values, st_dtype))
            writer.done(o.name)
            done += o.nbytes
            if progress:
                progress(done, total, o.name)

    def finish(folder: Path) -> list[str]:
        write_config(folder, conv.config)
        return ["config.json", *write_tokenizer_files(conv, folder)]

    files, extra = write_staged(Path(out), outputs, max_shard_size, fill, finish)
    files += extra
    return DenseResult(Path(out), files, len(outputs), dtype, conv.warnings)


def convert(src: str, out: Path, to: str, gguf_type: str = "F16", dtype: str | None = None, force: bool = False,
            revision: str | None = None, max_shard_size: int = 5 * 10**9,
            progress: Callable[[int, int, str], None] | None = None) -> dict:
    """`quantkit convert`: the GGUF directions; a summary for the CLI (and --json)."""
    out = Path(out)
    if to == "gguf":
        r = convert_to_gguf(src, out, gguf_type, force, revision, progress)
        return {"out": str(r.path), "to": "gguf", "gguf_type": gguf_type.upper(), "tensors": r.tensors,
                "output_bytes": r.bytes_written, "fallbacks": r.fallbacks, "warnings": r.warnings}
    if to == "safetensors" and Path(src).suffix == ".gguf":
        d = gguf_to_safetensors(Path(src), out, dtype, force, max_shard_size, progress)
        return {"out": str(d.out), "to": "safetensors", "dtype": d.dtype, "tensors": d.tensors, "files": d.files,
                "output_bytes": sum((d.out / f).stat().st_size for f in d.files), "fallbacks": [],
                "warnings": d.warnings}
    raise QuantkitError(f"convert {src} --to {to}: not supported yet",
                        "supported: --to gguf from a safetensors checkpoint, --to safetensors from a .gguf file")


# ---------------------------------------------------------------------------------------------- verify

# Relative weight error (||W - W'|| / ||W||) above which a tensor fails against its reference: about
# three times what each type gives on normally distributed weights (Q4_0 0.09, Q4_K 0.07, Q6_K 0.02, Q8_0 0.005).
ERROR_BOUND = {QType.F32: 1e-6, QType.F16: 1e-3, QType.BF16: 8e-3, QType.Q8_0: 0.03, QType.Q6_K: 0.06,
               QType.Q5_0: 0.12, QType.Q5_1: 0.12, QType.Q4_K: 0.25, QType.Q4_0: 0.25, QType.Q4_1: 0.25}


def verify_gguf(path: Path, reference: str | None = None, max_error: float | None = None):
    """verify's GGUF branch: leftovers, structure (offsets, sizes, alignment, names, metadata), finite
    values, and with a reference checkpoint each tensor's relative error. Damage is a failed check."""
    from quantkit import verify as v

    report = v.Report(str(path), [v.check_leftovers(Path(path))])
    try:
        conv = from_gguf(Path(path))
    except QuantkitError as e:
        report.checks.append(v.Check("structure", False, e.message))
        return report
    report.checks.append(v.Check("structure", True, f"{len(conv.names)} tensors; offsets, sizes and alignment "
                                 f"({conv.file.alignment}) within the file; names for {conv.config['architectures'][0]}"))
    missing, wrong = gf.shape_problems(conv.config, {name: t.shape for name, t in conv.names.items()})
    problems = wrong + missing
    report.checks.append(v.Check("metadata", not problems, v._first(problems, "tensor shapes agree with the sizes "
                                                                   "in the metadata")))
    ref = None
    if reference is not None:
        from quantkit.source import open_checkpoint, resolve

        ref = open_checkpoint(resolve(reference))
    not_finite = []
    for name, values in conv.tensors():
        t = conv.names[name]
        if not np.isfinite(values).all():
            not_finite.append(f"{t.name} ({t.qtype.name}) holds NaN or inf")
        if ref is not None:
            bound = max_error if max_error is not None else ERROR_BOUND.get(t.qtype, 0.15)
            report.layers.append(_compare(name, t.qtype.name, values, ref, bound))
    report.checks.append(v.Check("values", not not_finite, v._first(not_finite, "every tensor dequantizes to finite values")))
    if ref is not None:
        bad = [f"'{x.name}' differs from the reference beyond its bound" for x in report.layers if not x.ok]
        worst = max((x.rel_error for x in report.layers), default=0.0)
        report.checks.append(v.Check("reference", not bad, v._first(
            bad, f"{len(report.layers)} tensors within bounds (worst relative error {worst:.4f})")))
    return report


def _compare(name: str, scheme: str, values: np.ndarray, ref: Checkpoint, bound: float):
    from quantkit.verify import Layer, relative_error

    info = ref.tensors.get(name)
    if info is None or tuple(info.shape) != values.shape:
        return Layer(name, scheme, float("inf"), float("-inf"), bound, False)
    with ShardReader(info.file) as reader:
        expected = to_float32(reader.read(info), info.dtype)
    rel, snr = relative_error(expected, values)
    return Layer(name, scheme, rel, snr, bound, rel <= bound)
