"""GGUF files: tensor names (HF <-> llama.cpp, through gguf's own TensorNameMap), the Q/K head
permutation, architecture metadata both ways, a bounds-checked reader and a streamed writer.

The reader parses the header itself and checks every count, length and offset against the file size
before anything is allocated: gguf's GGUFReader trusts its input. The writer uses gguf's GGUFWriter
for header, metadata and tensor infos, then streams tensor data as it is produced.
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from gguf import (
    GGML_QUANT_SIZES,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    MODEL_ARCH,
    GGMLQuantizationType,
    GGUFValueType,
    GGUFWriter,
    LlamaFileType,
    get_tensor_name_map,
)

from quantkit.errors import InternalError, QuantkitError
from quantkit.io.outfile import OutputFile
from quantkit.io.source import architectures
from quantkit.io.staged import StagedFile, check_clobber, output_lock

QType = GGMLQuantizationType

# --------------------------------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Architecture:
    gguf_arch: str  # general.architecture
    model_arch: MODEL_ARCH
    hf_class: str  # what GGUF -> HF writes back
    model_type: str
    permute_qk: bool  # llama.cpp's converter permutes Q/K heads for llama-family rope only
    experts: str = ""  # mixture of experts: its layout in experts.LAYOUTS ("" for a dense model)


ARCHITECTURES = {
    "LlamaForCausalLM": Architecture("llama", MODEL_ARCH.LLAMA, "LlamaForCausalLM", "llama", True),
    "MistralForCausalLM": Architecture("llama", MODEL_ARCH.LLAMA, "LlamaForCausalLM", "llama", True),
    "Qwen2ForCausalLM": Architecture("qwen2", MODEL_ARCH.QWEN2, "Qwen2ForCausalLM", "qwen2", False),
    "MixtralForCausalLM": Architecture("llama", MODEL_ARCH.LLAMA, "MixtralForCausalLM", "mixtral", True, "mixtral"),
    "Qwen2MoeForCausalLM": Architecture("qwen2moe", MODEL_ARCH.QWEN2MOE, "Qwen2MoeForCausalLM", "qwen2_moe", False, "qwen2_moe"),
    "Qwen3MoeForCausalLM": Architecture("qwen3moe", MODEL_ARCH.QWEN3MOE, "Qwen3MoeForCausalLM", "qwen3_moe", False, "qwen3_moe"),
}
BY_GGUF_ARCH = {"llama": ARCHITECTURES["LlamaForCausalLM"], "qwen2": ARCHITECTURES["Qwen2ForCausalLM"],
                "qwen2moe": ARCHITECTURES["Qwen2MoeForCausalLM"], "qwen3moe": ARCHITECTURES["Qwen3MoeForCausalLM"]}


def gguf_architecture(meta: dict[str, Any]) -> Architecture:
    """The architecture a GGUF's metadata names (llama with experts: Mixtral, as llama.cpp reads it)."""
    arch_name = meta.get("general.architecture")
    if not isinstance(arch_name, str) or arch_name not in BY_GGUF_ARCH:
        raise QuantkitError(f"GGUF architecture {arch_name!r} is not supported yet",
                            f"supported: {', '.join(BY_GGUF_ARCH)}")
    if arch_name == "llama" and meta.get("llama.expert_count"):
        return ARCHITECTURES["MixtralForCausalLM"]
    return BY_GGUF_ARCH[arch_name]


def architecture_of(config: dict, where: str = "config.json") -> Architecture:
    names = architectures(config)
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise QuantkitError(
        f"{where}: GGUF output for architecture {', '.join(names) or config.get('model_type', '?')} "
        "is not supported yet", f"supported: {', '.join(ARCHITECTURES)}")


# ----------------------------------------------------------------------------------------------- names


