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
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize

from quantkit.api import ConvertRequest, DenseWeights, Result, first_of
from quantkit.dtypes import BY_NAME, from_float32
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import OutputTensor, ShardReader, TensorInfo, iter_row_chunks
from quantkit.io.source import Checkpoint, open_checkpoint, resolve
from quantkit.io.staged import bytes_on_disk, check_file_output, check_free_space, check_output, write_config, write_staged
from quantkit.io.stream import Progress
from quantkit.methods.gguf import file as gf
from quantkit.methods.gguf import types as gguf_types
from quantkit.methods.gguf.types import FILE_TYPE, GGUF_TYPES, TYPES, fits, parse_type
from quantkit.methods.gguf.vocab import read_vocab, write_hf_tokenizer
from quantkit.modules import shape_problems
from quantkit.numerics import COPY_CHUNK

QType = GGMLQuantizationType
__all__ = ["FILE_TYPE", "GGUF_TYPES", "parse_type"]  # used by tests and the client tests beside this module's own
CHUNK_BYTES = COPY_CHUNK  # source bytes read and quantized per chunk


@dataclass(frozen=True)
class GGUFEntry:
    hf_name: str
    out: gf.GGUFOutput
    permute_heads: int  # 0: no Q/K permutation, else the head count to permute with


@dataclass
class GGUFPlan:
    arch: gf.Architecture
    hyper: gf.Hyper
    qtype: QType
    entries: list[GGUFEntry]
    fallbacks: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # tensors llama.cpp needs that the source lacks

    @property
    def nbytes(self) -> int:
        return sum(e.out.nbytes for e in self.entries)


def _tensor_type(name: str, shape: tuple[int, ...], want: QType, fallbacks: list[str]) -> QType:
    if len(shape) < 2 or name.endswith("_norm.weight"):
        return QType.F32  # norms and 1-D tensors stay F32, as llama.cpp's converter keeps them
    chosen = want
    if not fits(chosen, shape[-1]) and TYPES[chosen].fallback is not None:
        chosen = TYPES[chosen].fallback
    if not fits(chosen, shape[-1]):
        chosen = QType.F16
    if chosen != want:
        fallbacks.append(f"{name}: rows of {shape[-1]} do not fit {want.name} blocks of "
                         f"{GGML_QUANT_SIZES[want][0]}; stored as {chosen.name}")
    return chosen


