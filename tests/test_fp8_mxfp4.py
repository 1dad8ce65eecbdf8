"""Fine-grained FP8 (quant_method "fp8") and gpt-oss MXFP4 (quant_method "mxfp4"): dequantize equals
transformers' own CPU dequantization bit for bit in float32, ragged edge blocks and bf16 scale_inv
included; `quantize --method fp8-block --layout fp8` loads in transformers' FP8 integration and runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.conftest import load_tensors
from tests.releases import gpt_oss_mxfp4, publisher_fp8, qwen3


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
