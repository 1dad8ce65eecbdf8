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
from gguf import GGMLQuantizationType, LlamaFileType
from gguf.quants import dequantize

from quantkit.api import (
    ConvertRequest,
    DenseWeights,
    IntegerBlocks,
    PlannedTensor,
    Preview,
    Result,
    SourceTensor,
    TensorSource,
    first_of,
    folder_source,
    transcoding_summary,
)
from quantkit.dtypes import BY_NAME, from_float32, itemsize, to_float32
from quantkit.errors import QuantkitError
from quantkit.io.card import card_metadata, write_card
from quantkit.io.safetensors import OutputTensor, TensorInfo
from quantkit.io.source import Checkpoint, open_checkpoint, resolve
from quantkit.io.staged import bytes_on_disk, check_free_space, check_output, write_config, write_staged
from quantkit.io.stream import Entry, FiniteSink, Progress
from quantkit.methods.gguf import experts, legacy, mixes
from quantkit.methods.gguf import file as gf
from quantkit.methods.gguf import types as gguf_types
from quantkit.methods.gguf.imatrix import Imatrix, read_imatrix
from quantkit.methods.gguf.imatrix import weights_for as imatrix_weights
from quantkit.methods.gguf.metadata import card_from_general, general_from_card, write_general
from quantkit.methods.gguf.mixes import FILE_TYPES, Fallback, FileType, parse_file_type
from quantkit.methods.gguf.types import IGNORES_IMPORTANCE, TYPES
from quantkit.methods.gguf.vocab import read_vocab, write_hf_tokenizer
from quantkit.numerics import COPY_CHUNK, ErrorSums

QType = GGMLQuantizationType
__all__ = ["FILE_TYPES", "parse_file_type"]  # used by tests and the client tests beside this module's own
CHUNK_BYTES = COPY_CHUNK  # source bytes read and quantized per chunk
DENSE_KEPT = ("token_embd.weight", "output.weight")  # llama.cpp's embedding and head, in every architecture


@dataclass(frozen=True)
class GGUFEntry:
    hf_name: str
    out: gf.GGUFOutput
    permute_heads: int  # 0: no Q/K permutation, else the head count to permute with
    importance: bool = False  # quantized with the importance matrix's weights for this tensor
    experts: tuple[str, ...] = ()  # a merged expert tensor (hf_name its merged name): its experts' HF names
    shift: float = 0.0  # added to the values on the way to GGUF (gemma's norms), subtracted on the way back
    part: tuple[str, gf.Part] | None = None  # made from another source tensor (gpt-oss): its name, and how

    @property
    def sources(self) -> tuple[str, ...]:
        """The source tensors written one after the other into this GGUF tensor."""
        return self.experts or ((self.part[0],) if self.part else (self.hf_name,))


@dataclass
class GGUFPlan:
    arch: gf.Architecture
    hyper: gf.Hyper
    file_type: FileType
    entries: list[GGUFEntry]
    fallbacks: list[Fallback] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # tensors llama.cpp needs that the source lacks
    moe: experts.MoE | None = None  # a mixture of experts: its expert sizes

    @property
    def qtype(self) -> QType:
        """The file type's default tensor type (what the mix gives every tensor it does not single out)."""
        return self.file_type.default

    @property
    def nbytes(self) -> int:
        return sum(e.out.nbytes for e in self.entries)

    @property
    def file_type_value(self) -> int:
        """general.file_type: a float file with MXFP4 experts is MOSTLY_MXFP4_MOE, as llama.cpp's converter says."""
        mxfp4 = any(e.out.qtype == QType.MXFP4 for e in self.entries)
        if mxfp4 and self.qtype in (QType.F32, QType.F16, QType.BF16):
            return int(LlamaFileType.MOSTLY_MXFP4_MOE)
        return int(self.file_type.value)


def grouped_fallbacks(fallbacks: list[Fallback]) -> list[str]:
    """One line per (row length, wanted type, stored type): `181 tensors: rows of 576 do not hold Q4_K
    blocks of 256, stored as Q5_0`; a single tensor is named."""
    groups: dict[tuple, list[Fallback]] = {}
    for f in fallbacks:
        groups.setdefault((f.row_length, f.wanted, f.stored), []).append(f)
    return [str(group[0]) if len(group) == 1 else f"{len(group)} tensors: {str(group[0]).split(': ', 1)[1]}"
            for group in groups.values()]


