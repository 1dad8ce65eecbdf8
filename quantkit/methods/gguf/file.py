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
    RopeScalingType,
    get_tensor_name_map,
)

from quantkit import modules
from quantkit.errors import InternalError, QuantkitError
from quantkit.io.outfile import OutputFile
from quantkit.io.source import architectures
from quantkit.io.staged import StagedFile, check_clobber, output_lock

QType = GGMLQuantizationType

# --------------------------------------------------------------------------------------- architectures

# Shapes are written in the terms of `Sizes` (numpy order, rows first).
_NORMS = {"input_layernorm.weight": ("hidden",), "post_attention_layernorm.weight": ("hidden",)}
_ATTENTION = {"self_attn.q_proj.weight": ("q_rows", "hidden"), "self_attn.k_proj.weight": ("kv_rows", "hidden"),
              "self_attn.v_proj.weight": ("kv_rows", "hidden"), "self_attn.o_proj.weight": ("hidden", "q_rows")}
_MLP = {"mlp.gate_proj.weight": ("ffn", "hidden"), "mlp.up_proj.weight": ("ffn", "hidden"),
        "mlp.down_proj.weight": ("hidden", "ffn")}
_QK_NORMS = {"self_attn.q_norm.weight": ("head_dim",), "self_attn.k_norm.weight": ("head_dim",)}
_FFN_NORMS = {"pre_feedforward_layernorm.weight": ("hidden",), "post_feedforward_layernorm.weight": ("hidden",)}
# Phi-3 stores Q, K, V in one matrix and gate, up in another, which is how llama.cpp's phi3 reads them
_FUSED = {"self_attn.qkv_proj.weight": ("qkv_rows", "hidden"), "self_attn.o_proj.weight": ("hidden", "q_rows"),
          "mlp.gate_up_proj.weight": ("gate_up_rows", "hidden"), "mlp.down_proj.weight": ("hidden", "ffn")}


def _experts(module: str, gate: str, up: str, down: str) -> dict[str, tuple[str, ...]]:
    """A mixture-of-experts layer's router and experts, each role under its merged name (all experts as one
    tensor, as llama.cpp's ffn_*_exps: experts.merge_shapes gives a checkpoint's per-expert tensors so)."""
    return {f"{module}.gate.weight": ("n_expert", "hidden"),
            f"{module}.experts.{gate}.weight": ("n_expert", "expert_ffn", "hidden"),
            f"{module}.experts.{up}.weight": ("n_expert", "expert_ffn", "hidden"),
            f"{module}.experts.{down}.weight": ("n_expert", "hidden", "expert_ffn")}


_SHARED_EXPERT = {"mlp.shared_expert.gate_proj.weight": ("shared_ffn", "hidden"),
                  "mlp.shared_expert.up_proj.weight": ("shared_ffn", "hidden"),
                  "mlp.shared_expert.down_proj.weight": ("hidden", "shared_ffn"),
                  "mlp.shared_expert_gate.weight": ("one", "hidden")}


@dataclass(frozen=True)
class Part:
    """A tensor llama.cpp's converter makes from one source tensor that is stored otherwise: gpt-oss's experts
    fused (gate and up interleaved), named without .weight (sinks), each expert [in, out] in the source's dense
    shape (transformers' layout; its MXFP4 blocks are [out, in / 32])."""

    leaf: str  # its name inside model.layers.N, as the converter names it before mapping it to GGUF
    index: int = 0  # which of `parts` interleaved slices along `axis` it takes
    parts: int = 1
    axis: int = -1  # the output-feature axis, in the output's own order
    transposed: bool = False  # the source holds each expert [in, out] (the output's last two axes swapped)

    def shape(self, source: tuple[int, ...], split: bool = True) -> tuple[int, ...]:
        """Its shape from the source's (`split` False: before taking its slice)."""
        shape = [*source[:-2], source[-1], source[-2]] if self.transposed else list(source)
        shape[self.axis] //= self.parts if split else 1
        return tuple(shape)

    def take(self, values: np.ndarray) -> np.ndarray:
        """Its values from the source's (whole, or one expert's: the last axes are the ones it names), a view."""
        values = values.swapaxes(-1, -2) if self.transposed else values
        picked = [slice(None)] * values.ndim
        picked[self.axis] = slice(self.index, None, self.parts)
        return values[tuple(picked)]


