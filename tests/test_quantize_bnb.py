"""quantize to bitsandbytes formats: byte-for-byte what transformers + bitsandbytes write, and loadable."""

from __future__ import annotations

import json

import pytest

from tests.conftest import assert_same_tensors, auto_class, load_tensors, reference_bnb

CASES = {
    "nf4": (["--method", "nf4"], dict(load_in_4bit=True, bnb_4bit_quant_type="nf4")),
    "nf4-dq": (["--method", "nf4", "--double-quant", "--compute-dtype", "bfloat16"],
               dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="bfloat16")),
    "fp4-dq": (["--method", "fp4", "--double-quant"], dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True)),
    "int8": (["--method", "int8"], dict(load_in_8bit=True)),
}  # fmt: skip


def without_buffers(tensors: dict) -> dict:
    return {k: v for k, v in tensors.items() if not k.endswith("position_ids")}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "bert"])
def test_identical_to_transformers(models, tmp_path, cli, arch, case):
    flags, bnb_kwargs = CASES[case]
    code, _, stderr = cli("quantize", models[arch], tmp_path / "ours", *flags, "--json")
    assert code == 0, stderr
    theirs = reference_bnb(models[arch], tmp_path / "theirs", **bnb_kwargs)
    assert_same_tensors(load_tensors(tmp_path / "ours"), without_buffers(load_tensors(theirs)))
    ours_qc = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    assert ours_qc == json.loads((theirs / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("backend", ["numpy", "torch", "c"])
def test_backends_give_the_same_bytes(models, tmp_path, cli, backend):
    code, _, err = cli("quantize", models["gpt2"], tmp_path / backend, "--method", "fp4", "--double-quant", "--backend", backend)
    assert code == 0, err
    code, _, err = cli("quantize", models["gpt2"], tmp_path / "ref", "--method", "fp4", "--double-quant", "--backend", "numpy")
    assert_same_tensors(load_tensors(tmp_path / backend), load_tensors(tmp_path / "ref"))


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_transformers_loads_and_runs_our_output(models, tmp_path, cli, method):
    import bitsandbytes as bnb
    import torch

    cli("quantize", models["llama"], tmp_path / "q", "--method", method, "--double-quant" if method == "nf4" else "--no-double-quant")
    model = auto_class(tmp_path / "q").from_pretrained(tmp_path / "q", device_map="cpu")
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit if method == "nf4" else bnb.nn.Linear8bitLt)
    dense = auto_class(models["llama"]).from_pretrained(models["llama"], dtype=torch.float32)
    ids = torch.arange(12)[None]
    with torch.no_grad():
        ours, ref = model(ids).logits.float(), dense(ids).logits
    assert torch.isfinite(ours).all()
    assert torch.nn.functional.cosine_similarity(ours.flatten(), ref.flatten(), dim=0) > 0.9


def test_skip_writes_full_module_names(models, tmp_path, cli):
    code, _, err = cli("quantize", models["llama"], tmp_path / "q", "--method", "nf4", "--skip", "*.mlp.down_proj")
    assert code == 0, err
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["llm_int8_skip_modules"] == ["lm_head", "model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    tensors = load_tensors(tmp_path / "q")
    assert "model.layers.0.mlp.down_proj.weight.absmax" not in tensors
    # transformers keeps exactly those modules dense when loading
    model = auto_class(tmp_path / "q").from_pretrained(tmp_path / "q", device_map="cpu")
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Linear"


def test_quant_storage_bfloat16_matches_transformers(models, tmp_path, cli):
    code, _, err = cli("quantize", models["llama"], tmp_path / "ours", "--method", "nf4", "--quant-storage", "bfloat16")
    assert code == 0, err
    theirs = reference_bnb(models["llama"], tmp_path / "theirs", load_in_4bit=True, bnb_4bit_quant_type="nf4",
                           bnb_4bit_quant_storage="bfloat16")
    assert_same_tensors(load_tensors(tmp_path / "ours"), load_tensors(theirs))


def test_sharded_output_has_an_index(models, tmp_path, cli):
    code, out, err = cli("quantize", models["llama"], tmp_path / "q", "--method", "int8", "--max-shard-size", "40KB", "--json")
    assert code == 0, err
    files = json.loads(out)["files"]
    assert "model.safetensors.index.json" in files and len(files) > 3
    index = json.loads((tmp_path / "q" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(load_tensors(tmp_path / "q"))
    model = auto_class(tmp_path / "q").from_pretrained(tmp_path / "q", device_map="cpu")
    assert model is not None


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("case", ["nf4-dq", "int8"])
def test_identical_for_other_source_dtypes(tmp_path, cli, dtype, case):
    from tests.conftest import build_model

    src = build_model("llama", tmp_path / "src", dtype=dtype)
    flags, bnb_kwargs = CASES[case]
    assert cli("quantize", src, tmp_path / "ours", *flags)[0] == 0
    theirs = reference_bnb(src, tmp_path / "theirs", **bnb_kwargs)
    assert_same_tensors(load_tensors(tmp_path / "ours"), load_tensors(theirs))


@pytest.mark.parametrize("method, bad, message", [("int8", 70000.0, "beyond float16's range"), ("int8", float("inf"), "infinite"),
                                                  ("nf4", float("nan"), "NaN or infinite")])
def test_values_the_method_cannot_hold_are_refused_naming_the_tensor(models, tmp_path, cli, method, bad, message):
    import shutil

    from safetensors.torch import save_file

    src = shutil.copytree(models["llama"], tmp_path / "src")
    tensors = load_tensors(src)
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = bad
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt"})
    code, _, err = cli("quantize", src, tmp_path / "q", "--method", method)
    assert code == 2 and "model.layers.1.mlp.up_proj.weight" in err and message in err, err
    assert not (tmp_path / "q").exists()