def _check_importance(imatrix: Imatrix, name: str, qtype: QType, shape: tuple[int, ...]) -> bool:
    """Whether `name` is quantized with importance weights; refuses a type whose weighted path is missing."""
    if imatrix_weights(imatrix, name, shape[-1], math.prod(shape[:-2]) if len(shape) > 2 else 1) is None:
        return False
    if qtype in IGNORES_IMPORTANCE:
        return False
    if TYPES[qtype].weighted is None:
        raise QuantkitError(f"--imatrix: tensor {name} would be {qtype.name}, which quantkit cannot yet quantize "
                            "with importance weights", "choose a file type made of "
                            + ", ".join(q.name for q, t in TYPES.items() if t.weighted is not None)
                            + ", or leave out --imatrix")
    return True


def plan_gguf(config: dict, shapes: dict[str, tuple[int, ...]], file_type: FileType | str | QType,
              imatrix: Imatrix | None = None, scheme: str = "") -> GGUFPlan:
    """Every source tensor's GGUF name, type (llama-quantize's mix for `file_type`) and shape; no data read.
    `scheme`: the source's quantization (an MXFP4 source's experts stay MXFP4, as llama.cpp's converter keeps them)."""
    if not isinstance(file_type, FileType):
        file_type = parse_file_type(file_type if isinstance(file_type, str) else file_type.name)
    arch = gf.architecture_of(config)
    shapes = gf.kept_tensors(arch, config, shapes)
    hyper = gf.Hyper.from_config(config, len(shapes), arch)
    moe = experts.MoE.from_config(config, arch.experts) if arch.experts else None
    shapes, members = experts.merge_shapes(shapes, moe.n_expert) if moe else (shapes, {})
    shapes, made = experts.split_parts(shapes, arch.parts)
    # expert weights: an MXFP4 source's kept as its blocks; dense ones take the mix's type, as the others
    kept = {name for name, (_, part) in made.items() if part.transposed} if scheme == "mxfp4" else set()
    table = gf.name_table(arch, hyper.n_layers)
    missing, wrong = gf.shape_problems(arch, hyper.sizes(), shapes, moe)
    if wrong:
        raise QuantkitError(f"config.json and the weights disagree: {first_of(wrong)}",
                            "llama.cpp would refuse such a GGUF")
    unnamed = [name for name in shapes if name not in table]
    if unnamed:
        raise QuantkitError(f"tensor {unnamed[0]} has no GGUF name for {arch.gguf_arch}",
                            "is the checkpoint what its config.json says?")
    mix = mixes.tensor_types(file_type, arch.gguf_arch, hyper.n_layers,
                             [(table[name], tuple(shape)) for name, shape in shapes.items()],
                             n_head=hyper.n_head, n_head_kv=hyper.n_kv_head, n_expert=moe.n_expert if moe else 0,
                             has_imatrix=imatrix is not None)
    entries = []
    mix.fallbacks = [f for f in mix.fallbacks if f.name not in {table[name] for name in kept}]
    for hf_name, shape in shapes.items():
        gguf_name, t_type = table[hf_name], QType.MXFP4 if hf_name in kept else mix.types[table[hf_name]]
        heads = gf.permuted_heads(arch, hf_name, hyper.n_head, hyper.n_kv_head)
        if imatrix is None and file_type.name == "Q2_K_S" and t_type == QType.Q2_K:  # as llama-quantize
            raise QuantkitError(f"{gguf_name} would be Q2_K in a Q2_K_S file, which llama-quantize makes only with an "
                                "importance matrix", "pass --imatrix FILE (llama-imatrix writes one), or choose Q2_K")
        weighted = imatrix is not None and hf_name not in kept and _check_importance(imatrix, gguf_name, t_type, tuple(shape))
        entries.append(GGUFEntry(hf_name, gf.GGUFOutput(gguf_name, tuple(shape), t_type), heads, weighted,
                                 tuple(members.get(hf_name, ())), arch.shift(hf_name), made.get(hf_name)))
    return GGUFPlan(arch, hyper, file_type, entries, mix.fallbacks, missing, moe)