@dataclass(frozen=True)
class Setting:
    """A config.json value that llama.cpp reads from the metadata key `{arch}.{gguf_key}`; carried both ways.
    `required`: llama.cpp assumes a value of its own when the key is absent, so a config without one is
    refused. `gguf_key` None: llama.cpp has no such setting, so a config that sets it is refused."""

    config_key: str
    gguf_key: str | None
    kind: type  # int or float
    required: bool = False


@dataclass(frozen=True)
class Architecture:
    """One model family as llama.cpp's converter writes it: names, shapes, metadata, tensor transforms."""

    gguf_arch: str  # general.architecture
    model_arch: MODEL_ARCH
    hf_class: str  # what GGUF -> HF writes back
    model_type: str
    layer: dict[str, tuple[str, ...]]  # HF tensor names inside model.layers.N -> shape in Sizes' terms
    permute_qk: bool = False  # llama.cpp's converter permutes Q/K heads for llama-family rope only
    biases: bool = False  # q/k/v/o_proj may carry biases (qwen2 always, llama with attention_bias)
    output: bool = True  # lm_head is stored (gemma2: llama.cpp always reads the embeddings as output)
    norm_shift: float = 0.0  # gemma: transformers' RMSNorm scales by 1 + w, llama.cpp's by w (stored w + 1)
    activation: tuple[str, str] = ("hidden_act", "silu")  # the config key and the one value llama.cpp computes
    settings: tuple[Setting, ...] = ()
    swa_period: int = 0  # sliding-window layers: llama.cpp's default period (one full layer every N)
    rope_per_layer_type: bool = False  # rope_parameters split into full_attention / sliding_attention
    rope_types: tuple[str, ...] = ("default",)  # rope types llama.cpp computes as transformers does
    partial_rope: bool = False  # partial_rotary_factor (rope on the first part of each head)
    big_query_layers: int = 0  # gemma 27B: at this layer count llama.cpp scales queries by n_embd / n_head
    experts: str = ""  # mixture of experts: its layout in experts.LAYOUTS ("" for a dense model)
    needs_output: bool = False  # llama.cpp's graph reads output.weight, never the embeddings (qwen2moe)
    parts: dict[str, tuple[Part, ...]] = field(default_factory=dict)  # source leaf -> what the converter makes of it
    fixed: tuple[tuple[str, Any], ...] = ()  # config.json values llama.cpp's graph fixes (gpt-oss's swiglu)
    head_dim_keys: bool = False  # the converter writes key_length / value_length whatever head_dim is
    to_hf: bool = True  # whether GGUF -> safetensors maps this architecture's tensors back

    def tensor_names(self, n_layers: int) -> list[str]:
        names = ["model.embed_tokens.weight", "model.norm.weight"] + (["lm_head.weight"] if self.output else [])
        for i in range(n_layers):
            names += [f"model.layers.{i}.{name}" for name in self.layer]
            if self.biases:
                names += [f"model.layers.{i}.self_attn.{m}_proj.bias" for m in "qkvo"]
        return names

    def shift(self, hf_name: str) -> float:
        """What llama.cpp's converter adds to this tensor (gemma's RMSNorm weights: 1)."""
        return self.norm_shift if hf_name.endswith("norm.weight") else 0.0


def _gpt_oss_experts() -> dict[str, tuple[str, ...]]:
    """gpt-oss's router and experts, each with a bias, as llama.cpp's converter names them (after `parts`)."""
    roles = {"gate_proj": ("expert_ffn", "hidden"), "up_proj": ("expert_ffn", "hidden"), "down_proj": ("hidden", "expert_ffn")}
    layer = {"mlp.router.weight": ("n_expert", "hidden"), "mlp.router.bias": ("n_expert",)}
    for role, (rows, cols) in roles.items():
        layer |= {f"mlp.experts.{role}.weight": ("n_expert", rows, cols), f"mlp.experts.{role}.bias": ("n_expert", rows)}
    return layer