def _hf_names(n_layers: int, experts: bool = False) -> list[str]:
    """Every tensor name these architectures can have (biases: qwen2, and llama with attention_bias); a
    mixture of experts has no dense MLP (experts.name_table adds its own)."""
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(n_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [f"{p}self_attn.{m}_proj.{kind}" for m in "qkvo" for kind in ("weight", "bias")]
        names += [] if experts else [f"{p}mlp.{m}_proj.weight" for m in ("gate", "up", "down")]
    return names


def name_table(arch: Architecture, n_layers: int) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name for every tensor the architecture can have."""
    tmap = get_tensor_name_map(arch.model_arch, n_layers)
    table = {}
    for hf in _hf_names(n_layers, bool(arch.experts)):
        gguf_name = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise InternalError(f"{hf} has no GGUF name: our own list of names is wrong")
        table[hf] = gguf_name
    return table


# ----------------------------------------------------------------------------------------- permutation


def _head_rows(n_rows: int, n_head: int) -> np.ndarray:
    """Row order llama.cpp's converter gives q/k: per head, the two rotary halves interleaved."""
    half = n_rows // n_head // 2
    return np.arange(n_rows).reshape(n_head, 2, half).swapaxes(1, 2).reshape(-1)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q_proj/k_proj weight or bias -> llama.cpp order (n_head: the KV head count for k_proj)."""
    return w[_head_rows(w.shape[0], n_head)]


def permuted_heads(arch: Architecture, hf_name: str, n_head: int, n_kv_head: int) -> int:
    """The head count llama.cpp's converter permutes this tensor's rows with; 0 when it does not."""
    if not arch.permute_qk or not hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
        return 0
    return n_head if ".q_proj." in hf_name else n_kv_head


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    return w[np.argsort(_head_rows(w.shape[0], n_head))]


# ------------------------------------------------------------------------------------------- metadata


UINT32_MAX = 2**32 - 1  # GGUF stores the model's sizes as uint32


def config_int(config: dict, key: str, default: int | None = None, high: int = UINT32_MAX) -> int:
    """A size from config.json: a whole number in 1..high (a missing key takes `default`, if any)."""
    value = config.get(key)
    if value is None and default is not None:
        return default
    if value is None:
        raise QuantkitError(f"config.json: {key} is missing", "GGUF needs the model's sizes")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise QuantkitError(f"config.json: {key} = {str(value)[:40]} is not a whole number in 1..{high}")
    return value


def config_float(config: dict, key: str, default: float, where: dict | None = None) -> float:
    """A constant from config.json (or from its sub-table `where`): a finite number above zero."""
    value = (config if where is None else where).get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise QuantkitError(f"config.json: {key} = {str(value)[:40]} is not a finite number above zero")
    return float(value)


def _table(config: dict, key: str) -> dict:
    value = config.get(key)
    if value is not None and not isinstance(value, dict):
        raise QuantkitError(f"config.json: {key} = {str(value)[:40]} is not a table of settings")
    return value or {}


def _rope_theta(config: dict) -> float:
    rope = _table(config, "rope_parameters")
    kind = rope.get("rope_type", "default") if rope else _table(config, "rope_scaling").get("type", "default")
    if kind not in ("default", None):
        raise QuantkitError(f"config.json: rope scaling {str(kind)[:40]!r} is not supported yet for GGUF output")
    if "rope_theta" in config:
        return config_float(config, "rope_theta", 10000.0)
    return config_float(config, "rope_theta", 10000.0, where=rope)


@dataclass(frozen=True)
class Hyper:
    """The architecture numbers llama.cpp needs, in HF's terms."""

    n_layers: int
    hidden: int
    ffn: int
    n_head: int
    n_kv_head: int
    context: int
    rope_theta: float
    rms_eps: float
    vocab: int
    head_dim: int

    @classmethod
    def from_config(cls, config: dict, n_tensors: int) -> Hyper:
        """Every number GGUF output takes from config.json, checked: whole sizes within uint32, finite
        positive constants, tables where tables belong, and no more layers than the checkpoint has
        tensors (name tables and shape checks are built per layer). Each refusal names the key."""
        n_layers = config_int(config, "num_hidden_layers")
        if n_layers > n_tensors:
            raise QuantkitError(f"config.json: num_hidden_layers = {n_layers}, but the checkpoint holds {n_tensors} tensors",
                                "is the checkpoint what its config.json says?")
        n_head, hidden = config_int(config, "num_attention_heads"), config_int(config, "hidden_size")
        n_kv_head = config_int(config, "num_key_value_heads", n_head, high=n_head)
        return cls(n_layers, hidden, config_int(config, "intermediate_size"), n_head, n_kv_head,
                   config_int(config, "max_position_embeddings", 2048), _rope_theta(config),
                   config_float(config, "rms_norm_eps", 1e-6), config_int(config, "vocab_size"),
                   config_int(config, "head_dim", max(1, hidden // n_head)))

    def sizes(self) -> dict[str, int]:
        """The checked sizes under config.json's names, for expected_shapes."""
        return {"hidden_size": self.hidden, "intermediate_size": self.ffn, "num_hidden_layers": self.n_layers,
                "num_attention_heads": self.n_head, "num_key_value_heads": self.n_kv_head, "head_dim": self.head_dim,
                "vocab_size": self.vocab}


def write_hyper(writer: GGUFWriter, h: Hyper) -> None:
    writer.add_context_length(h.context)
    writer.add_embedding_length(h.hidden)
    writer.add_block_count(h.n_layers)
    writer.add_feed_forward_length(h.ffn)
    writer.add_head_count(h.n_head)
    writer.add_head_count_kv(h.n_kv_head)
    writer.add_rope_freq_base(h.rope_theta)
    writer.add_layer_norm_rms_eps(h.rms_eps)
    writer.add_vocab_size(h.vocab)
    writer.add_rope_dimension_count(h.head_dim)
    if h.head_dim != h.hidden // h.n_head:
        writer.add_key_length(h.head_dim)
        writer.add_value_length(h.head_dim)


def hf_config(meta: dict[str, Any], tensor_names: set[str], dtype: str) -> dict:
    """config.json rebuilt from GGUF metadata (the inverse of write_hyper)."""
    arch = gguf_architecture(meta)
    arch_name = arch.gguf_arch

    def get(key: str, default: Any = None, kind: type | tuple[type, ...] = int) -> Any:
        """A size (or, with kind=float, a constant) of the model: present, positive and finite."""
        value = meta.get(f"{arch_name}.{key}", default)
        if value is None:
            raise QuantkitError(f"GGUF metadata lacks {arch_name}.{key}")
        if isinstance(value, bool) or not isinstance(value, kind) or not 0 < value < 2**63:
            raise QuantkitError(f"GGUF metadata {arch_name}.{key} = {str(value)[:40]} is not a positive number",
                                "the file is damaged")
        return value

    n_head = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    if get("block_count") > len(tensor_names):  # name tables are built per block
        raise QuantkitError(f"GGUF metadata {arch_name}.block_count = {get('block_count')} exceeds the tensor count")
    tokens = meta.get("tokenizer.ggml.tokens")
    has_vocab = f"{arch_name}.vocab_size" in meta or (isinstance(tokens, list) and tokens)
    vocab = get("vocab_size", len(tokens) if isinstance(tokens, list) else None) if has_vocab else None
    config = {
        "architectures": [arch.hf_class], "model_type": arch.model_type,
        "hidden_size": hidden, "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": float(str(np.float32(get("attention.layer_norm_rms_epsilon", kind=(int, float))))),  # 1e-05, not 9.99e-06
        "rope_theta": float(get("rope.freq_base", 10000.0, kind=(int, float))),
        "head_dim": int(get("attention.key_length", hidden // n_head)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "hidden_act": "silu", "dtype": dtype,
    }
    if vocab is not None:
        config["vocab_size"] = int(vocab)
    for key, field_name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            token_id = meta[f"tokenizer.ggml.{key}"]
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise QuantkitError(f"GGUF metadata tokenizer.ggml.{key} = {str(token_id)[:40]} is not a token id")
            config[field_name] = token_id
    if arch.model_type.startswith("qwen2"):
        config["use_sliding_window"] = False
    else:
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    return config


# --------------------------------------------------------------------------------------------- reader

_SCALARS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b", GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h", GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d", GGUFValueType.BOOL: "<?",
}  # fmt: skip
MAX_DIMS = 4


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order: rows last (GGUF stores ne[0] first, the row length)
    qtype: QType
    offset: int  # absolute, in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor] = field(default_factory=list)
    alignment: int = GGUF_DEFAULT_ALIGNMENT
    data_offset: int = 0

    def rows(self, t: GGUFTensor, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Stored rows [start, stop) of a tensor, read with pread (no memory map, so memory follows
        the rows asked for): float rows for F32/F16, uint8 rows of blocks otherwise, as gguf-py's
        dequantizer takes them. A 1-D tensor is one row."""
        n_rows = math.prod(t.shape[:-1])
        stop = n_rows if stop is None else min(stop, n_rows)
        row_bytes = t.nbytes // n_rows
        dtype = {QType.F32: np.float32, QType.F16: np.float16}.get(t.qtype, np.uint8)
        try:
            with open(self.path, "rb") as fp:
                data = os.pread(fp.fileno(), (stop - start) * row_bytes, t.offset + start * row_bytes)
        except OSError as e:
            raise QuantkitError(f"{self.path}: cannot read tensor {t.name} ({e.strerror})") from e
        if len(data) != (stop - start) * row_bytes:
            raise QuantkitError(f"{self.path}: truncated while reading tensor {t.name}")
        return np.frombuffer(data, dtype=dtype).reshape(stop - start, -1)


class _Cursor:
    """Reads little-endian fields, refusing any that runs past the end of the file."""

    def __init__(self, fp, size: int, path: Path):
        self.fp, self.size, self.path = fp, size, path

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.fp.tell() + n > self.size:
            raise QuantkitError(f"{self.path}: {what} runs past the end of the file "
                                f"(offset {self.fp.tell()}, {n} bytes, file {self.size} bytes)",
                                "the file is truncated or damaged")
        return self.fp.read(n)

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        raw = self.take(self.scalar("<Q", what + " length"), what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise QuantkitError(f"{self.path}: {what} is not UTF-8") from e

    def count(self, what: str, min_item: int) -> int:
        n = self.scalar("<Q", what)
        if n * min_item > self.size - self.fp.tell():
            raise QuantkitError(f"{self.path}: {what} {n} cannot fit in the file", "the file is damaged")
        return n

    def value(self, vtype: int, what: str, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            return self.scalar(_SCALARS[vtype], what)
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY and depth == 0:
            item = self.scalar("<I", what + " item type")
            if item in _SCALARS:
                fmt = _SCALARS[item]
                n = self.count(what + " length", struct.calcsize(fmt))
                return np.frombuffer(self.take(n * struct.calcsize(fmt), what), dtype=np.dtype(fmt)).tolist()
            n = self.count(what + " length", 8)
            return [self.value(item, what, depth + 1) for _ in range(n)]
        raise QuantkitError(f"{self.path}: {what} has unknown value type {vtype}", "the file is damaged")


def read_gguf(path: Path | str) -> GGUFFile:
    """Parse and bounds-check a GGUF file's header, metadata and tensor infos; no tensor data is read."""
    path = Path(path)
    try:
        with open(path, "rb") as fp:
            size = path.stat().st_size
            version, meta, raw, header_end = _read_header(_Cursor(fp, size, path))
    except OSError as e:
        raise QuantkitError(f"{path}: cannot read ({e.strerror})") from e
    alignment = meta.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise QuantkitError(f"{path}: general.alignment {alignment!r} is not a power of two")
    gf = GGUFFile(path, version, meta, [], alignment, -(-header_end // alignment) * alignment)
    gf.tensors = [_tensor_info(gf, size, *r) for r in raw]
    _check_overlaps(gf)
    return gf


def _read_header(c: _Cursor) -> tuple[int, dict[str, Any], list[tuple], int]:
    """(version, metadata, raw tensor infos, offset where the header ends)."""
    if c.take(4, "magic") != struct.pack("<I", GGUF_MAGIC):
        raise QuantkitError(f"{c.path}: not a GGUF file (bad magic)")
    version = c.scalar("<I", "version")
    if version not in (2, 3):
        raise QuantkitError(f"{c.path}: GGUF version {version} is not supported", "versions 2 and 3 are")
    n_tensors = c.count("tensor count", 8 + 4 + 4 + 8 + 8)
    n_kv = c.count("metadata count", 8 + 4)
    meta: dict[str, Any] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        meta[key] = c.value(c.scalar("<I", f"type of {key}"), f"metadata {key}")
    raw = []
    for i in range(n_tensors):
        name = c.string(f"tensor name #{i}")
        n_dims = c.scalar("<I", f"dimension count of {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise QuantkitError(f"{c.path}: tensor {name} has {n_dims} dimensions (1 to {MAX_DIMS} allowed)")
        ne = [c.scalar("<Q", f"shape of {name}") for _ in range(n_dims)]
        qtype = c.scalar("<I", f"type of {name}")
        offset = c.scalar("<Q", f"offset of {name}")
        raw.append((name, ne, qtype, offset))
    return version, meta, raw, c.fp.tell()


def _tensor_info(gf: GGUFFile, size: int, name: str, ne: list[int], qtype: int, offset: int) -> GGUFTensor:
    where = f"{gf.path}: tensor {name}"
    try:
        qt = QType(qtype)
        block, type_size = GGML_QUANT_SIZES[qt]
    except (ValueError, KeyError):
        raise QuantkitError(f"{where} has unknown type {qtype}") from None
    if any(d <= 0 for d in ne) or ne[0] % block:
        raise QuantkitError(f"{where} has shape {ne}, which {qt.name} (blocks of {block}) cannot hold")
    n = math.prod(ne)
    nbytes = n // block * type_size
    if offset % gf.alignment:
        raise QuantkitError(f"{where}: data offset {offset} is not aligned to {gf.alignment}")
    start = gf.data_offset + offset
    if start + nbytes > size:
        raise QuantkitError(f"{where}: data ({nbytes} bytes at {start}) runs past the end of the file "
                            f"({size} bytes)", "the file is truncated")
    return GGUFTensor(name, tuple(reversed(ne)), qt, start, nbytes)


def _check_overlaps(gf: GGUFFile) -> None:
    names = set()
    end, last = gf.data_offset, None
    for t in sorted(gf.tensors, key=lambda t: t.offset):
        if t.name in names:
            raise QuantkitError(f"{gf.path}: tensor {t.name} appears twice")
        names.add(t.name)
        if t.offset < end:
            raise QuantkitError(f"{gf.path}: tensor {t.name} overlaps tensor {last}")
        end, last = t.offset + t.nbytes, t.name


def inspect_file(path: Path) -> dict[str, Any]:
    """What `inspect` shows for a GGUF: metadata (long arrays summarised) and tensor infos, no data."""
    file = read_gguf(path)
    meta = {k: (f"[{len(v)} items]" if isinstance(v, list) and len(v) > 16 else v) for k, v in file.metadata.items()}
    types: dict[str, int] = {}
    for t in file.tensors:
        types[t.qtype.name] = types.get(t.qtype.name, 0) + 1
    file_type = meta.get("general.file_type")
    return {
        "path": str(path), "format": "gguf", "version": file.version,
        "architecture": meta.get("general.architecture"),
        "num_parameters": sum(math.prod(t.shape) for t in file.tensors),
        "bytes": path.stat().st_size, "dtypes": types,
        "quantization": {"method": "gguf", "file_type": LlamaFileType(file_type).name
                         if isinstance(file_type, int) and file_type in LlamaFileType._value2member_map_ else file_type},
        "metadata": meta,
        "tensors": [{"name": t.name, "dtype": t.qtype.name, "shape": list(t.shape), "bytes": t.nbytes}
                    for t in file.tensors],
    }


# --------------------------------------------------------------------------------------------- writer


@dataclass(frozen=True)
class GGUFOutput:
    """One tensor as it will be stored: its GGUF name, logical shape (numpy order), type."""

    name: str
    shape: tuple[int, ...]
    qtype: QType

    @property
    def nbytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def _writer(arch: str, add_metadata: Callable[[GGUFWriter], None], tensors: list[GGUFOutput]) -> GGUFWriter:
    writer = GGUFWriter(None, arch)
    add_metadata(writer)
    for t in tensors:
        writer.add_tensor_info(t.name, t.shape, np.dtype(np.float32), t.nbytes, raw_dtype=t.qtype)
    return writer


def _write_head(writer: GGUFWriter, path: Path):
    """Header, metadata and tensor infos into `path`; returns the open file, flushed."""
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    fp = writer.fout[0]
    fp.flush()
    return fp


def gguf_file_bytes(arch: str, add_metadata: Callable[[GGUFWriter], None], tensors: list[GGUFOutput]) -> int:
    """The bytes write_gguf writes for these tensors and metadata, exactly, without their data (the head
    goes to a scratch file)."""
    writer = _writer(arch, add_metadata, tensors)
    with tempfile.TemporaryDirectory() as scratch:
        try:
            position = _write_head(writer, Path(scratch) / "head.gguf").tell()
        finally:
            writer.close()
    for t in tensors:
        position += -position % writer.data_alignment + t.nbytes
    return position + -position % writer.data_alignment


def write_gguf(out: Path, arch: str, add_metadata: Callable[[GGUFWriter], None],
               tensors: list[GGUFOutput], chunks: Iterable[tuple[GGUFOutput, Iterator[np.ndarray]]], force: bool = True) -> int:
    """Write header, metadata and tensor infos, then each tensor's data from its chunk iterator as it is
    produced, into a temporary file beside `out` that replaces `out` (what it links to, for a symlink) only
    when complete, holding OUT's lock. Returns bytes."""
    with output_lock(out):
        check_clobber(out, force, single_file=True)
        return _write_gguf(Path(out), arch, add_metadata, tensors, chunks)


def _write_gguf(out: Path, arch: str, add_metadata: Callable[[GGUFWriter], None],
                tensors: list[GGUFOutput], chunks: Iterable[tuple[GGUFOutput, Iterator[np.ndarray]]]) -> int:
    writer = _writer(arch, add_metadata, tensors)
    with StagedFile(out) as staged:  # verify spots the temporary file if this run is killed
        try:
            fp = _write_head(writer, staged.tmp)
            data = OutputFile(staged.tmp, keep=fp.tell())  # tensor data goes out from a thread, bypassing the page cache
            try:
                for t, parts in chunks:
                    data.write(bytes(-data.tell() % writer.data_alignment))
                    start = data.tell()
                    for part in parts:
                        data.write(np.ascontiguousarray(part))
                    if data.tell() - start != t.nbytes:
                        raise InternalError(f"{t.name}: wrote {data.tell() - start} bytes, planned {t.nbytes}")
                data.write(bytes(-data.tell() % writer.data_alignment))
            except BaseException:
                data.abort()
                raise
            total = data.close()
            writer.close()
            staged.commit()
            return total
        except OSError as e:
            raise QuantkitError(f"{out}: cannot write ({e.strerror})", "check free space and permissions") from e
        finally:
            with contextlib.suppress(OSError):  # on a full disk, closing flushes a tail that cannot fit either
                writer.close()
