"""Fine-grained FP8 (quant_method "fp8") and gpt-oss MXFP4 (quant_method "mxfp4"): dequantize equals
transformers' own CPU dequantization bit for bit in float32, ragged edge blocks and bf16 scale_inv
included; `quantize --method fp8-block --layout fp8` loads in transformers' FP8 integration and runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tests.conftest import load_tensors


def qwen3(folder, hidden: int, inter: int):
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


def transformers_weights(folder, dtype: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), device_map="cpu")
    return {k: v.float().numpy() for k, v in model.state_dict().items()}


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_fp8_dequantize_equals_transformers(tmp_path, cli, scale_dtype, dtype):
    import torch

    release = publisher_fp8(qwen3(tmp_path / "src", 256, 384), tmp_path / "fp8", getattr(torch, scale_dtype))
    code, _, err = cli("dequantize", release, tmp_path / "dense", "--dtype", dtype)
    assert code == 0, err
    ours = {k: v.float().numpy() for k, v in load_tensors(tmp_path / "dense").items()}
    assert not any(k.endswith("_scale_inv") for k in ours)
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    theirs = transformers_weights(release, dtype)
    checked = [k for k in ours if k.endswith("proj.weight")]
    assert len(checked) == 14
    for k in checked:
        assert np.array_equal(bits(ours[k]), bits(theirs[k])), k


@pytest.mark.parametrize("scale_dtype", ["float32", "bfloat16"])
def test_fp8_ragged_edges_follow_the_format(tmp_path, cli, scale_dtype):
    """320 x 200 weights: edge blocks of 64 and 72. transformers infers the block from the grid on CPU and
    gets these wrong, so the reference is the format's definition computed with torch's own float8."""
    import torch

    release = publisher_fp8(qwen3(tmp_path / "src", 320, 200), tmp_path / "fp8", getattr(torch, scale_dtype))
    code, _, err = cli("dequantize", release, tmp_path / "dense", "--dtype", "float32")
    assert code == 0, err
    ours, stored = load_tensors(tmp_path / "dense"), load_tensors(release)
    for k in [k for k in stored if k.endswith("_scale_inv")]:
        weight = k.removesuffix("_scale_inv")
        scale = stored[k].float().repeat_interleave(128, 0).repeat_interleave(128, 1)
        expected = stored[weight].float() * scale[: stored[weight].shape[0], : stored[weight].shape[1]]
        assert torch.equal(ours[weight].view(torch.int32), expected.view(torch.int32)), weight
    code, out, _ = cli("verify", release, "--reference", tmp_path / "src", "--json")
    assert code == 0, out


def test_fp8_writer_loads_in_transformers_and_runs(tmp_path, cli):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    src = qwen3(tmp_path / "src", 256, 384)
    code, _, err = cli("quantize", src, tmp_path / "fp8", "--method", "fp8-block", "--layout", "fp8")
    assert code == 0, err
    qc = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["weight_block_size"], qc["activation_scheme"]) == ("fp8", [128, 128], "dynamic")
    ours, dense = load_tensors(tmp_path / "fp8"), load_tensors(src)
    assert "lm_head.weight_scale_inv" not in ours and ours["lm_head.weight"].dtype == torch.bfloat16

    class Quantizer:  # what Fp8Quantize reads of transformers' quantizer
        quantization_config = type("C", (), {"weight_block_size": (128, 128), "scale_fmt": "float"})()

    for name in [k for k in dense if k.endswith("proj.weight")]:  # the same bytes as transformers' quantize-on-load
        theirs = Fp8Quantize(Quantizer())._quantize_one(name, dense[name])
        assert torch.equal(ours[name].view(torch.uint8), theirs[name].view(torch.uint8)), name
        assert torch.equal(ours[name.removesuffix("weight") + "weight_scale_inv"], theirs[name.removesuffix("weight") + "weight_scale_inv"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "fp8", device_map="cpu")
    ids = torch.tensor([[1, 5, 9, 42, 7]])
    with torch.no_grad():
        logits = model(ids).logits.float()
        reference = AutoModelForCausalLM.from_pretrained(src, device_map="cpu")(ids).logits.float()
    assert torch.isfinite(logits).all()
    # weights and (dynamically) activations in e4m3, on heavy-tailed random rows: 16% measured
    assert (logits - reference).norm() / reference.norm() < 0.3
    code, out, _ = cli("verify", tmp_path / "fp8", "--reference", src, "--json")
    assert code == 0, out


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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_mxfp4_dequantize_equals_transformers(tmp_path, cli, dtype):
    release = gpt_oss_mxfp4(tmp_path / "mxfp4")
    code, _, err = cli("dequantize", release, tmp_path / "dense", "--dtype", dtype)
    assert code == 0, err
    ours = {k: v.float().numpy() for k, v in load_tensors(tmp_path / "dense").items()}
    theirs = transformers_weights(release, dtype)
    experts = [k for k in ours if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(experts) == 4 and not any(k.endswith(("_blocks", "_scales")) for k in ours)
    for k in experts:
        assert ours[k].shape == theirs[k].shape, k
        same = (bits(ours[k]) == bits(theirs[k])) | (np.isnan(ours[k]) & np.isnan(theirs[k]))
        assert same.all(), k
    # and the dense result loads as a plain gpt-oss
    dense = transformers_weights(tmp_path / "dense", dtype)
    assert all(np.array_equal(bits(dense[k]), bits(ours[k])) for k in experts)


def test_layout_fp8_only_for_fp8_block(tmp_path, cli, models):
    code, _, err = cli("quantize", models["llama"], tmp_path / "q", "--method", "nf4", "--layout", "fp8")
    assert code == 2 and "--layout fp8" in err
