"""GGUF for gpt-oss releases (quant_method "mxfp4"): the experts' MXFP4 blocks and scales moved into ggml's
MXFP4 blocks without a float pass (gate and up split from their interleaved rows), the other tensors at the
requested type, the gpt-oss metadata; dense gpt-oss checkpoints (a release dequantized, bf16 releases): the
experts split and turned as llama.cpp's converter does, at the requested type, one expert at a time; refusals. llama.cpp's converter and llama.cpp itself on these files:
tests/clients/test_llamacpp_gpt_oss.py.
"""

import json

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import LlamaFileType
from gguf.quants import dequantize

from quantkit.methods.gguf import file as gf
from tests.conftest import load_tensors
from tests.releases import gpt_oss_mxfp4


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return gpt_oss_mxfp4(tmp_path_factory.mktemp("gpt_oss") / "release")


def _dequantized(release, folder, dtype: str):
    from typer.testing import CliRunner

    from quantkit.cli import app

    result = CliRunner().invoke(app, ["dequantize", str(release), str(folder), "--dtype", dtype])
    assert result.exit_code == 0, result.stderr
    return folder


@pytest.fixture(scope="module")
def dense(release, tmp_path_factory):
    """The release dequantized by quantkit to float32 (transformers' values, tests/test_fp8_mxfp4.py)."""
    return _dequantized(release, tmp_path_factory.mktemp("gpt_oss_dense") / "dense", "float32")


@pytest.fixture(scope="module")
def dense_bf16(release, tmp_path_factory):
    """The release dequantized to bfloat16, as bf16 releases of gpt-oss store their experts."""
    return _dequantized(release, tmp_path_factory.mktemp("gpt_oss_bf16") / "dense", "bfloat16")


def _split_as_llama_cpp(values: dict, i: int) -> dict[str, np.ndarray]:
    """Layer i's expert tensors as llama.cpp's converter makes them from dense ones: weights turned [E, out, in],
    gate and up taken from the interleaved output axis (gate even, up odd)."""
    gate_up = values[f"model.layers.{i}.mlp.experts.gate_up_proj"].transpose(0, 2, 1)  # [E, 2I, H]
    bias = values[f"model.layers.{i}.mlp.experts.gate_up_proj_bias"]
    return {f"blk.{i}.ffn_gate_exps.weight": gate_up[:, 0::2], f"blk.{i}.ffn_up_exps.weight": gate_up[:, 1::2],
            f"blk.{i}.ffn_down_exps.weight": values[f"model.layers.{i}.mlp.experts.down_proj"].transpose(0, 2, 1),
            f"blk.{i}.ffn_gate_exps.bias": bias[:, 0::2], f"blk.{i}.ffn_up_exps.bias": bias[:, 1::2],
            f"blk.{i}.ffn_down_exps.bias": values[f"model.layers.{i}.mlp.experts.down_proj_bias"]}


def _converted(cli, src, out, gguf_type: str) -> tuple[gf.GGUFFile, dict]:
    """`convert src out --to gguf`: (the GGUF read back, its tensors by name)."""
    code, _, err = cli("convert", src, out, "--to", "gguf", "--gguf-type", gguf_type)
    assert code == 0, err
    file = gf.read_gguf(out)
    return file, {t.name: t for t in file.tensors}


