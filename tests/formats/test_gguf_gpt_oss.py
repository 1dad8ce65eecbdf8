"""GGUF for gpt-oss releases (quant_method "mxfp4"): the experts' MXFP4 blocks and scales moved into ggml's
MXFP4 blocks without a float pass (gate and up split from their interleaved rows), the other tensors at the
requested type, the gpt-oss metadata; refusals. llama.cpp's converter and llama.cpp itself on these files:
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


@pytest.fixture(scope="module")
def dense(release, tmp_path_factory):
    """The release dequantized by quantkit to float32 (transformers' values, tests/test_fp8_mxfp4.py)."""
    from typer.testing import CliRunner

    from quantkit.cli import app

    out = tmp_path_factory.mktemp("gpt_oss_dense") / "dense"
    result = CliRunner().invoke(app, ["dequantize", str(release), str(out), "--dtype", "float32"])
    assert result.exit_code == 0, result.stderr
    return out


@pytest.mark.parametrize("gguf_type", ["F32", "F16", "BF16", "Q8_0"])
def test_experts_keep_their_mxfp4_values_and_the_rest_follows_the_type(release, dense, cli, tmp_path, gguf_type):
    out = tmp_path / "model.gguf"
    code, _, err = cli("convert", release, out, "--to", "gguf", "--gguf-type", gguf_type)
    assert code == 0, err
    file = gf.read_gguf(out)
    tensors = {t.name: t for t in file.tensors}
    values = {k: v.float().numpy() for k, v in load_tensors(dense).items()}
    moved = 0
    for i in range(2):
        gate_up = values[f"model.layers.{i}.mlp.experts.gate_up_proj"].transpose(0, 2, 1)  # [E, 2I, H]
        down = values[f"model.layers.{i}.mlp.experts.down_proj"].transpose(0, 2, 1)  # [E, H, I]
        for role, want in (("gate", gate_up[:, 0::2]), ("up", gate_up[:, 1::2]), ("down", down)):
            t = tensors[f"blk.{i}.ffn_{role}_exps.weight"]
            assert t.qtype == Q.MXFP4 and t.shape == want.shape
            got = dequantize(file.rows(t), Q.MXFP4).reshape(want.shape)
            assert np.array_equal(got, want), t.name  # every value exactly (ggml reads code 8, -0, as +0)
            moved += 1
        bias = values[f"model.layers.{i}.mlp.experts.gate_up_proj_bias"]
        for role, want in (("gate", bias[:, 0::2]), ("up", bias[:, 1::2])):
            t = tensors[f"blk.{i}.ffn_{role}_exps.bias"]
            assert t.qtype == Q.F32 and np.array_equal(file.rows(t).reshape(t.shape), want)
        sinks = tensors[f"blk.{i}.attn_sinks.weight"]
        assert sinks.qtype == Q.F32 and np.array_equal(file.rows(sinks).reshape(-1), values[f"model.layers.{i}.self_attn.sinks"])
        assert tensors[f"blk.{i}.ffn_gate_inp.weight"].qtype == Q.F32 and tensors[f"blk.{i}.ffn_gate_inp.bias"].qtype == Q.F32
        assert tensors[f"blk.{i}.attn_q.weight"].qtype == Q[gguf_type]
    assert moved == 6 and tensors["token_embd.weight"].qtype == Q[gguf_type]
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


def test_dense_gpt_oss_is_one_line_refusal(dense, cli, tmp_path):
    code, _, err = cli("convert", dense, tmp_path / "model.gguf", "--to", "gguf", "--gguf-type", "F16")
    assert code == 2 and "not MXFP4 blocks cannot go to GGUF yet" in err and "Traceback" not in err
    assert not (tmp_path / "model.gguf").exists()


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
