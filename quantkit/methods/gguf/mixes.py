"""llama-quantize's file types and the per-tensor type each one chooses (its "mix"), as a pure function of
names and shapes.

Spec: src/llama-quant.cpp of llama.cpp as vendored by llama-cpp-python 0.3.36 (`tensor_allows_quantization`,
`llama_tensor_get_type_impl`, `tensor_type_fallback`, `llama_ftype_get_default_type`), reimplemented.
What decides the result:
- llama-quantize walks the tensors sorted by (layer number of "blk.N.", -1 for the others; then name as
  bytes), not in file order; the attn_v / ffn_down counters ("first 4 attn_v", use_more_bits) count in
  that order. attn_qkv and attn_kv_b count as attn_v.
- output.weight gets Q6_K (Q8_0 where its rows do not hold 256-blocks); token_embd is treated so only
  when the model has no output.weight (tied embeddings), else it keeps the file type's default.
- Shapes are numpy order: the row length (ggml ne[0]) is shape[-1]; an expert tensor is (n_expert, rows,
  cols). A type whose block does not divide the row length falls back once (TYPES' fallback), then F16.
- Tensors that are never quantized (1-D, norms, the MoE router ffn_gate_inp, ...) keep the source's
  type, F32 in quantkit's case.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from quantkit.errors import QuantkitError
from quantkit.methods.gguf.types import TYPES, fits

Q = GGMLQuantizationType
F = LlamaFileType


@dataclass(frozen=True)
class FileType:
    name: str  # as llama-quantize spells it
    value: LlamaFileType  # general.file_type
    default: Q  # the type of every quantizable tensor the mix does not single out


# The whole-file types come from the table of quant types; the K-quant mixes add small/medium/large.
_MIXES = {"Q2_K_S": (F.MOSTLY_Q2_K_S, Q.Q2_K), "Q3_K_S": (F.MOSTLY_Q3_K_S, Q.Q3_K), "Q3_K_M": (F.MOSTLY_Q3_K_M, Q.Q3_K),
          "Q3_K_L": (F.MOSTLY_Q3_K_L, Q.Q3_K), "Q4_K_S": (F.MOSTLY_Q4_K_S, Q.Q4_K), "Q4_K_M": (F.MOSTLY_Q4_K_M, Q.Q4_K),
          "Q5_K_S": (F.MOSTLY_Q5_K_S, Q.Q5_K), "Q5_K_M": (F.MOSTLY_Q5_K_M, Q.Q5_K)}
FILE_TYPES: dict[str, FileType] = {
    **{q.name: FileType(q.name, t.file_type, q) for q, t in TYPES.items() if t.file_type is not None},
    **{name: FileType(name, value, default) for name, (value, default) in _MIXES.items()},
}
ALIASES = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}  # as llama-quantize reads them


def parse_file_type(name: str) -> FileType:
    key = ALIASES.get(name.upper(), name.upper())
    if key not in FILE_TYPES:
        raise QuantkitError(f"unknown GGUF type {name!r}", f"choose one of {', '.join([*FILE_TYPES, *ALIASES])}")
    return FILE_TYPES[key]


# llm type 70B (attn_v Q3_K / Q4_K -> Q5_K): architecture -> the layer count that loads as 70B
_SEVENTY_B = {"llama": 80, "qwen2": 80, "deci": 80, "olmo": 80, "jais2": 68}

# tensor_allows_quantization: name parts and names that are never quantized
_NEVER_PART = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel",
    "per_layer_model_proj", "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight",
    "indexer.q_proj.weight", "attn_rel_b.weight", ".position_embd", "sam.pos_embd", "sam.neck.",
    "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger", "a.rvq.codebook", "mm.a.code_embd",
    *(f"time_mix_{s}.weight" for s in ("first", "w0", "w1", "w2", "v0", "v1", "v2", "a0", "a1", "a2",
                                        "g1", "g2", "decay_w1", "decay_w2", "lerp_fused")))  # fmt: skip
_NEVER_NAME = ("position_embd.weight", "token_types.weight")

# tensor_get_category: the first name part that matches
_CATEGORIES = (("attn_qkv.weight", "attn_v"), ("attn_kv_b.weight", "attn_v"), ("attn_v.weight", "attn_v"),
               ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
               ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down"))


def use_more_bits(i: int, n: int) -> bool:
    """The first and last eighth of the layers, and every third layer between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


