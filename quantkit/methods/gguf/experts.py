"""Mixture-of-experts layers in GGUF (mixtral, qwen2_moe, qwen3_moe, gpt-oss): the per-expert tensors a
Hugging Face checkpoint stores (`block_sparse_moe.experts.N.w1`, `mlp.experts.N.gate_proj`, ...) that
llama.cpp keeps as one 3-D tensor per layer and role (ffn_gate_exps / ffn_up_exps / ffn_down_exps), gpt-oss's
fused ones it splits (file.Part) and its MXFP4 blocks it keeps, and the metadata that goes with them.

A 3-D GGUF tensor is its experts' matrices one after the other (expert-major), and rows quantize
independently, so merging is writing each expert's rows in turn and splitting is a view of one expert's
rows: neither needs more than one expert in memory.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from gguf import GGUFWriter

from quantkit.errors import QuantkitError
from quantkit.methods.gguf.file import GGUFTensor, Part, config_int

# model.layers.3.mlp.experts.7.gate_proj.weight -> (model.layers.3.mlp.experts, 7, gate_proj.weight)
_EXPERT = re.compile(r"^(model\.layers\.\d+\.(?:block_sparse_moe|mlp)\.experts)\.(\d+)\.([A-Za-z0-9_]+\.weight)$")


@dataclass(frozen=True)
class Layout:
    """How one family sizes its experts in config.json (their tensors and shapes: its entry in
    file.ARCHITECTURES)."""

    count_keys: tuple[str, ...]  # config.json keys for the expert count, the first present wins
    ffn_key: str  # config.json key of one expert's width
    shared: bool = False  # qwen2_moe: a shared expert beside the routed ones, and its sigmoid gate
    norm_topk_prob: bool = True  # whether llama.cpp renormalizes the chosen experts' weights


LAYOUTS = {
    "mixtral": Layout(("num_local_experts",), "intermediate_size"),
    "qwen2_moe": Layout(("num_experts", "num_local_experts"), "moe_intermediate_size", shared=True, norm_topk_prob=False),
    "qwen3_moe": Layout(("num_experts", "num_local_experts"), "moe_intermediate_size"),
    "gpt_oss": Layout(("num_local_experts",), "intermediate_size"),
}


@dataclass(frozen=True)
class MoE:
    """The expert numbers llama.cpp needs, in HF's terms."""

    layout: str  # a key of LAYOUTS
    n_expert: int
    n_used: int
    expert_ffn: int
    shared_ffn: int = 0
    warnings: tuple[str, ...] = ()

    @classmethod
    def from_config(cls, config: dict, layout: str) -> MoE:
        """The expert sizes from config.json, checked; refuses layers without experts (llama.cpp's graphs
        for these families have none), warns where llama.cpp's routing differs from the config's."""
        lay = LAYOUTS[layout]
        count_key = next((k for k in lay.count_keys if k in config), lay.count_keys[0])
        n_expert = config_int(config, count_key, high=2**16)
        n_used = config_int(config, "num_experts_per_tok", high=n_expert)
        step = config.get("decoder_sparse_step", 1)
        if step != 1 or config.get("mlp_only_layers"):
            raise QuantkitError(f"config.json: decoder_sparse_step = {str(step)[:20]}, mlp_only_layers = "
                                f"{str(config.get('mlp_only_layers'))[:40]}: layers without experts are not "
                                "supported", "llama.cpp's graph for this architecture gives every layer experts")
        shared = config_int(config, "shared_expert_intermediate_size") if lay.shared else 0
        warnings = ()
        norm = config.get("norm_topk_prob", lay.norm_topk_prob)
        if layout != "mixtral" and bool(norm) != lay.norm_topk_prob:
            warnings = (f"config.json: norm_topk_prob = {norm}, but llama.cpp's {layout} "
                        f"{'always' if lay.norm_topk_prob else 'never'} renormalizes the chosen experts' "
                        "weights: its outputs will differ from transformers'",)
        return cls(layout, n_expert, n_used, config_int(config, lay.ffn_key), shared, warnings)

    def write(self, writer: GGUFWriter) -> None:
        """The keys llama.cpp's converter writes for this family."""
        writer.add_expert_count(self.n_expert)
        writer.add_expert_used_count(self.n_used)
        if self.layout != "mixtral":
            writer.add_expert_feed_forward_length(self.expert_ffn)
        if self.shared_ffn:
            writer.add_expert_shared_feed_forward_length(self.shared_ffn)


def expert_of(hf_name: str) -> tuple[str, int] | None:
    """(merged HF name, expert index) of one expert's tensor; None for any other tensor."""
    m = _EXPERT.match(hf_name)
    return (f"{m.group(1)}.{m.group(3)}", int(m.group(2))) if m else None


def member_names(merged: str, n_expert: int) -> list[str]:
    """The per-expert HF names a merged tensor is made of, in expert order."""
    head, leaf = merged.rsplit(".experts.", 1)
    return [f"{head}.experts.{e}.{leaf}" for e in range(n_expert)]