@dataclass
class GGUFReport:
    path: Path
    bytes_written: int
    tensors: int
    fallbacks: list[Fallback]
    warnings: list[str]
    lossless: list[str] = field(default_factory=list)  # quantized source tensors moved without rounding
    requantized: dict[str, ErrorSums] = field(default_factory=dict)  # the others: error against the source


def _metadata(checkpoint: Checkpoint, plan: GGUFPlan, vocab) -> Callable:
    general = general_from_card(card_metadata(checkpoint.root))  # as llama.cpp's converter fills general.*

    def add_metadata(writer) -> None:
        writer.add_name(str(general.get("general.name", checkpoint.name)))
        write_general(writer, {k: v for k, v in general.items() if k != "general.name"})
        gf.write_hyper(writer, plan.hyper)
        if plan.moe:
            plan.moe.write(writer)
        writer.add_file_type(plan.file_type_value)
        writer.add_quantization_version(2)
        if vocab is not None:
            vocab.write(writer)

    return add_metadata


def _source_rows(tensor: SourceTensor, permute_heads: int, shift: float = 0.0) -> Iterator[np.ndarray]:
    """Row chunks of a source tensor; Q/K with a head permutation come whole (rows move); with a shift
    (gemma's norms), as float32 values plus the shift."""
    if shift:
        yield to_float32(next(tensor.chunks(tensor.shape[0])), tensor.dtype) + np.float32(shift)
        return
    if permute_heads:
        yield gf.permute_qk(next(tensor.chunks(tensor.shape[0])), permute_heads)
        return
    row_bytes = math.prod(tensor.shape[1:]) * itemsize(tensor.dtype)
    yield from tensor.chunks(max(1, CHUNK_BYTES // row_bytes))


def _quantized(rows: Iterator[np.ndarray], dtype: str, qtype: QType, importance: np.ndarray | None = None,
               error: ErrorSums | None = None) -> Iterator[np.ndarray]:
    """GGUF blocks of each chunk (with importance weights where given); with `error`, each chunk's error
    against the blocks' own values is summed."""
    for chunk in rows:
        chunk = chunk.reshape(-1, chunk.shape[-1]) if chunk.ndim > 1 else chunk[None]
        if importance is None:
            data = gguf_types.quantize_stored(chunk, dtype, qtype)
        else:
            data = gguf_types.quantize_weighted(chunk, dtype, qtype, importance)
        if error is not None:
            values = gguf_types.block_values(data, qtype, chunk.shape[-1]) if qtype in legacy.INTEGER_BITS else dequantize(data, qtype)
            error.add(to_float32(chunk, dtype), values)
        yield data


def _entry_data(e: GGUFEntry, tensors: Iterator[tuple[Entry, SourceTensor]], report: GGUFReport,
                imatrix: Imatrix | None) -> Iterator[np.ndarray]:
    """A GGUF tensor's data from its source tensors, taken from the stream one at a time as they are
    written: a merged expert tensor is its experts' blocks one after the other."""
    if e.part is not None:
        _, tensor = next(tensors)
        yield from _part_data(tensor, e, report, imatrix)
        return
    for expert in range(len(e.sources)):
        _, tensor = next(tensors)
        yield from _tensor_data(tensor, e, report, imatrix, expert)


def _part_data(tensor: SourceTensor, e: GGUFEntry, report: GGUFReport, imatrix: Imatrix | None) -> Iterator[np.ndarray]:
    """A tensor made from part of a source tensor (gpt-oss): MXFP4 experts as ggml's blocks of the source's
    own codes and scales, dense experts turned [out, in] and quantized, both one expert at a time; small
    dense ones (biases, sinks) sliced whole."""
    part = e.part[1]
    if e.out.qtype == QType.MXFP4:
        stored = tensor.mxfp4()
        if stored is None:
            raise QuantkitError(f"tensor {tensor.name}: no MXFP4 blocks to keep", "convert the release as published")
        if tensor.name not in report.lossless:
            report.lossless.append(tensor.name)
        picked = slice(part.index, None, part.parts)  # the source's blocks are [expert, out, in / 32, 16]
        for expert in range(stored.shape[0]):
            blocks, scales = stored.read(expert, expert + 1)
            yield experts.ggml_mxfp4(blocks[0, picked], scales[0, picked])
        return
    if part.transposed:
        for expert, values in enumerate(tensor.chunks(1)):
            importance = imatrix_weights(imatrix, e.out.name, e.out.shape[-1], e.out.shape[0])[expert] if e.importance else None
            yield from _quantized(iter([np.ascontiguousarray(part.take(values[0]))]), tensor.dtype, e.out.qtype, importance)
        return
    yield from _quantized(iter([part.take(next(tensor.chunks(tensor.shape[0])))]), tensor.dtype, e.out.qtype)


def _tensor_data(tensor: SourceTensor, e: GGUFEntry, report: GGUFReport, imatrix: Imatrix | None,
                 expert: int = 0) -> Iterator[np.ndarray]:
    """A source tensor's GGUF data (expert `expert` of a merged one): a quantized source's integers as they are
    where the type holds them (Q4_0, Q8_0), else quantized from its values (the error measured when those
    were themselves dequantized)."""
    bits = legacy.INTEGER_BITS.get(e.out.qtype)
    blocks = tensor.integers() if tensor.scheme and bits and not e.shift else None
    blocks = blocks.regroup(legacy.INTEGER_BLOCK) if blocks is not None and blocks.bits <= bits else None
    if blocks is not None:
        q, d = blocks.q, blocks.d
        if e.permute_heads:
            q, d = gf.permute_qk(q, e.permute_heads), gf.permute_qk(d, e.permute_heads)
        report.lossless.append(tensor.name)
        return iter([gguf_types.integer_blocks(q, d, e.out.qtype)])
    error = report.requantized.setdefault(tensor.name, ErrorSums()) if tensor.scheme else None
    importance = imatrix_weights(imatrix, e.out.name, e.out.shape[-1], len(e.sources))[expert] if e.importance else None
    rows = _source_rows(tensor, e.permute_heads, e.shift)
    return _quantized(rows, "F32" if e.shift else tensor.dtype, e.out.qtype, importance, error)


def to_gguf(checkpoint: Checkpoint, out: Path, file_type: FileType | str | QType,
            progress: Callable[[int, int, str], None] | None = None, force: bool = True,
            source: TensorSource | None = None, imatrix: Imatrix | None = None) -> GGUFReport:
    """Write `out` (.gguf) from a checkpoint folder (dense or quantized; or any `source`), one tensor at a
    time, in storage order; with an importance matrix, the tensors it covers are quantized with its weights,
    as `llama-quantize --imatrix`. `force`: whether an OUT that another run wrote since the caller's checks
    may be replaced."""
    source = source or folder_source(checkpoint)
    checkpoint = source.checkpoint
    shapes = {name: info.shape for name, info in checkpoint.tensors.items()}
    plan = plan_gguf(checkpoint.config, shapes, file_type, imatrix, source.scheme)
    warnings: list[str] = list(plan.moe.warnings) if plan.moe else []
    if plan.missing:
        warnings.append(f"llama.cpp will not load this GGUF: {first_of(plan.missing)}")
    add_metadata = _metadata(checkpoint, plan, read_vocab(checkpoint.root, checkpoint.config, plan.hyper.vocab, warnings))

    report = GGUFReport(Path(out), 0, len(plan.entries), plan.fallbacks, warnings)

    def chunks():
        done, total = 0, plan.nbytes
        tensors = source.stream([Entry(name, "gguf") for e in plan.entries for name in e.sources])
        for e in plan.entries:
            yield e.out, _entry_data(e, tensors, report, imatrix)
            done += e.out.nbytes
            if progress:
                progress(done, total, e.hf_name)

    report.bytes_written = gf.write_gguf(Path(out), plan.arch.gguf_arch, add_metadata, [e.out for e in plan.entries], chunks(), force)
    return report


# ------------------------------------------------------------------------------------------ GGUF -> HF


@dataclass
class FromGGUF:
    config: dict
    names: dict[str, gf.GGUFTensor]  # HF name -> stored tensor (one expert's rows: a view of its layer's)
    stored_shapes: dict[str, tuple[int, ...]]  # HF names as the file stores them (a layer's experts merged)
    file: gf.GGUFFile
    warnings: list[str]

    def chunks(self, hf_name: str, max_bytes: int = CHUNK_BYTES) -> Iterator[np.ndarray]:
        """float32 row chunks of one tensor, in HF order (Q/K, whose rows move, come whole)."""
        t = self.names[hf_name]
        heads = self.permuted(hf_name)
        if heads:
            yield gf.unpermute_qk(self.values(hf_name).reshape(t.shape), heads)
            return
        n_rows = math.prod(t.shape[:-1])
        step = max(1, max_bytes // (4 * t.shape[-1]))
        for start in range(0, n_rows, step):
            yield self.values(hf_name, start, start + step)

    @property
    def arch(self) -> gf.Architecture:
        return gf.gguf_architecture(self.file.metadata)

    def hf_model(self) -> FromGGUF:
        """Itself, where its tensors map back to a Hugging Face model (every architecture but gpt-oss)."""
        if not self.arch.to_hf:
            raise QuantkitError(f"{self.file.path}: GGUF of {self.arch.gguf_arch} cannot go back to safetensors yet",
                                "convert the source checkpoint instead")
        return self

    def values(self, hf_name: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Stored rows [start, stop) as float32 in HF's terms (gemma's norms: the converter's +1 taken off)."""
        values = dequantize_rows(self.file, self.names[hf_name], start, stop)
        shift = self.arch.shift(hf_name)
        return values - np.float32(shift) if shift else values

    def permuted(self, hf_name: str) -> int:
        """The head count Q/K rows are permuted with between HF and GGUF order (0: not permuted)."""
        return gf.permuted_heads(self.arch, hf_name, self.config["num_attention_heads"], self.config["num_key_value_heads"])

    def shape_problems(self) -> tuple[list[str], list[str]]:
        """(missing, wrong) tensors against the sizes in the metadata, as gf.shape_problems (each layer's
        experts as the file stores them: one tensor per role)."""
        moe = experts.MoE.from_config(self.config, self.arch.experts) if self.arch.experts else None
        return gf.shape_problems(self.arch, self.config, self.stored_shapes, moe)

    def to_stored_order(self, hf_name: str, values: np.ndarray) -> np.ndarray:
        """A tensor in HF order (any dtype) rearranged to the GGUF's row order."""
        heads = self.permuted(hf_name)
        return gf.permute_qk(values, heads) if heads else values

    def whole(self, hf_name: str) -> np.ndarray:
        """One tensor as float32, whole."""
        return np.concatenate([c.reshape(-1) for c in self.chunks(hf_name)]).reshape(self.names[hf_name].shape)

    def rows(self, hf_name: str, rows: int, dtype: str) -> Iterator[np.ndarray]:
        """Chunks of exactly `rows` rows (a 1-D tensor: whole), as stored bits of `dtype`."""
        t = self.names[hf_name]
        if len(t.shape) == 1:
            yield from_float32(self.values(hf_name).reshape(t.shape), dtype)
            return
        if self.permuted(hf_name):
            whole = from_float32(next(self.chunks(hf_name)), dtype)
            yield from (whole[start : start + rows] for start in range(0, whole.shape[0], rows))
            return
        for start in range(0, t.shape[0], rows):
            yield from_float32(self.values(hf_name, start, start + rows), dtype).reshape(-1, *t.shape[1:])

    def integers(self, hf_name: str) -> IntegerBlocks | None:
        """A Q4_0 / Q8_0 matrix as IntegerBlocks in HF row order; None for other types."""
        t = self.names[hf_name]
        if t.qtype not in legacy.INTEGER_BITS or len(t.shape) != 2:
            return None
        q, d = gguf_types.block_integers(self.file.rows(t), t.qtype, t.shape[-1])
        heads = self.permuted(hf_name)
        if heads:
            q, d = gf.unpermute_qk(q, heads), gf.unpermute_qk(d, heads)
        return IntegerBlocks(legacy.INTEGER_BITS[t.qtype], legacy.INTEGER_BLOCK, q, d)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(HF name, whole float32 tensor) one at a time."""
        for hf_name in self.names:
            yield hf_name, self.whole(hf_name)

    def weights(self) -> DenseWeights:
        """The tensors as verify --logits reads them; rows of any matrix whose rows stay in place."""
        self.hf_model()
        by_rows = frozenset(n for n, t in self.names.items() if len(t.shape) == 2 and not self.permuted(n))

        def read_rows(hf_name: str, start: int, stop: int) -> np.ndarray:
            return self.values(hf_name, start, stop).reshape(stop - start, self.names[hf_name].shape[-1])

        def tokenizer(scratch: Path) -> Path:
            write_hf_tokenizer(self.file.metadata, scratch, self.warnings)
            return scratch

        return DenseWeights(self.config, {n: t.shape for n, t in self.names.items()}, self.whole, read_rows, by_rows, tokenizer)


def dequantize_rows(file: gf.GGUFFile, t: gf.GGUFTensor, start: int = 0, stop: int | None = None) -> np.ndarray:
    try:
        with np.errstate(all="ignore"):  # damaged blocks give NaN or inf: a finding or an error, not a warning
            return np.asarray(dequantize(file.rows(t, start, stop), t.qtype), dtype=np.float32)
    except NotImplementedError:
        raise QuantkitError(f"{file.path}: tensor {t.name} is {t.qtype.name}, which gguf-py cannot "
                            "dequantize") from None


def default_dtype(file: gf.GGUFFile) -> str:
    """float16 when every matrix is stored so, else bfloat16 (half the bytes of float32, the range of the
    model; `--dtype float32` keeps the dequantized values exactly)."""
    kinds = {t.qtype for t in file.tensors if len(t.shape) >= 2}
    return "float16" if kinds == {QType.F16} else "bfloat16"


def from_gguf(path: Path, dtype: str | None = None) -> FromGGUF:
    file = gf.read_gguf(path)
    meta = file.metadata
    config = gf.hf_config(meta, {t.name for t in file.tensors}, dtype or default_dtype(file))
    arch = gf.gguf_architecture(meta)
    if arch.experts:
        config |= experts.hf_config(meta, arch.gguf_arch, arch.experts)
    reverse = {g: hf for hf, g in gf.name_table(arch, config["num_hidden_layers"]).items()}
    names = {}
    for t in file.tensors:
        if t.name not in reverse:
            raise QuantkitError(f"{path}: tensor {t.name} has no HF name for {arch.gguf_arch}")
        if ".experts." not in reverse[t.name] or not arch.to_hf:  # gpt-oss: kept as stored, under the converter's names
            names[reverse[t.name]] = t
        elif len(t.shape) != 3:
            raise QuantkitError(f"{path}: tensor {t.name} has shape {list(t.shape)}, not (experts, rows, columns)")
        else:
            names |= experts.split(t, reverse[t.name])
    return FromGGUF(config, names, {reverse[t.name]: t.shape for t in file.tensors}, file, [])


def gguf_source(path: Path, dtype: str | None = None) -> TensorSource:
    """A GGUF file as dense tensors with HF names (api.TensorSource): each tensor dequantized by gguf-py when
    it is read, Q4_0 / Q8_0 also as their integers; the tokenizer comes back as HF files, general.* as card
    metadata."""
    conv = from_gguf(Path(path), dtype).hf_model()
    st_dtype = BY_NAME[conv.config["dtype"]]

    def dense_dtype(t: gf.GGUFTensor) -> str:
        # A layer's Q4_0 / Q8_0 values q * d are float32 values (as a quantized folder's modules are): a target
        # whose scales take the source's dtype (compressed-tensors) can then hold d exactly. Embedding and
        # head, which targets keep dense, stay in the model's dtype (float32 would double them).
        return "F32" if t.qtype in legacy.INTEGER_BITS and t.name not in DENSE_KEPT else st_dtype

    tensors = {}
    for name, t in sorted(conv.names.items(), key=lambda item: item[1].offset):
        kind = dense_dtype(t)
        tensors[name] = TensorInfo(name, kind, t.shape, conv.file.path, t.offset, t.offset + math.prod(t.shape) * itemsize(kind))
    view = Checkpoint(Path(path), conv.config, [conv.file.path], tensors)

    def stream(entries: list[Entry]) -> Iterator[tuple[Entry, SourceTensor]]:
        for entry in entries:
            t = conv.names[entry.source]
            kind = dense_dtype(t)
            scheme = "" if t.qtype in (QType.F32, QType.F16, QType.BF16) else t.qtype.name
            yield entry, SourceTensor(entry.source, t.shape, kind, lambda rows, name=entry.source, kind=kind: conv.rows(name, rows, kind),
                                      scheme, lambda name=entry.source: conv.integers(name))

    return TensorSource(view, "gguf", stream, lambda folder: write_tokenizer_files(conv, folder),
                        card_from_general(conv.file.metadata))


def write_tokenizer_files(conv: FromGGUF, out: Path) -> list[str]:
    return write_hf_tokenizer(conv.file.metadata, Path(out), conv.warnings)


# ------------------------------------------------------------------------------ commands' entry points


def convert_to_gguf(request: ConvertRequest, progress: Progress) -> Result:
    """`quantkit convert SRC OUT.gguf --to gguf`: validated and planned before a weight is read."""
    file_type = parse_file_type(request.gguf_type)
    imatrix = read_imatrix(request.imatrix) if request.imatrix else None
    source = request.source or folder_source(open_checkpoint(resolve(request.src, request.revision)))
    if source.scheme == "gguf":
        raise QuantkitError(f"{request.src}: is a GGUF file already", "convert it --to safetensors, or quantize it")
    checkpoint = source.checkpoint
    out = Path(request.out)
    check_output(checkpoint.root, out, request.force, single_file=True)
    plan = plan_gguf(checkpoint.config, {n: i.shape for n, i in checkpoint.tensors.items()}, file_type, imatrix, source.scheme)
    check_free_space(out, plan.nbytes)
    r = to_gguf(checkpoint, out, file_type, progress, force=request.force, source=source, imatrix=imatrix)
    fallbacks = [{"tensor": f.name, "row_length": f.row_length, "wanted": f.wanted.name, "stored": f.stored.name}
                 for f in r.fallbacks]
    summary = {"to": "gguf", "gguf_type": file_type.name, "tensors": r.tensors, "output_bytes": r.bytes_written,
               "fallbacks": fallbacks, "imatrix": str(request.imatrix) if request.imatrix else None, "warnings": r.warnings}
    if source.scheme:
        summary |= transcoding_summary(source.scheme, r.lossless, r.requantized)
    return Result(r.path, [r.path.name], summary, [f"warning: {line}" for line in grouped_fallbacks(r.fallbacks) + r.warnings])


def preview_gguf(request: ConvertRequest) -> Preview:
    """What `convert SRC OUT.gguf --to gguf --gguf-type T` would write: each tensor's GGUF name and type
    (the file type's mix, fallbacks named), the file's exact bytes (metadata and vocabulary included).
    Reads no weight data."""
    file_type = parse_file_type(request.gguf_type)
    imatrix = read_imatrix(request.imatrix) if request.imatrix else None
    source = request.source or folder_source(open_checkpoint(resolve(request.src, request.revision)))
    checkpoint = source.checkpoint
    plan = plan_gguf(checkpoint.config, {n: i.shape for n, i in checkpoint.tensors.items()}, file_type, imatrix, source.scheme)
    qtype = plan.qtype
    warnings: list[str] = list(plan.moe.warnings) if plan.moe else []
    warnings += [f"llama.cpp will not load this GGUF: {first_of(plan.missing)}"] if plan.missing else []
    add_metadata = _metadata(checkpoint, plan, read_vocab(checkpoint.root, checkpoint.config, plan.hyper.vocab, warnings))
    outputs = [e.out for e in plan.entries]
    tensors = []
    for e in plan.entries:
        reason = e.out.qtype.name + (" (1-D or norm: F32, as llama.cpp keeps them)" if e.out.qtype == QType.F32 and qtype != QType.F32 else "")
        reason += f" ({file_type.name} gives it more bits than {qtype.name}, or a fallback)" if e.out.qtype not in (qtype, QType.F32, QType.MXFP4) else ""
        reason += ", with importance weights" if e.importance else ""
        reason += f", Q/K rows permuted for {e.permute_heads} heads" if e.permute_heads else ""
        reason += f", merged from {len(e.experts)} experts ({e.experts[0]}, ...)" if e.experts else ""
        reason += f", part {e.part[1].index + 1} of {e.part[1].parts} of {e.part[0]}" if e.part and e.part[1].parts > 1 else ""
        reason += ", its MXFP4 blocks kept as they are" if e.out.qtype == QType.MXFP4 else ""
        tensors.append(PlannedTensor(e.hf_name, "convert", reason, [{"name": e.out.name, "dtype": e.out.qtype.name,
                                                                   "shape": list(e.out.shape), "nbytes": e.out.nbytes}]))
    whole = max((4 * math.prod(checkpoint.tensors[e.hf_name].shape) for e in plan.entries if e.permute_heads), default=0)
    name = Path(request.out).name if request.out else "model.gguf"
    return Preview(f"gguf {file_type.name}", tensors, {name: gf.gguf_file_bytes(plan.arch.gguf_arch, add_metadata, outputs)},
                   working_bytes=max(3 * whole, 4 * CHUNK_BYTES),
                   warnings=[f"warning: {line}" for line in grouped_fallbacks(plan.fallbacks) + warnings],
                   settings={"gguf_type": file_type.name})


def gguf_presets() -> dict[str, dict]:
    """inspect's size table: every file type quantkit writes."""
    return {f"gguf-{name}": {"gguf_type": name} for name in FILE_TYPES}


def gguf_to_safetensors(src: Path, out: Path, dtype: str | None = None, force: bool = False,
                        max_shard_size: int = 5 * 10**9, progress: Progress | None = None) -> Result:
    """`convert MODEL.gguf OUT --to safetensors` / `dequantize MODEL.gguf OUT`: HF names, config.json,
    tokenizer files; every tensor dequantized by gguf-py, one at a time."""
    conv = from_gguf(Path(src), dtype).hf_model()
    dtype = conv.config["dtype"]
    if dtype not in BY_NAME:
        raise QuantkitError(f"--dtype {dtype}: not a float dtype", f"choose one of {', '.join(BY_NAME)}")
    st_dtype = BY_NAME[dtype]
    _, wrong = conv.shape_problems()
    if wrong:
        raise QuantkitError(f"{src}: {first_of(wrong)}", "the tensors disagree with the GGUF's metadata; "
                                                         "transformers could not load the output")
    out = Path(out)
    check_output(Path(src), out, force)
    outputs = [OutputTensor(name, st_dtype, t.shape) for name, t in conv.names.items()]
    total = sum(o.nbytes for o in outputs)
    check_free_space(out, total)

    def fill(writer) -> None:
        writer = FiniteSink(writer, st_dtype, Path(src))
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
        card = write_card(folder, str(src), None, f"converted from GGUF ({Path(src).name}) to {dtype}",
                          ["gguf", "dequantized"], {"from": "gguf", "file_type": conv.file.metadata.get("general.file_type"),
                                                    "dtype": dtype}, carried=card_from_general(conv.file.metadata))
        return ["config.json", *write_tokenizer_files(conv, folder), card]

    files, extra = write_staged(out, outputs, max_shard_size, fill, finish, force=force)
    files += extra
    return Result(out, files, {"to": "safetensors", "dtype": dtype, "tensors": len(outputs),
                               "output_bytes": bytes_on_disk(out, files), "fallbacks": [],
                               "warnings": conv.warnings},
                  [f"warning: {line}" for line in conv.warnings])