@pytest.mark.parametrize("gguf_type", ["F32", "F16", "BF16", "Q8_0"])
def test_experts_keep_their_mxfp4_values_and_the_rest_follows_the_type(release, dense, cli, tmp_path, gguf_type):
    file, tensors = _converted(cli, release, tmp_path / "model.gguf", gguf_type)
    values = {k: v.float().numpy() for k, v in load_tensors(dense).items()}
    moved = 0
    for i in range(2):
        for name, want in _split_as_llama_cpp(values, i).items():
            t = tensors[name]
            assert t.shape == want.shape and t.qtype == (Q.F32 if name.endswith(".bias") else Q.MXFP4), name
            # every value exactly (ggml reads code 8, -0, as +0)
            assert np.array_equal(dequantize(file.rows(t), t.qtype).reshape(want.shape), want), name
            moved += 1
        sinks = tensors[f"blk.{i}.attn_sinks.weight"]
        assert sinks.qtype == Q.F32 and np.array_equal(file.rows(sinks).reshape(-1), values[f"model.layers.{i}.self_attn.sinks"])
        assert tensors[f"blk.{i}.ffn_gate_inp.weight"].qtype == Q.F32 and tensors[f"blk.{i}.ffn_gate_inp.bias"].qtype == Q.F32
        assert tensors[f"blk.{i}.attn_q.weight"].qtype == Q[gguf_type]
    assert moved == 12 and tensors["token_embd.weight"].qtype == Q[gguf_type]
    want_type = LlamaFileType.MOSTLY_Q8_0 if gguf_type == "Q8_0" else LlamaFileType.MOSTLY_MXFP4_MOE
    meta = file.metadata
    assert meta["general.architecture"] == "gpt-oss" and meta["general.file_type"] == want_type
    assert meta["gpt-oss.expert_count"] == 4 and meta["gpt-oss.expert_used_count"] == 2
    assert meta["gpt-oss.expert_feed_forward_length"] == 192 and meta["gpt-oss.attention.sliding_window"] == 128
    assert meta["gpt-oss.rope.scaling.type"] == "yarn" and meta["gpt-oss.rope.scaling.original_context_length"] == 4096


def test_dry_run_gives_the_bytes_written_and_names_the_kept_blocks(release, cli, tmp_path):
    out = tmp_path / "model.gguf"
    code, plan, err = cli("convert", release, out, "--to", "gguf", "--gguf-type", "Q8_0", "--dry-run", "--json")
    assert code == 0, err
    code, _, err = cli("convert", release, out, "--to", "gguf", "--gguf-type", "Q8_0")
    assert code == 0, err
    assert str(out.stat().st_size) in plan
    assert "MXFP4 blocks kept as they are" in plan and "part 2 of 2 of model.layers.1.mlp.experts.gate_up_proj" in plan


@pytest.mark.parametrize("gguf_type, dtype", [("F32", "float32"), ("F16", "bfloat16"), ("BF16", "bfloat16"),
                                              ("Q8_0", "bfloat16"), ("Q8_0", "float32")])
def test_dense_experts_are_split_turned_and_typed_as_llama_cpps_converter_does(dense, dense_bf16, cli, tmp_path,
                                                                               gguf_type, dtype):
    from gguf.quants import quantize

    src = dense if dtype == "float32" else dense_bf16
    file, tensors = _converted(cli, src, tmp_path / "model.gguf", gguf_type)
    values = {k: v.float().numpy() for k, v in load_tensors(src).items()}
    checked = 0
    for i in range(2):
        for name, want in _split_as_llama_cpp(values, i).items():
            t = tensors[name]
            qtype = Q.F32 if name.endswith(".bias") else Q[gguf_type]
            assert t.qtype == qtype and t.shape == want.shape, name
            # gguf-py's own quantization of the split values (the release spans every scale code: float16 and Q8_0
            # scales overflow to inf, on both sides alike)
            with np.errstate(all="ignore"):
                expected = quantize(np.ascontiguousarray(want), qtype).reshape(-1)
            assert file.rows(t).reshape(-1).tobytes() == expected.tobytes(), name
            checked += 1
        assert tensors[f"blk.{i}.ffn_gate_inp.weight"].qtype == Q.F32 and tensors[f"blk.{i}.attn_q.weight"].qtype == Q[gguf_type]
    assert checked == 12
    want_type = {"F32": LlamaFileType.ALL_F32, "F16": LlamaFileType.MOSTLY_F16, "BF16": LlamaFileType.MOSTLY_BF16,
                 "Q8_0": LlamaFileType.MOSTLY_Q8_0}[gguf_type]
    meta = file.metadata
    assert meta["general.architecture"] == "gpt-oss" and meta["general.file_type"] == want_type
    assert meta["gpt-oss.expert_count"] == 4 and meta["gpt-oss.expert_feed_forward_length"] == 192