def merge_shapes(shapes: dict[str, tuple[int, ...]], n_expert: int) -> tuple[dict[str, tuple[int, ...]], dict[str, list[str]]]:
    """(shapes with each layer's experts merged into one (n_expert, rows, cols) tensor, placed where its
    first expert was; merged name -> its experts' names). Refuses a missing expert or experts of
    different shapes, naming the tensor."""
    groups: dict[str, list[str]] = {}
    merged: dict[str, tuple[int, ...]] = {}
    for name, shape in shapes.items():
        found = expert_of(name)
        if found is None:
            merged[name] = tuple(shape)
            continue
        whole, e = found
        if e >= n_expert:
            raise QuantkitError(f"tensor {name}: expert {e}, but config.json gives {n_expert} experts")
        if whole not in groups:
            groups[whole] = member_names(whole, n_expert)
            merged[whole] = (n_expert, *shape)
        elif merged[whole][1:] != tuple(shape):
            raise QuantkitError(f"tensor {name} has shape {tuple(shape)}, expert 0 has {merged[whole][1:]}",
                                "every expert of a layer must have the same shape")
    for whole, names in groups.items():
        absent = [n for n in names if n not in shapes]
        if absent:
            raise QuantkitError(f"tensor {absent[0]} is missing ({len(absent)} of {whole}'s experts are)",
                                "llama.cpp keeps a layer's experts as one tensor")
    return merged, groups


def split(t: GGUFTensor, merged: str) -> dict[str, GGUFTensor]:
    """A 3-D expert tensor as one 2-D view per expert (HF name -> the expert's rows in the file)."""
    n_expert = t.shape[0]
    each = t.nbytes // n_expert
    return {name: replace(t, shape=t.shape[1:], offset=t.offset + e * each, nbytes=each)
            for e, name in enumerate(member_names(merged, n_expert))}


def hf_config(meta: dict[str, Any], arch_name: str, layout: str) -> dict[str, Any]:
    """config.json's MoE keys from GGUF metadata (the inverse of MoE.write); norm_topk_prob as llama.cpp
    computes, so transformers runs the model llama.cpp runs."""

    def get(key: str) -> int:
        value = meta.get(f"{arch_name}.{key}")
        if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**31:
            raise QuantkitError(f"GGUF metadata {arch_name}.{key} = {str(value)[:40]} is not a positive number",
                                "a mixture-of-experts model needs it")
        return value

    lay = LAYOUTS[layout]
    config: dict[str, Any] = {lay.count_keys[0]: get("expert_count"), "num_experts_per_tok": get("expert_used_count")}
    if layout == "mixtral":
        return config
    config |= {lay.ffn_key: get("expert_feed_forward_length"), "norm_topk_prob": lay.norm_topk_prob,
               "decoder_sparse_step": 1, "mlp_only_layers": []}
    if lay.shared:
        config["shared_expert_intermediate_size"] = get("expert_shared_feed_forward_length")
    return config


def split_parts(shapes: dict[str, tuple[int, ...]], parts: dict[str, tuple[Part, ...]]
                ) -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[str, Part]]]:
    """(shapes with each layer tensor that `parts` names replaced by the tensors the converter makes of it,
    in its place; made name -> (source name, its Part)). Refuses a source whose fused axis does not split."""
    out: dict[str, tuple[int, ...]] = {}
    made: dict[str, tuple[str, Part]] = {}
    for name, shape in shapes.items():
        m = _LAYER.match(name)
        if m is None or m.group(2) not in parts:
            out[name] = shape
            continue
        for part in parts[m.group(2)]:
            whole = part.shape(shape, split=False) if len(shape) >= (2 if part.transposed else 1) else None
            if whole is None or whole[part.axis] % part.parts:
                raise QuantkitError(f"tensor {name} has shape {list(shape)}, which llama.cpp's converter cannot split "
                                    f"into {part.parts} parts", "is the checkpoint what its config.json says?")
            out[f"{m.group(1)}.{part.leaf}"] = part.shape(shape)
            made[f"{m.group(1)}.{part.leaf}"] = (name, part)
    return out, made


_LAYER = re.compile(r"^(model\.layers\.\d+)\.(.+)$")


def ggml_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """ggml's MXFP4 rows from OCP MXFP4 (gpt-oss's blocks): per block of 32, the e8m0 scale byte, then 16 bytes
    whose low nibbles hold values 0..15 and high nibbles 16..31 (ggml's Q4_0 order; the source pairs values
    2k, 2k + 1 in a byte): blocks uint8 [..., out, in / 32, 16] and scales [..., out, in / 32] (api.Mxfp4Blocks)
    -> uint8 [..., out, in / 32 * 17]; the codes and scales move unchanged."""
    codes = np.stack((blocks & 0x0F, blocks >> 4), axis=-1).reshape(*blocks.shape[:-1], 32)
    qs = codes[..., :16] | (codes[..., 16:] << 4)
    rows = np.concatenate((scales[..., None], qs), axis=-1)
    return rows.reshape(*rows.shape[:-2], -1)
