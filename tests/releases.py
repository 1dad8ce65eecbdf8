"""Small releases as their publishers write them, for the tests and for `make examples` (scripts/examples.py):
a fine-grained FP8 release (quant_method "fp8": DeepSeek-V3/R1, Qwen3-FP8) made from a tiny random Qwen3,
and a gpt-oss release (quant_method "mxfp4": experts as `*_blocks` / `*_scales`) with a tokenizer beside it."""

from __future__ import annotations

import json
import math
from pathlib import Path

from tests.conftest import load_tensors


def qwen3(folder, hidden: int, inter: int):
    """A random bf16 Qwen3ForCausalLM (2 layers) saved with save_pretrained."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    config = tf.Qwen3Config(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=hidden // 4, vocab_size=300, max_position_embeddings=128,
                            tie_word_embeddings=False)  # fmt: skip
    model = tf.Qwen3ForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():  # rows of very different magnitudes: blocks get very different scales
        for p in model.parameters():
            if p.ndim == 2:
                p.mul_(torch.exp(torch.randn(p.shape[0], 1) * 1.5).to(p.dtype))
    model.save_pretrained(folder)
    return folder


def publisher_fp8(src, out, scale_dtype):
    """An FP8 release as publishers write it (DeepSeek / Qwen3-FP8): written here with torch, block by block,
    ragged edge blocks unpadded, weight_scale_inv in `scale_dtype`."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for name, w in load_tensors(src).items():
        if name.endswith("proj.weight"):
            rows, cols = w.shape
            scale = torch.empty(math.ceil(rows / 128), math.ceil(cols / 128))
            q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
            for i in range(scale.shape[0]):
                for j in range(scale.shape[1]):
                    block = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float()
                    scale[i, j] = block.abs().amax() / 448
                    q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (block / scale[i, j]).to(torch.float8_e4m3fn)
            tensors[name], tensors[name + "_scale_inv"] = q, scale.to(scale_dtype)
        else:
            tensors[name] = w
    out.mkdir()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": [128, 128]}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    return out


def gpt_oss_mxfp4(folder, codes: tuple[int, int] = (112, 132), every_code: bool = True):
    """A tiny gpt-oss release: expert weights as random MXFP4 blocks with e8m0 codes drawn from `codes`, and
    (`every_code`) every code among the scales whose values stay finite in float32 (from 253 on,
    6 * 2**(code - 127) overflows: such a release is damaged, and dequantize refuses it, naming the tensor);
    a trained byte-level BPE tokenizer beside it, as releases have (llama.cpp's converter needs one)."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    from tests.gguf_checkpoints import train_tokenizer

    config = tf.GptOssConfig(hidden_size=256, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=64, vocab_size=300, num_local_experts=4, num_experts_per_tok=2,
                             max_position_embeddings=128, layer_types=["sliding_attention", "full_attention"])  # fmt: skip
    torch.manual_seed(0)
    model = tf.GptOssForCausalLM(config)
    with torch.no_grad():  # transformers starts biases and sinks at zero, which would hide a misplaced one
        for name, p in model.named_parameters():
            if name.endswith(("bias", "sinks")):
                p.normal_(0, 0.5 if name.endswith("sinks") else 0.05)
    model = model.to(torch.bfloat16)
    generator = torch.Generator().manual_seed(2)
    tensors = {}
    for name, value in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            experts, inputs, outputs = value.shape
            tensors[name + "_blocks"] = torch.randint(0, 256, (experts, outputs, inputs // 32, 16), generator=generator, dtype=torch.uint8)
            scales = torch.randint(*codes, (experts, outputs, inputs // 32), generator=generator, dtype=torch.uint8)
            if every_code:
                scales.view(-1)[:253] = torch.arange(253, dtype=torch.uint8)
            tensors[name + "_scales"] = scales
        else:
            tensors[name] = value.contiguous()
    folder.mkdir()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    saved = config.to_dict()
    saved.update(architectures=["GptOssForCausalLM"], dtype="bfloat16", quantization_config={
        "quant_method": "mxfp4", "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                                            "model.embed_tokens", "lm_head"]})  # fmt: skip
    (folder / "config.json").write_text(json.dumps(saved))
    train_tokenizer(folder, config.vocab_size)
    return folder


def hub_style(release: Path, out: Path) -> Path:
    """The release with config.json as openai's releases on the Hub spell it: rope_scaling and a top-level
    rope_theta (not transformers 5's rope_parameters), their extra keys, swiglu_alpha left to its default."""
    import shutil

    shutil.copytree(release, out)
    config = json.loads((out / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config |= {"rope_theta": rope.pop("rope_theta"), "rope_scaling": rope, "experts_per_token": config["num_experts_per_tok"],
               "initial_context_length": 4096, "max_position_embeddings": 131072}
    del config["swiglu_alpha"]
    (out / "config.json").write_text(json.dumps(config))
    return out