def test_dense_experts_are_read_one_expert_at_a_time(dense, monkeypatch, tmp_path):
    from quantkit.io.source import open_checkpoint
    from quantkit.methods.gguf import convert

    quantized = convert._quantized
    largest = []

    def recording(rows, *args, **kwargs):
        for chunk in rows:
            largest.append(chunk.nbytes)
            yield from quantized(iter([chunk]), *args, **kwargs)

    monkeypatch.setattr(convert, "_quantized", recording)
    convert.to_gguf(open_checkpoint(dense), tmp_path / "model.gguf", "Q8_0")
    one_expert = 256 * 2 * 192 * 4  # an expert's fused gate and up in float32; the layer's four are 4x that
    assert len(largest) > 41 and max(largest) <= one_expert // 2  # a split half, turned [out, in]


def test_gpt_oss_gguf_verifies_and_back_to_safetensors_is_one_line_refusal(release, cli, tmp_path):
    code, _, err = cli("convert", release, tmp_path / "model.gguf", "--to", "gguf", "--gguf-type", "Q4_K_M")
    assert code == 0, err
    code, out, err = cli("verify", tmp_path / "model.gguf", "--json")
    assert code == 0, out + err
    checks = {c["name"]: c["ok"] for c in json.loads(out)["checks"]}
    assert checks == {"leftovers": True, "structure": True, "metadata": True, "values": True}
    code, _, err = cli("convert", tmp_path / "model.gguf", tmp_path / "back", "--to", "safetensors")
    assert code == 2 and "gpt-oss cannot go back to safetensors yet" in err and "Traceback" not in err


def test_swiglu_llama_cpp_does_not_compute_is_refused(release, cli, tmp_path):
    import shutil

    changed = tmp_path / "release"
    shutil.copytree(release, changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps(config | {"swiglu_limit": 9.0}))
    code, _, err = cli("convert", changed, tmp_path / "model.gguf", "--to", "gguf")
    assert code == 2 and "swiglu_limit = 9.0" in err and "Traceback" not in err


@pytest.mark.parametrize("source", ["release", "dense"])
def test_verify_takes_each_split_expert_from_the_dense_reference(release, dense, cli, tmp_path, source):
    import shutil

    import torch
    from safetensors.torch import save_file

    from quantkit.methods.gguf import verify as gv

    out = tmp_path / "model.gguf"
    _converted(cli, release if source == "release" else dense, out, "F32")
    report = gv.verify_gguf(out, str(dense))
    made = [x for x in report.layers if ".experts." in x.name or "sinks" in x.name]
    assert report.ok and len(report.layers) == 41 and len(made) == 14, [c for c in report.checks if not c.ok]
    assert all(x.rel_error == 0 and x.ok for x in made)  # MXFP4 and F32 hold the dense values exactly
    # a reference whose gate and up are swapped in layer 0 is caught there, and only there
    swapped = tmp_path / "swapped"
    shutil.copytree(dense, swapped)
    tensors = load_tensors(dense)
    fused = tensors["model.layers.0.mlp.experts.gate_up_proj"]
    tensors["model.layers.0.mlp.experts.gate_up_proj"] = torch.stack((fused[..., 1::2], fused[..., 0::2]), dim=-1).flatten(-2)
    save_file(tensors, next(swapped.glob("*.safetensors")), metadata={"format": "pt"})
    report = gv.verify_gguf(out, str(swapped))
    assert {x.name for x in report.layers if not x.ok} == {f"model.layers.0.mlp.experts.{r}_proj.weight" for r in ("gate", "up")}