# gpt-oss keeps gate and up fused, interleaved on the output axis (gate even, up odd), experts dense as
# [in, out] or MXFP4 blocks as [out, in / 32]; llama.cpp's converter splits and names them so
_GPT_OSS_PARTS = {
    "self_attn.sinks": (Part("self_attn.sinks.weight"),),
    "mlp.experts.gate_up_proj": (Part("mlp.experts.gate_proj.weight", 0, 2, -2, True),
                                 Part("mlp.experts.up_proj.weight", 1, 2, -2, True)),
    "mlp.experts.gate_up_proj_bias": (Part("mlp.experts.gate_proj.bias", 0, 2), Part("mlp.experts.up_proj.bias", 1, 2)),
    "mlp.experts.down_proj": (Part("mlp.experts.down_proj.weight", transposed=True),),
    "mlp.experts.down_proj_bias": (Part("mlp.experts.down_proj.bias"),),
}

_LLAMA = {**_NORMS, **_ATTENTION, **_MLP}
ARCHITECTURES = {
    "LlamaForCausalLM": Architecture("llama", MODEL_ARCH.LLAMA, "LlamaForCausalLM", "llama", _LLAMA,
                                     permute_qk=True, biases=True),
    "MistralForCausalLM": Architecture("llama", MODEL_ARCH.LLAMA, "LlamaForCausalLM", "llama", _LLAMA,
                                       permute_qk=True, biases=True),
    "Qwen2ForCausalLM": Architecture("qwen2", MODEL_ARCH.QWEN2, "Qwen2ForCausalLM", "qwen2", _LLAMA, biases=True),
    "Qwen3ForCausalLM": Architecture("qwen3", MODEL_ARCH.QWEN3, "Qwen3ForCausalLM", "qwen3", {**_LLAMA, **_QK_NORMS}),
    "Gemma2ForCausalLM": Architecture(
        "gemma2", MODEL_ARCH.GEMMA2, "Gemma2ForCausalLM", "gemma2", {**_LLAMA, **_FFN_NORMS}, output=False,
        norm_shift=1.0, activation=("hidden_activation", "gelu_pytorch_tanh"), swa_period=2, big_query_layers=46,
        settings=(Setting("sliding_window", "attention.sliding_window", int, required=True),
                  Setting("attn_logit_softcapping", "attn_logit_softcapping", float, required=True),
                  Setting("final_logit_softcapping", "final_logit_softcapping", float, required=True))),
    "Gemma3ForCausalLM": Architecture(
        "gemma3", MODEL_ARCH.GEMMA3, "Gemma3ForCausalLM", "gemma3_text", {**_LLAMA, **_FFN_NORMS, **_QK_NORMS},
        norm_shift=1.0, activation=("hidden_activation", "gelu_pytorch_tanh"), swa_period=6, big_query_layers=62,
        rope_per_layer_type=True, rope_types=("default", "linear"),
        settings=(Setting("sliding_window", "attention.sliding_window", int),
                  Setting("final_logit_softcapping", "final_logit_softcapping", float),
                  Setting("attn_logit_softcapping", None, float))),
    "Phi3ForCausalLM": Architecture(
        "phi3", MODEL_ARCH.PHI3, "Phi3ForCausalLM", "phi3", {**_NORMS, **_FUSED}, partial_rope=True,
        settings=(Setting("sliding_window", "attention.sliding_window", int),
                  Setting("original_max_position_embeddings", "rope.scaling.original_context_length", int))),
    "MixtralForCausalLM": Architecture(
        "llama", MODEL_ARCH.LLAMA, "MixtralForCausalLM", "mixtral",
        {**_NORMS, **_ATTENTION, **_experts("block_sparse_moe", "w1", "w3", "w2")}, permute_qk=True, biases=True,
        experts="mixtral"),
    "Qwen2MoeForCausalLM": Architecture(
        "qwen2moe", MODEL_ARCH.QWEN2MOE, "Qwen2MoeForCausalLM", "qwen2_moe",
        {**_NORMS, **_ATTENTION, **_experts("mlp", "gate_proj", "up_proj", "down_proj"), **_SHARED_EXPERT},
        biases=True, experts="qwen2_moe", needs_output=True),
    "Qwen3MoeForCausalLM": Architecture(
        "qwen3moe", MODEL_ARCH.QWEN3MOE, "Qwen3MoeForCausalLM", "qwen3_moe",
        {**_NORMS, **_ATTENTION, **_QK_NORMS, **_experts("mlp", "gate_proj", "up_proj", "down_proj")},
        experts="qwen3_moe"),
    "GptOssForCausalLM": Architecture(
        "gpt-oss", MODEL_ARCH.GPT_OSS, "GptOssForCausalLM", "gpt_oss",
        {**_NORMS, **_ATTENTION, "self_attn.sinks.weight": ("n_head",), **_gpt_oss_experts()}, biases=True,
        experts="gpt_oss", swa_period=2, rope_types=("default", "yarn"), parts=_GPT_OSS_PARTS,
        settings=(Setting("sliding_window", "attention.sliding_window", int, required=True),),
        fixed=(("swiglu_alpha", 1.702), ("swiglu_limit", 7.0)), head_dim_keys=True, to_hf=False),
}
# general.architecture -> the first entry writing it (llama: LlamaForCausalLM; gguf_architecture reads a llama
# with experts as Mixtral, as llama.cpp does)
BY_GGUF_ARCH = {name: next(a for a in ARCHITECTURES.values() if a.gguf_arch == name)
                for name in dict.fromkeys(a.gguf_arch for a in ARCHITECTURES.values())}