@dataclass(frozen=True)
class _Layer:
    i: int  # layer index (MoE: from the name; dense: the category's running count)
    n: int  # layers (attn_v: attn_v-like tensors)
    gqa: int
    falcon: bool = False
    imatrix: bool = False


Rule = Callable[[_Layer], "Q | None"]
# file type -> the type a rule gives (None: keep the default)
_ATTN_V: dict[str, Rule] = {
    "Q2_K": lambda c: Q.Q4_K if c.gqa >= 4 else Q.Q3_K,
    "Q2_K_S": lambda c: Q.Q4_K if c.gqa >= 4 else None,
    "Q3_K_M": lambda c: Q.Q5_K if c.i < 2 else Q.Q4_K,
    "Q3_K_L": lambda c: Q.Q5_K,
    "IQ4_NL": lambda c: Q.Q5_K if c.gqa >= 4 else None,
    "IQ4_XS": lambda c: Q.Q5_K if c.gqa >= 4 else None,
    "Q4_K_M": lambda c: Q.Q6_K if use_more_bits(c.i, c.n) else None,
    "Q5_K_M": lambda c: Q.Q6_K if use_more_bits(c.i, c.n) else None,
    "Q4_K_S": lambda c: Q.Q5_K if c.i < 4 else None,
}
_FFN_DOWN: dict[str, Rule] = {
    "Q2_K": lambda c: Q.Q3_K,
    "Q2_K_S": lambda c: Q.Q4_K if c.i < c.n // 8 else None,
    "Q3_K_M": lambda c: (Q.Q5_K if c.i < c.n // 16 else
                         Q.Q4_K if not c.falcon or use_more_bits(c.i, c.n) else Q.Q3_K),
    "Q3_K_L": lambda c: Q.Q4_K if c.falcon else Q.Q5_K,
    "Q4_K_M": lambda c: ((Q.Q6_K if c.i < c.n // 16 else Q.Q5_K if use_more_bits(c.i, c.n) else Q.Q4_K)
                         if c.falcon else Q.Q6_K if use_more_bits(c.i, c.n) else None),
    "IQ4_NL": lambda c: Q.Q5_K if c.i < c.n // 8 and not c.imatrix else None,
    "IQ4_XS": lambda c: Q.Q5_K if c.i < c.n // 8 and not c.imatrix else None,
    "Q5_K_M": lambda c: Q.Q6_K if use_more_bits(c.i, c.n) else None,
    "Q4_K_S": lambda c: Q.Q5_K if not c.falcon and c.i < c.n // 8 else None,
    "Q4_0": lambda c: Q.Q4_1 if c.imatrix and c.i < c.n // 8 else None,
    "Q5_0": lambda c: Q.Q5_1 if c.imatrix and c.i < c.n // 8 else None,
}  # fmt: skip
_ATTN_OUTPUT_8_EXPERTS = dict.fromkeys(("Q2_K", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ4_XS"), Q.Q5_K)
_ATTN_OUTPUT = {"Q2_K": Q.Q3_K, "Q3_K_M": Q.Q4_K, "Q3_K_L": Q.Q5_K}
_ATTN_OUTPUT_FALCON = {"Q3_K_L": Q.Q4_K}


@dataclass(frozen=True)
class Fallback:
    """A tensor whose rows do not hold whole blocks of the type the mix chose."""

    name: str
    row_length: int
    wanted: Q
    stored: Q

    def __str__(self) -> str:
        return (f"{self.name}: rows of {self.row_length} do not hold {self.wanted.name} blocks of "
                f"{GGML_QUANT_SIZES[self.wanted][0]}, stored as {self.stored.name}")


@dataclass
class Mix:
    types: dict[str, Q]  # GGUF tensor name -> type, in the order given
    fallbacks: list[Fallback] = field(default_factory=list)


def layer_of(name: str) -> int | None:
    """sscanf(name, "blk.%d.") as llama.cpp uses it."""
    m = re.match(r"blk\.\s*([+-]?\d+)", name)
    return int(m.group(1)) if m else None


def quantize_order(names: Iterable[str]) -> list[str]:
    """llama_model_loader's order: by layer (tensors outside the layers first), then by name as bytes."""

    def key(name: str) -> tuple[int, bytes]:
        layer = layer_of(name)
        return (-1 if layer is None else layer, name.encode())

    return sorted(names, key=key)


def category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    return next((cat for part, cat in _CATEGORIES if part in name), "other")


def allows_quantization(name: str, shape: Sequence[int]) -> bool:
    dims = list(shape)
    while dims and dims[0] == 1:  # ggml_n_dims ignores trailing ne == 1 (leading here, numpy order)
        dims.pop(0)
    if len(dims) < 2 or not name.endswith("weight"):
        return False
    return name not in _NEVER_NAME and not any(part in name for part in _NEVER_PART)


def fallback(name: str, row_length: int, wanted: Q) -> Fallback | None:
    """tensor_type_fallback: the type's fallback when its blocks do not fit the rows, then F16."""
    if fits(wanted, row_length):
        return None
    stored = TYPES[wanted].fallback or wanted
    return Fallback(name, row_length, wanted, stored if fits(stored, row_length) else Q.F16)


def tensor_types(file_type: FileType, arch: str, n_layer: int, tensors: Iterable[tuple[str, Sequence[int]]], *,
                 n_head: int = 0, n_head_kv: int = 0, n_expert: int = 0, has_imatrix: bool = False) -> Mix:
    """{GGUF tensor name: type} as llama-quantize writes file type `file_type` from an F32 GGUF holding
    `tensors` ((name, numpy-order shape) pairs)."""
    ftype = file_type.name
    shapes = {name: tuple(int(d) for d in shape) for name, shape in tensors}
    gqa = n_head // n_head_kv if n_head_kv else 0
    seventy_b = _SEVENTY_B.get(arch) == n_layer and not (arch == "llama" and (n_expert == 8 or n_head == n_head_kv))
    falcon = arch == "falcon"
    tied = "output.weight" not in shapes
    n_attn_v = sum(category(n) == "attn_v" for n in shapes)
    counters = {"attn_v": 0, "ffn_down": 0, "ffn_gate": 0, "ffn_up": 0}
    mixed = file_type.default not in (Q.F32, Q.F16, Q.BF16)

    def layer(name: str, cat: str) -> _Layer:
        i = counters[cat]
        if n_expert > 1:  # experts: the layer comes from the name
            i = layer_of(name)
            if i is None or not 0 <= i < n_layer:
                raise QuantkitError(f"tensor {name}: no layer in 0..{n_layer - 1} in its name",
                                    "llama-quantize would refuse this model too")
        return _Layer(i, n_layer, gqa, falcon, has_imatrix)

    def choose(name: str, cat: str, new: Q) -> Q:  # llama_tensor_get_type_impl
        if cat == "output" or (tied and cat == "token_embd"):
            if falcon or not fits(new, shapes[name][-1]):  # Q6_K may still fall back below
                return Q.Q8_0
            return new if new == Q.Q8_0 else Q.Q6_K
        if cat == "attn_v":
            rule = _ATTN_V.get(ftype)
            new = (rule and rule(_Layer(counters["attn_v"], n_attn_v, gqa))) or new
            if seventy_b and new in (Q.Q3_K, Q.Q4_K):
                new = Q.Q5_K
            if n_expert == 8:
                new = Q.Q8_0
            counters["attn_v"] += 1
        elif cat == "attn_k" and n_expert == 8:
            new = Q.Q8_0
        elif cat == "ffn_down":
            rule = _FFN_DOWN.get(ftype)
            new = (rule and rule(layer(name, cat))) or new
            counters[cat] += 1
        elif cat == "attn_output":
            table = _ATTN_OUTPUT_FALCON if falcon else _ATTN_OUTPUT_8_EXPERTS if n_expert == 8 else _ATTN_OUTPUT
            new = table.get(ftype, new)
        elif cat in ("ffn_gate", "ffn_up"):
            layer(name, cat)  # no rule for these file types, but the layer check still applies
            counters[cat] += 1
        return new

    mix = Mix({})
    for name in quantize_order(shapes):
        if not allows_quantization(name, shapes[name]):
            mix.types[name] = Q.F32
            continue
        new = choose(name, category(name), file_type.default) if mixed else file_type.default
        moved = fallback(name, shapes[name][-1], new) if mixed else None
        if moved is not None:
            mix.fallbacks.append(moved)
            new = moved.stored
        mix.types[name] = new
    mix.types = {name: mix.types[name] for name in shapes}
    return mix
