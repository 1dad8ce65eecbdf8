"""dequantize and verify on checkpoints written by quantkit and by transformers + bitsandbytes."""

from __future__ import annotations

import json
import shutil
import struct

import pytest

from tests.conftest import auto_class, load_tensors, reference_bnb

METHODS = {
    "nf4-dq": (["--method", "nf4", "--double-quant"], dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)),
    "fp4": (["--method", "fp4"], dict(load_in_4bit=True, bnb_4bit_quant_type="fp4")),
    "int8": (["--method", "int8"], dict(load_in_8bit=True)),
}  # fmt: skip


@pytest.fixture(scope="module")
def written(models, tmp_path_factory):
    """For each method: the checkpoint transformers writes and the one quantkit writes (Llama and GPT-2)."""
    from typer.testing import CliRunner

    from quantkit.cli import app

    root = tmp_path_factory.mktemp("quantized")
    out = {}
    for arch in ("llama", "gpt2"):
        for method, (flags, kwargs) in METHODS.items():
            out[arch, method, "theirs"] = reference_bnb(models[arch], root / f"{arch}-{method}-theirs", **kwargs)
            result = CliRunner().invoke(app, ["quantize", str(models[arch]), str(root / f"{arch}-{method}-ours"), *flags])
            assert result.exit_code == 0, result.stderr
            out[arch, method, "ours"] = root / f"{arch}-{method}-ours"
    return out


def bnb_dequantized(folder, torch_dtype):
    """Each quantized weight as bitsandbytes itself dequantizes it, in the checkpoint's dtype."""
    import bitsandbytes.functional as F
    from bitsandbytes.functional import QuantState

    tensors = load_tensors(folder)
    dense = {}
    for name, value in tensors.items():
        if ".quant_state.bitsandbytes__" in name:
            weight = name.split(".quant_state.")[0]
            parts = {k[len(weight) + 1 :]: v for k, v in tensors.items() if k.startswith(weight + ".")}
            dense[weight] = F.dequantize_4bit(tensors[weight], QuantState.from_dict(parts, "cpu")).to(torch_dtype)
        elif name.endswith(".SCB"):
            module = name[: -len(".SCB")]
            dense[module + ".weight"] = F.int8_vectorwise_dequant(tensors[module + ".weight"], value).to(torch_dtype)
    return dense


@pytest.mark.parametrize("who", ["ours", "theirs"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_dequantize_equals_bitsandbytes(written, tmp_path, cli, method, who):
    import torch

    src = written["llama", method, who]
    code, out, err = cli("dequantize", src, tmp_path / "dense", "--json")
    assert code == 0, err
    ours = load_tensors(tmp_path / "dense")
    for name, expected in bnb_dequantized(src, torch.bfloat16).items():
        assert ours[name].dtype == torch.bfloat16
        assert torch.equal(ours[name], expected), name
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert "quantization_config" not in config
    model = auto_class(tmp_path / "dense").from_pretrained(tmp_path / "dense")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear"


def test_dequantize_restores_conv1d_layout(written, models, tmp_path, cli):
    code, _, err = cli("dequantize", written["gpt2", "nf4-dq", "theirs"], tmp_path / "dense", "--dtype", "float32")
    assert code == 0, err
    ours, source = load_tensors(tmp_path / "dense"), load_tensors(models["gpt2"])
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"):
        assert ours[name].shape == source[name].shape
        rel = (ours[name] - source[name].float()).norm() / source[name].float().norm()
        assert rel < 0.2


@pytest.mark.parametrize("who", ["ours", "theirs"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_verify_passes_good_checkpoints(written, models, tmp_path, cli, method, who):
    junit = tmp_path / "report.xml"
    code, out, err = cli("verify", written["gpt2", method, who], "--reference", models["gpt2"], "--json", "--junit", junit)
    report = json.loads(out)
    assert code == 0, report
    assert report["ok"] and report["layers"] and all(layer["ok"] for layer in report["layers"])
    assert "<testsuite" in junit.read_text() and 'failures="0"' in junit.read_text()


def damaged_copy(written, tmp_path):
    dst = tmp_path / "damaged"
    shutil.copytree(written["llama", "nf4-dq", "ours"], dst)
    return dst


def rewrite_tensors(folder, edit):
    """Load every tensor, apply `edit(dict)`, save again as one shard (safetensors' own writer)."""
    from safetensors.torch import save_file

    tensors = load_tensors(folder)
    edit(tensors)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def failed_checks(cli, folder, *extra):
    code, out, _ = cli("verify", folder, "--json", *extra)
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    return {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}


def test_verify_missing_companion(written, tmp_path, cli):
    folder = damaged_copy(written, tmp_path)
    rewrite_tensors(folder, lambda t: t.pop("model.layers.0.mlp.up_proj.weight.nested_absmax"))
    assert "nested_absmax" in failed_checks(cli, folder)["quantization"]


def test_verify_nan(written, tmp_path, cli):
    import math

    folder = damaged_copy(written, tmp_path)
    rewrite_tensors(folder, lambda t: t["model.norm.weight"].__setitem__(0, math.nan))
    assert "model.norm.weight" in failed_checks(cli, folder)["values"]


def test_verify_truncated_shard(written, tmp_path, cli):
    folder = damaged_copy(written, tmp_path)
    shard = folder / "model.safetensors"
    shard.write_bytes(shard.read_bytes()[:-1000])
    assert "truncated" in failed_checks(cli, folder)["structure"]


def test_verify_swapped_layers_caught_with_reference(written, models, tmp_path, cli):
    folder = damaged_copy(written, tmp_path)

    def swap(t):
        for suffix in ("", ".absmax", ".nested_absmax", ".quant_state.bitsandbytes__nf4"):
            a, b = f"model.layers.0.mlp.gate_proj.weight{suffix}", f"model.layers.0.mlp.up_proj.weight{suffix}"
            t[a], t[b] = t[b], t[a]

    rewrite_tensors(folder, swap)
    assert cli("verify", folder, "--json")[0] == 0  # structurally fine
    failed = failed_checks(cli, folder, "--reference", models["llama"])
    assert "gate_proj" in failed["reference"] or "up_proj" in failed["reference"]


def test_verify_wrong_shape(written, tmp_path, cli):
    folder = damaged_copy(written, tmp_path)
    rewrite_tensors(folder, lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight.absmax", t["model.layers.0.mlp.up_proj.weight.absmax"][:-1].clone()))
    failed = failed_checks(cli, folder)
    assert "absmax" in failed["quantization"]


def test_verify_index_points_at_missing_shard(written, tmp_path, cli):
    folder = tmp_path / "sharded"
    code, _, err = cli("dequantize", written["llama", "int8", "ours"], folder, "--max-shard-size", "50KB")
    assert code == 0, err
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[-1]
    (folder / victim).unlink()
    assert "missing shard" in failed_checks(cli, folder)["structure"]


def test_verify_forged_header_length(written, tmp_path, cli):
    folder = damaged_copy(written, tmp_path)
    shard = folder / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[:8] = struct.pack("<Q", 2**50)
    shard.write_bytes(bytes(data))
    assert "exceeds the file size" in failed_checks(cli, folder)["structure"]


def test_verify_missing_path_is_usage_error(cli, tmp_path):
    assert cli("verify", tmp_path / "nope")[0] == 2
