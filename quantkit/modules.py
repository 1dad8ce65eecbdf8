"""Which tensors are linear weights, output heads, embeddings or GPT-2's Conv1D: transformers' rules,
from tensor names, shapes and config.json alone (no model is built)."""

from __future__ import annotations

import fnmatch

from quantkit.dtypes import FLOATS
from quantkit.io.safetensors import TensorInfo
from quantkit.io.source import Checkpoint

CONV1D_MODEL_TYPES = {"gpt2", "openai-gpt", "imagegpt", "decision_transformer"}
CONV1D_LEAVES = {"c_attn", "c_proj", "c_fc", "q_attn"}
EMBEDDING_LEAVES = {"wte", "wpe", "shared", "tok_embeddings"}
HEAD_LEAVES = {"lm_head"}
# Buffers transformers does not save (non-persistent); dropped so our output matches what it writes.
NON_PERSISTENT = ("position_ids", "rotary_emb.inv_freq", "attn.masked_bias")


def module_of(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def leaf(module: str) -> str:
    return module.rsplit(".", 1)[-1]


def is_conv1d(config: dict, module: str) -> bool:
    return config.get("model_type") in CONV1D_MODEL_TYPES and leaf(module) in CONV1D_LEAVES


def is_linear_weight(name: str, info: TensorInfo) -> bool:
    """A 2-D float `.weight` of a module that is not an embedding."""
    if not name.endswith(".weight") or len(info.shape) != 2 or info.dtype not in FLOATS:
        return False
    module = module_of(name)
    return "embed" not in leaf(module) and leaf(module) not in EMBEDDING_LEAVES


def head_modules(checkpoint: Checkpoint) -> list[str]:
    """Modules transformers keeps in full precision: the output head and whatever shares the embedding."""
    heads = sorted({module_of(n) for n in checkpoint.tensors if leaf(module_of(n)) in HEAD_LEAVES})
    if checkpoint.config.get("tie_word_embeddings", True):
        # A head tied to the input embeddings (BERT's MLM decoder, say) carries their shape.
        embeddings = {info.shape for n, info in checkpoint.tensors.items() if "word_embeddings" in n or "embed_tokens" in n}
        heads += sorted(
            module_of(n) for n, info in checkpoint.tensors.items()
            if n.endswith("decoder.weight") and info.shape in embeddings and module_of(n) not in heads
        )  # fmt: skip
    return heads or ["lm_head"]


def matches(module: str, globs: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(module, g) for g in globs)


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape the config implies, for every tensor a model must have (optional ones:
    the output head when embeddings are tied, biases)."""
    h, ffn, n_layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or h // config["num_attention_heads"]
    q_rows, kv_rows = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    shapes = {"model.norm.weight": (h,)}
    if config.get("vocab_size"):
        shapes["model.embed_tokens.weight"] = (config["vocab_size"], h)
    for i in range(n_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (q_rows, h), p + "self_attn.k_proj.weight": (kv_rows, h),
                   p + "self_attn.v_proj.weight": (kv_rows, h), p + "self_attn.o_proj.weight": (h, q_rows),
                   p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                   p + "mlp.down_proj.weight": (h, ffn)}
    return shapes


def shape_problems(config: dict, shapes: dict[str, tuple[int, ...]],
                   expected: dict[str, tuple[int, ...]] | None = None) -> tuple[list[str], list[str]]:
    """(tensors missing, tensors whose shape contradicts the sizes in the config), for the llama family
    (llama, mistral, qwen2; `expected` for others: HF name -> shape): llama.cpp and transformers refuse both.
    A bias takes its weight's rows; the output head, the embeddings' shape."""
    expected = expected_shapes(config) if expected is None else expected
    missing = [f"{name} is missing" for name in expected if name not in shapes]
    wrong = []
    for name, shape in shapes.items():
        want = expected.get(name)
        if want is None and name.endswith(".bias"):
            weight = expected.get(name.removesuffix(".bias") + ".weight")
            want = weight[:1] if weight else None
        if name == "lm_head.weight":
            want = expected.get("model.embed_tokens.weight")
        if want is not None and tuple(shape) != want:
            wrong.append(f"{name} has shape {tuple(shape)}, the config implies {want}")
    return missing, wrong