def architecture_of(config: dict, where: str = "config.json") -> Architecture:
    names = architectures(config)
    for name in names:
        if name in ARCHITECTURES:
            return ARCHITECTURES[name]
    raise QuantkitError(
        f"{where}: GGUF output for architecture {', '.join(names) or config.get('model_type', '?')} "
        "is not supported yet", f"supported: {', '.join(ARCHITECTURES)}")


def gguf_architecture(meta: dict[str, Any]) -> Architecture:
    """The architecture a GGUF file names in general.architecture (one clear error when unknown); llama with
    experts is Mixtral, as llama.cpp reads it."""
    name = meta.get("general.architecture")
    if not isinstance(name, str) or name not in BY_GGUF_ARCH:
        raise QuantkitError(f"GGUF architecture {repr(name)[:40]} is not supported yet",
                            f"supported: {', '.join(BY_GGUF_ARCH)}")
    if name == "llama" and meta.get("llama.expert_count"):
        return ARCHITECTURES["MixtralForCausalLM"]
    return BY_GGUF_ARCH[name]


def kept_tensors(arch: Architecture, config: dict, shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
    """The source tensors a GGUF of `arch` holds: where llama.cpp reads the embeddings as the output head
    (gemma2), an lm_head saved beside tied embeddings is a copy, left out as llama.cpp's converter does; an
    untied one cannot be written."""
    if arch.output or "lm_head.weight" not in shapes:
        return shapes
    if config.get("tie_word_embeddings", True) is False:
        raise QuantkitError(f"config.json: tie_word_embeddings is false, but llama.cpp's {arch.gguf_arch} reads the "
                            "embeddings as the output head", "such a model has no GGUF form")
    return {name: shape for name, shape in shapes.items() if name != "lm_head.weight"}


# ----------------------------------------------------------------------------------------------- names


def name_table(arch: Architecture, n_layers: int) -> dict[str, str]:
    """HF tensor name -> GGUF tensor name for every tensor the architecture can have."""
    tmap = get_tensor_name_map(arch.model_arch, n_layers)
    table = {}
    for hf in arch.tensor_names(n_layers):
        gguf_name = tmap.get_name(hf, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise InternalError(f"{hf} has no GGUF name: our own list of names is wrong")
        table[hf] = gguf_name
    return table


@dataclass(frozen=True)
class Sizes:
    """The sizes tensor shapes are written in (from config.json's names; the experts' from experts.MoE)."""

    hidden: int
    ffn: int
    head_dim: int
    q_rows: int
    kv_rows: int
    vocab: int | None
    n_expert: int = 0  # mixture of experts: experts per layer, one expert's width, the shared expert's
    expert_ffn: int = 0
    shared_ffn: int = 0
    one: int = 1  # a single row (qwen2_moe's shared-expert gate)
    n_head: int = 0  # attention heads (gpt-oss's sinks: one per head)

    @property
    def qkv_rows(self) -> int:
        return self.q_rows + 2 * self.kv_rows

    @property
    def gate_up_rows(self) -> int:
        return 2 * self.ffn

    @classmethod
    def of(cls, config: dict, moe: Any = None) -> Sizes:
        """`moe`: an experts.MoE for a mixture of experts, else None."""
        h, n_head = config["hidden_size"], config["num_attention_heads"]
        head_dim = config.get("head_dim") or h // n_head
        experts = (moe.n_expert, moe.expert_ffn, moe.shared_ffn) if moe is not None else (0, 0, 0)
        return cls(h, config["intermediate_size"], head_dim, n_head * head_dim,
                   config.get("num_key_value_heads", n_head) * head_dim, config.get("vocab_size"), *experts, n_head=n_head)


def expected_shapes(arch: Architecture, config: dict, moe: Any = None) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape the config implies, for every tensor a model must have (optional ones:
    the output head where llama.cpp falls back to the embeddings, biases); experts under their merged names."""
    sizes = Sizes.of(config, moe)
    shapes = {"model.norm.weight": (sizes.hidden,)}
    if sizes.vocab:
        shapes["model.embed_tokens.weight"] = (sizes.vocab, sizes.hidden)
        if arch.needs_output:
            shapes["lm_head.weight"] = (sizes.vocab, sizes.hidden)
    for i in range(config["num_hidden_layers"]):
        shapes |= {f"model.layers.{i}.{name}": tuple(getattr(sizes, d) for d in dims) for name, dims in arch.layer.items()}
    return shapes


def shape_problems(arch: Architecture, config: dict, shapes: dict[str, tuple[int, ...]],
                   moe: Any = None) -> tuple[list[str], list[str]]:
    """(tensors missing, tensors whose shape contradicts the sizes in the config): llama.cpp and
    transformers refuse both. A mixture of experts' `shapes` hold each layer's experts merged
    (experts.merge_shapes); `moe` is its experts.MoE."""
    return modules.shape_problems(config, shapes, expected_shapes(arch, config, moe))


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


@dataclass(frozen=True)
class Rope:
    theta: float
    dims: int  # rotated dimensions of each head
    linear: float | None = None  # linear scaling factor (positions divided by it)
    theta_swa: float | None = None  # sliding-window layers' own base (gemma3)
    yarn: tuple[tuple[str, float], ...] = ()  # YaRN: (metadata key under rope.scaling., value), as the converter writes


# YaRN settings in rope_parameters -> llama.cpp's metadata key under rope.scaling. (the converter's choice)
_YARN = (("factor", "factor"), ("original_max_position_embeddings", "original_context_length"),
         ("extrapolation_factor", "yarn_ext_factor"), ("attention_factor", "yarn_attn_factor"),
         ("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow"))


def _rope(config: dict, arch: Architecture, head_dim: int) -> Rope:
    """Rope settings from rope_parameters (transformers 5) or rope_theta / rope_scaling (older configs);
    refuses a rope that llama.cpp would compute otherwise for this architecture."""
    params = _table(config, "rope_parameters") or _table(config, "rope_scaling")
    full = _table(params, "full_attention") if arch.rope_per_layer_type and "full_attention" in params else params
    kind = full.get("rope_type", full.get("type")) or "default"
    if kind not in arch.rope_types:
        raise QuantkitError(f"config.json: rope scaling {str(kind)[:40]!r} is not supported yet for GGUF output "
                            f"of {arch.gguf_arch}", f"supported there: {', '.join(arch.rope_types)}")
    theta = config_float(config, "rope_theta", 10000.0) if "rope_theta" in config else config_float(config, "rope_theta", 10000.0, where=full)
    linear = config_float(config, "factor", 1.0, where=full) if kind == "linear" else None
    yarn = ()
    if kind == "yarn":
        if full.get("factor") is None:  # llama.cpp's converter would write no scaling at all
            raise QuantkitError("config.json: yarn rope scaling without a factor", "llama.cpp needs one")
        config_int(full, "original_max_position_embeddings")
        yarn = tuple((key, full[name] if key == "original_context_length" else config_float(config, name, 0.0, where=full))
                     for name, key in _YARN if full.get(name) is not None)
    theta_swa = None
    if arch.rope_per_layer_type:
        sliding = _table(params, "sliding_attention")
        if (sliding.get("rope_type") or "default") != "default":
            raise QuantkitError(f"config.json: rope scaling {str(sliding['rope_type'])[:40]!r} on sliding-window layers "
                                "is not supported for GGUF output")
        theta_swa = config_float(config, "rope_theta", 10000.0, where=sliding) if sliding else config_float(config, "rope_local_base_freq", 10000.0)
    partial = config_float(config, "partial_rotary_factor", 1.0, where=full if "partial_rotary_factor" in full else config)
    if partial > 1 or (partial != 1 and not arch.partial_rope):
        raise QuantkitError(f"config.json: partial_rotary_factor = {partial} is not supported for GGUF output of {arch.gguf_arch}")
    return Rope(theta, int(head_dim * partial), linear, theta_swa, yarn)


def _swa_period(config: dict, arch: Architecture) -> int:
    """The sliding-window period of layer_types (one full-attention layer every N, the last of each N),
    the only layout llama.cpp's int pattern describes; refuses any other."""
    types = config.get("layer_types")
    if types is None:
        return config_int(config, "sliding_window_pattern", config_int(config, "_sliding_window_pattern", arch.swa_period))
    if not isinstance(types, list) or not all(t in ("sliding_attention", "full_attention") for t in types):
        raise QuantkitError(f"config.json: layer_types = {str(types)[:60]} is not a list of sliding_attention / full_attention")
    period = types.index("full_attention") + 1 if "full_attention" in types else 0
    if types != _layer_types(period, len(types)):
        raise QuantkitError(f"config.json: layer_types {str(types)[:60]} has no fixed sliding-window period",
                            "llama.cpp describes the layers by one period")
    return period


def _layer_types(period: int, n_layers: int) -> list[str]:
    """llama.cpp's set_swa_pattern: the last layer of every `period` has full attention (0: none does)."""
    return ["sliding_attention" if period == 0 or i % period < period - 1 else "full_attention" for i in range(n_layers)]


def _query_scalar(arch: Architecture, n_layers: int, hidden: int, n_head: int, head_dim: int) -> int:
    """What llama.cpp scales gemma's queries by (1/sqrt of it): head_dim, or n_embd / n_head for 27B."""
    return hidden // n_head if n_layers == arch.big_query_layers else head_dim


def _settings(config: dict, arch: Architecture) -> tuple[tuple[Setting, Any], ...]:
    values = []
    for s in arch.settings:
        if config.get(s.config_key) is None:
            if s.required:
                raise QuantkitError(f"config.json: {s.config_key} is missing", f"llama.cpp's {arch.gguf_arch} needs it")
            continue
        if s.gguf_key is None:
            raise QuantkitError(f"config.json: {s.config_key} = {str(config[s.config_key])[:40]} is not supported "
                                f"for GGUF output of {arch.gguf_arch}", "llama.cpp has no such setting there")
        values.append((s, config_int(config, s.config_key) if s.kind is int else config_float(config, s.config_key, 0.0)))
    return tuple(values)


def _check_family(config: dict, arch: Architecture, h: Hyper) -> None:
    """What llama.cpp's graph for this architecture fixes, checked against the config."""
    for key, value in (arch.activation, *arch.fixed):
        if config.get(key, value) != value:
            raise QuantkitError(f"config.json: {key} = {str(config[key])[:40]} is not supported for GGUF output of "
                                f"{arch.gguf_arch}", f"llama.cpp computes {value} there")
    if arch.big_query_layers:
        want = _query_scalar(arch, h.n_layers, h.hidden, h.n_head, h.head_dim)
        if config.get("query_pre_attn_scalar", want) != want:
            raise QuantkitError(f"config.json: query_pre_attn_scalar = {str(config['query_pre_attn_scalar'])[:40]}, "
                                f"but llama.cpp's {arch.gguf_arch} scales queries by 1/sqrt({want}) for this model",
                                "llama.cpp would compute another model")


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
    arch: Architecture | None = None
    rope: Rope | None = None
    settings: tuple[tuple[Setting, Any], ...] = ()
    swa_period: int = 0

    @classmethod
    def from_config(cls, config: dict, n_tensors: int, arch: Architecture | None = None) -> Hyper:
        """Every number GGUF output takes from config.json, checked: whole sizes within uint32, finite
        positive constants, tables where tables belong, and no more layers than the checkpoint has
        tensors (name tables and shape checks are built per layer). Each refusal names the key."""
        arch = arch or architecture_of(config)
        n_layers = config_int(config, "num_hidden_layers")
        if n_layers > n_tensors:
            raise QuantkitError(f"config.json: num_hidden_layers = {n_layers}, but the checkpoint holds {n_tensors} tensors",
                                "is the checkpoint what its config.json says?")
        n_head, hidden = config_int(config, "num_attention_heads"), config_int(config, "hidden_size")
        n_kv_head = config_int(config, "num_key_value_heads", n_head, high=n_head)
        head_dim = config_int(config, "head_dim", max(1, hidden // n_head))
        rope = _rope(config, arch, head_dim)
        h = cls(n_layers, hidden, config_int(config, "intermediate_size"), n_head, n_kv_head,
                config_int(config, "max_position_embeddings", 2048), rope.theta,
                config_float(config, "rms_norm_eps", 1e-6), config_int(config, "vocab_size"), head_dim,
                arch, rope, _settings(config, arch), _swa_period(config, arch) if arch.swa_period else 0)
        _check_family(config, arch, h)
        return h

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
    writer.add_rope_dimension_count(h.rope.dims if h.rope else h.head_dim)
    if h.head_dim != h.hidden // h.n_head or h.arch is not None and (h.arch.big_query_layers or h.arch.head_dim_keys):
        writer.add_key_length(h.head_dim)  # as llama.cpp's converter writes for gemma, always
        writer.add_value_length(h.head_dim)
    if h.rope is not None and h.rope.linear is not None:
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(h.rope.linear)
    if h.rope is not None and h.rope.yarn:
        writer.add_rope_scaling_type(RopeScalingType.YARN)
        for key, value in h.rope.yarn:
            name = f"{writer.arch}.rope.scaling.{key}"
            writer.add_uint32(name, value) if key == "original_context_length" else writer.add_float32(name, value)
    if h.rope is not None and h.rope.theta_swa is not None:
        writer.add_rope_freq_base_swa(h.rope.theta_swa)
    for setting, value in h.settings:
        key = f"{writer.arch}.{setting.gguf_key}"
        writer.add_uint32(key, value) if setting.kind is int else writer.add_float32(key, value)
    if h.arch is not None and h.arch.swa_period and h.swa_period != h.arch.swa_period:
        writer.add_sliding_window_pattern(h.swa_period)


def _float32(value: float) -> float:
    """A float32 from the metadata as the decimal it was written from: 1e-05, not 9.99e-06."""
    return float(str(np.float32(value)))


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
    n_layers = int(get("block_count"))
    if n_layers > len(tensor_names):  # name tables are built per block
        raise QuantkitError(f"GGUF metadata {arch_name}.block_count = {n_layers} exceeds the tensor count")
    tokens = meta.get("tokenizer.ggml.tokens")
    has_vocab = f"{arch_name}.vocab_size" in meta or (isinstance(tokens, list) and tokens)
    vocab = get("vocab_size", len(tokens) if isinstance(tokens, list) else None) if has_vocab else None
    head_dim = int(get("attention.key_length", hidden // n_head))
    config = {
        "architectures": [arch.hf_class], "model_type": arch.model_type,
        "hidden_size": hidden, "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": n_layers, "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": _float32(get("attention.layer_norm_rms_epsilon", kind=(int, float))),
        "head_dim": head_dim,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        arch.activation[0]: arch.activation[1], "dtype": dtype,
    }
    config |= _rope_config(arch, get, head_dim, meta.get(f"{arch_name}.rope.scaling.type"))
    if vocab is not None:
        config["vocab_size"] = int(vocab)
    config["pad_token_id"] = None  # unless the file names one: Phi3Config's default (32000) may lie past the vocabulary
    for key, field_name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                            ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{key}" in meta:
            token_id = meta[f"tokenizer.ggml.{key}"]
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise QuantkitError(f"GGUF metadata tokenizer.ggml.{key} = {str(token_id)[:40]} is not a token id")
            config[field_name] = token_id
    if arch.model_type.startswith(("qwen2", "qwen3")):
        config["use_sliding_window"] = False
    if not arch.model_type.startswith("qwen2"):
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    for s in arch.settings:
        if s.gguf_key is not None and meta.get(f"{arch_name}.{s.gguf_key}"):  # phi3 writes sliding_window 0 for none
            value = get(s.gguf_key, kind=s.kind if s.kind is int else (int, float))
            config[s.config_key] = int(value) if s.kind is int else _float32(value)
        elif not s.required:
            config[s.config_key] = None
    if arch.swa_period:
        pattern = meta.get(f"{arch_name}.attention.sliding_window_pattern", arch.swa_period)
        if config.get("sliding_window") is None:
            config["layer_types"] = ["full_attention"] * n_layers
        elif isinstance(pattern, list) and len(pattern) == n_layers:
            config["layer_types"] = ["sliding_attention" if swa else "full_attention" for swa in pattern]
        elif isinstance(pattern, int) and not isinstance(pattern, bool) and 0 <= pattern <= n_layers:
            config["layer_types"] = _layer_types(pattern, n_layers)
        else:
            raise QuantkitError(f"GGUF metadata {arch_name}.attention.sliding_window_pattern = {str(pattern)[:40]} "
                                "describes no layers", "the file is damaged")
    if arch.big_query_layers:
        config["query_pre_attn_scalar"] = _query_scalar(arch, n_layers, hidden, n_head, head_dim)
    return config


def _rope_config(arch: Architecture, get: Callable, head_dim: int, scaling: Any) -> dict:
    """config.json's rope keys from the metadata (llama, mistral, qwen2: rope_theta as before)."""
    theta = float(get("rope.freq_base", 10000.0, kind=(int, float)))
    if scaling not in (None, "none", *arch.rope_types):
        raise QuantkitError(f"GGUF rope scaling {str(scaling)[:40]!r} is not supported yet for {arch.gguf_arch}",
                            f"supported there: {', '.join(arch.rope_types)}")
    if arch.gguf_arch in ("llama", "qwen2", "qwen2moe", "qwen3moe"):
        return {"rope_theta": theta}
    full: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    if scaling == "linear":
        full |= {"rope_type": "linear", "factor": _float32(get("rope.scaling.factor", kind=(int, float)))}
    dims = int(get("rope.dimension_count", head_dim))
    if dims != head_dim:
        if not arch.partial_rope or dims > head_dim:
            raise QuantkitError(f"GGUF metadata {arch.gguf_arch}.rope.dimension_count = {dims} is not supported "
                                f"(heads of {head_dim})")
        full["partial_rotary_factor"] = dims / head_dim
    if not arch.rope_per_layer_type:
        return {"rope_parameters": full}
    sliding = {"rope_type": "default", "rope_theta": float(get("rope.freq_base_swa", 10000.0, kind=(int, float)))}
    return {"rope_parameters": {"full_attention": full, "sliding_attention": sliding}}


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