def plan_gguf(config: dict, shapes: dict[str, tuple[int, ...]], qtype: QType) -> GGUFPlan:
    """Every source tensor's GGUF name, type and shape; no data read."""
    arch = gf.architecture_of(config)
    hyper = gf.Hyper.from_config(config)
    table = gf.name_table(arch, hyper.n_layers)
    missing, wrong = shape_problems(config, shapes)
    if wrong:
        raise QuantkitError(f"config.json and the weights disagree: {first_of(wrong)}",
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
        entries.append(GGUFEntry(hf_name, gf.GGUFOutput(gguf_name, tuple(shape), t_type), heads))
    return GGUFPlan(arch, hyper, qtype, entries, fallbacks, missing)


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
        yield gguf_types.quantize_stored(chunk.reshape(-1, chunk.shape[-1]) if chunk.ndim > 1 else chunk[None], dtype, qtype)


def to_gguf(checkpoint: Checkpoint, out: Path, qtype: QType,
            progress: Callable[[int, int, str], None] | None = None) -> GGUFReport:
    """Write `out` (.gguf) from a safetensors checkpoint, one shard open at a time, in shard order."""
    shapes = {name: info.shape for name, info in checkpoint.tensors.items()}
    plan = plan_gguf(checkpoint.config, shapes, qtype)
    warnings: list[str] = []
    if plan.missing:
        warnings.append(f"llama.cpp will not load this GGUF: {first_of(plan.missing)}")
    vocab = read_vocab(checkpoint.root, checkpoint.config, warnings)

    def add_metadata(writer) -> None:
        writer.add_name(checkpoint.root.name)
        gf.write_hyper(writer, plan.hyper)
        writer.add_file_type(int(TYPES[qtype].file_type))
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
    names: dict[str, gf.GGUFTensor]  # HF name -> stored tensor
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

    def tensor(self, hf_name: str) -> np.ndarray:
        """One whole tensor, float32, in HF order."""
        return np.concatenate([c.reshape(-1) for c in self.chunks(hf_name)]).reshape(self.names[hf_name].shape)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(HF name, whole float32 tensor) one at a time."""
        for hf_name in self.names:
            yield hf_name, self.tensor(hf_name)

    def weights(self) -> DenseWeights:
        """The tensors as verify --logits reads them; rows of any matrix whose rows stay in place."""
        arch = gf.BY_GGUF_ARCH[self.file.metadata["general.architecture"]]
        heads = (self.config["num_attention_heads"], self.config["num_key_value_heads"])
        by_rows = frozenset(n for n, t in self.names.items() if len(t.shape) == 2 and not gf.permuted_heads(arch, n, *heads))

        def read_rows(hf_name: str, start: int, stop: int) -> np.ndarray:
            t = self.names[hf_name]
            return dequantize_rows(self.file, t, start, stop).reshape(stop - start, t.shape[-1])

        def tokenizer(scratch: Path) -> Path:
            write_hf_tokenizer(self.file.metadata, scratch, self.warnings)
            return scratch

        return DenseWeights(self.config, {n: t.shape for n, t in self.names.items()}, self.tensor, read_rows, by_rows, tokenizer)


def dequantize_rows(file: gf.GGUFFile, t: gf.GGUFTensor, start: int = 0, stop: int | None = None) -> np.ndarray:
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


def convert_to_gguf(request: ConvertRequest, progress: Progress) -> Result:
    """`quantkit convert SRC OUT.gguf --to gguf`: validated and planned before a weight is read."""
    qtype = parse_type(request.gguf_type)
    checkpoint = open_checkpoint(resolve(request.src, request.revision))
    if checkpoint.quantization_config is not None:
        raise QuantkitError(f"{request.src}: is already quantized ({checkpoint.quantization_config.get('quant_method')})",
                            "dequantize it first: quantkit dequantize SRC DENSE")
    out = Path(request.out)
    check_file_output(checkpoint.root, out, request.force)
    plan = plan_gguf(checkpoint.config, {n: i.shape for n, i in checkpoint.tensors.items()}, qtype)
    check_free_space(out, plan.nbytes)
    r = to_gguf(checkpoint, out, qtype, progress)
    return Result(r.path, [r.path.name], {"to": "gguf", "gguf_type": request.gguf_type.upper(), "tensors": r.tensors,
                                           "output_bytes": r.bytes_written, "fallbacks": r.fallbacks,
                                           "warnings": r.warnings},
                  [f"warning: {line}" for line in r.fallbacks + r.warnings])


def gguf_to_safetensors(src: Path, out: Path, dtype: str | None = None, force: bool = False,
                        max_shard_size: int = 5 * 10**9, progress: Progress | None = None) -> Result:
    """`convert MODEL.gguf OUT --to safetensors` / `dequantize MODEL.gguf OUT`: HF names, config.json,
    tokenizer files; every tensor dequantized by gguf-py, one at a time."""
    conv = from_gguf(Path(src), dtype)
    dtype = conv.config["dtype"]
    if dtype not in BY_NAME:
        raise QuantkitError(f"--dtype {dtype}: not a float dtype", f"choose one of {', '.join(BY_NAME)}")
    st_dtype = BY_NAME[dtype]
    out = Path(out)
    check_output(Path(src), out, force)
    outputs = [OutputTensor(name, st_dtype, t.shape) for name, t in conv.names.items()]
    total = sum(o.nbytes for o in outputs)
    check_free_space(out, total)

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

    files, extra = write_staged(out, outputs, max_shard_size, fill, finish)
    files += extra
    return Result(out, files, {"to": "safetensors", "dtype": dtype, "tensors": len(outputs),
                               "output_bytes": bytes_on_disk(out, files), "fallbacks": [],
                               "warnings": conv.warnings},
                  [f"warning: {line}" for line in conv.warnings])
