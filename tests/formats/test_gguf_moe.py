"""GGUF for mixture-of-experts models (mixtral, qwen2_moe, qwen3_moe): per-expert HF tensors merged into
llama.cpp's 3-D ffn_*_exps tensors and split back, the expert metadata, the type mix with experts.

Sources are what transformers 5 saves (bfloat16, one tensor per expert); cross-checks read our files with
gguf-py and load what comes back with transformers. llama.cpp itself: tests/clients/test_llamacpp_moe.py.
"""

import json

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from quantkit.errors import QuantkitError
from quantkit.io.source import open_checkpoint
from quantkit.methods.gguf import convert as gc
from quantkit.methods.gguf import file as gf
from quantkit.methods.gguf import types as ggml
from quantkit.methods.gguf import verify as gv
from tests.moe_checkpoints import FAMILIES, make_moe_checkpoint

GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
EXPERT_LEAVES = {"mixtral": ("block_sparse_moe", "w1", "w3", "w2"), "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
                 "qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj")}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {family: make_moe_checkpoint(root / family, family, seed=1) for family in FAMILIES}


def _bf16_source(path) -> dict[str, np.ndarray]:
    """The checkpoint's tensors as float32 (exact for bfloat16)."""
    from safetensors.torch import load_file

    return {name: t.float().numpy() for name, t in load_file(str(path / "model.safetensors")).items()}


def _logits(folder) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([[0, 5, 17, 99, 3, 250, 42, 7]])).logits[0].numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_round_trip_is_exact(checkpoints, tmp_path, family):
    src = checkpoints[family]
    gc.to_gguf(open_checkpoint(src), tmp_path / "model.gguf", "F32")
    gc.gguf_to_safetensors(tmp_path / "model.gguf", tmp_path / "back")
    source, back = _bf16_source(src), _bf16_source(tmp_path / "back")
    assert sorted(back) == sorted(source)  # per-expert names, as on the Hub
    assert [name for name in source if not np.array_equal(source[name], back[name])] == []
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert config["architectures"] == [FAMILIES[family][0]] and config["model_type"] == family
    assert np.array_equal(_logits(tmp_path / "back"), _logits(src))


@pytest.mark.parametrize("family", FAMILIES)
def test_experts_are_merged_as_llama_cpp_expects(checkpoints, tmp_path, family):
    src = checkpoints[family]
    gc.to_gguf(open_checkpoint(src), tmp_path / "model.gguf", "F32")
    reader = gguf.GGUFReader(tmp_path / "model.gguf")
    meta = {k: f.contents() for k, f in reader.fields.items()}
    tensors = {t.name: t for t in reader.tensors}
    arch, source = GGUF_ARCH[family], _bf16_source(src)
    assert meta["general.architecture"] == arch
    assert (meta[f"{arch}.expert_count"], meta[f"{arch}.expert_used_count"]) == (4, 2)
    assert meta.get(f"{arch}.expert_feed_forward_length") == (None if family == "mixtral" else 160)
    assert meta.get(f"{arch}.expert_shared_feed_forward_length") == (352 if family == "qwen2_moe" else None)
    module, *leaves = EXPERT_LEAVES[family]
    for layer in range(2):
        for role, leaf in zip(("gate", "up", "down"), leaves, strict=True):
            t = tensors[f"blk.{layer}.ffn_{role}_exps.weight"]
            stacked = np.stack([source[f"model.layers.{layer}.{module}.experts.{e}.{leaf}.weight"] for e in range(4)])
            assert list(t.shape) == list(reversed(stacked.shape))  # ggml's ne: columns, rows, experts
            assert np.array_equal(np.asarray(t.data).reshape(stacked.shape), stacked)
        assert tensors[f"blk.{layer}.ffn_gate_inp.weight"].tensor_type == Q.F32
    assert not any(".experts." in name for name in tensors)
    if family == "qwen2_moe":
        assert {"blk.0.ffn_gate_shexp.weight", "blk.0.ffn_up_shexp.weight", "blk.0.ffn_down_shexp.weight",
                "blk.0.ffn_gate_inp_shexp.weight"} <= set(tensors)
    if family == "qwen3_moe":
        assert list(tensors["blk.1.attn_q_norm.weight"].shape) == [48]


def test_quantized_experts_are_each_experts_blocks_in_turn(checkpoints, tmp_path):
    """Rows quantize independently: the 3-D tensor is expert 0's blocks, then expert 1's, ..."""
    src = checkpoints["qwen3_moe"]
    gc.to_gguf(open_checkpoint(src), tmp_path / "model.gguf", "Q4_K_M")
    tensors = {t.name: t for t in gguf.GGUFReader(tmp_path / "model.gguf").tensors}
    source = _bf16_source(src)
    for name, leaf in (("blk.0.ffn_up_exps.weight", "up_proj"), ("blk.1.ffn_down_exps.weight", "down_proj")):
        t = tensors[name]
        layer = name.split(".")[1]
        experts = [source[f"model.layers.{layer}.mlp.experts.{e}.{leaf}.weight"] for e in range(4)]
        want = np.concatenate([ggml.quantize_stored(x, "F32", Q(t.tensor_type)).reshape(-1) for x in experts])
        assert np.array_equal(np.asarray(t.data).reshape(-1), want)
    # Q4_K_M's mix: ffn_down_exps gets Q6_K in the layers llama.cpp picks (rows of 160 fall back to Q8_0),
    # ffn_up_exps Q4_K; the router stays F32
    assert tensors["blk.0.ffn_up_exps.weight"].tensor_type == Q.Q4_K
    assert tensors["blk.1.ffn_down_exps.weight"].tensor_type == Q.Q8_0
    assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type == Q.F32


@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_moe_comes_back_and_verifies(checkpoints, tmp_path, family):
    src = checkpoints[family]
    gc.to_gguf(open_checkpoint(src), tmp_path / "model.gguf", "Q8_0")
    report = gv.verify_gguf(tmp_path / "model.gguf", str(src))
    assert all(check.ok for check in report.checks), [c for c in report.checks if not c.ok]
    gc.gguf_to_safetensors(tmp_path / "model.gguf", tmp_path / "back", dtype="float32")
    source, back = _bf16_source(src), _bf16_source(tmp_path / "back")
    assert sorted(back) == sorted(source)
    for name, values in source.items():
        if values.ndim == 2 and values.shape[1] % 32 == 0 and values.shape[0] > 1 and "gate.weight" not in name:
            assert np.abs(back[name] - values).max() <= np.abs(values).max() / 100, name
    ours, theirs = _logits(tmp_path / "back"), _logits(src)
    assert np.linalg.norm(ours - theirs) / np.linalg.norm(theirs) < 0.05


def test_missing_expert_is_refused_by_name(checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "config.json").write_text((checkpoints["mixtral"] / "config.json").read_text())
    tensors = load_file(str(checkpoints["mixtral"] / "model.safetensors"))
    del tensors["model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(QuantkitError, match=r"model\.layers\.1\.block_sparse_moe\.experts\.2\.w3\.weight is missing"):
        gc.to_gguf(open_checkpoint(folder), tmp_path / "model.gguf", "F32")
    assert not (tmp_path / "model.gguf").exists()


def test_expert_width_against_the_config_is_one_shape_check_both_ways(checkpoints, tmp_path, monkeypatch):
    """Experts are checked merged, as the GGUF stores them: refused on the way in, a verify finding on the way back."""
    ck = open_checkpoint(checkpoints["qwen3_moe"])
    width = ck.config["moe_intermediate_size"]
    ck.config = {**ck.config, "moe_intermediate_size": width * 2}
    with pytest.raises(QuantkitError, match=rf"mlp\.experts\.\w+_proj\.weight has shape \(4, [^)]*\b{width}\b[^)]*\), "
                                            rf"the config implies \(4, [^)]*\b{width * 2}\b"):
        gc.to_gguf(ck, tmp_path / "refused.gguf", "F32")
    out = tmp_path / "m.gguf"
    with monkeypatch.context() as m:
        m.setattr(gf, "shape_problems", lambda *args: ([], []))
        gc.to_gguf(ck, out, "F32")
    checks = {c.name: c for c in gv.verify_gguf(out).checks}
    assert not checks["metadata"].ok and "experts" in checks["metadata"].detail and str(width * 2) in checks["metadata"].detail
    assert checks["structure"].ok


def test_layers_without_experts_are_refused(tmp_path):
    src = make_moe_checkpoint(tmp_path / "src", "qwen2_moe", mlp_only_layers=[1])
    with pytest.raises(QuantkitError, match="mlp_only_layers"):
        gc.to_gguf(open_checkpoint(src), tmp_path / "model.gguf", "F32")


def test_tied_qwen2_moe_is_a_warning_then_a_verify_failure(tmp_path):
    """llama.cpp's qwen2moe graph needs output.weight (qwen3moe falls back to the embeddings)."""
    src = make_moe_checkpoint(tmp_path / "src", "qwen2_moe", layers=1, tie_word_embeddings=True)
    report = gc.to_gguf(open_checkpoint(src), tmp_path / "model.gguf", "F32")
    assert any("lm_head.weight is missing" in w for w in report.warnings)
    checks = {c.name: c for c in gv.verify_gguf(tmp_path / "model.gguf").checks}
    assert not checks["metadata"].ok and "lm_head" in checks["metadata"].detail
    src = make_moe_checkpoint(tmp_path / "src3", "qwen3_moe", layers=1, tie_word_embeddings=True)
    assert gc.to_gguf(open_checkpoint(src), tmp_path / "model3.gguf", "F32").warnings == []


def test_qwen3_moe_without_renormalized_routing_is_a_warning(tmp_path):
    src = make_moe_checkpoint(tmp_path / "src", "qwen3_moe", layers=1, norm_topk_prob=False)
    report = gc.to_gguf(open_checkpoint(src), tmp_path / "model.gguf", "F32")
    assert any("norm_topk_prob" in w for w in report.warnings)
    gc.gguf_to_safetensors(tmp_path / "model.gguf", tmp_path / "back")  # back as llama.cpp runs it
    assert json.loads((tmp_path / "back" / "config.json").read_text())["norm_topk_prob"] is True


def test_preview_names_merged_experts(checkpoints):
    from quantkit.api import ConvertRequest

    preview = gc.preview_gguf(ConvertRequest(src=str(checkpoints["qwen2_moe"]), out="m.gguf", gguf_type="Q4_K_M"))
    merged = [t for t in preview.tensors if "merged from 4 experts" in t.reason]
    assert len(merged) == 6  # 2 layers x gate, up, down
    assert merged[0].outputs[0]["shape"][0] == 4


def test_cli_from_a_sharded_hub_cache_snapshot(tmp_path):
    """As users have them: a Hugging Face cache snapshot (symlinks into blobs/), experts spread over shards."""
    from typer.testing import CliRunner

    from quantkit.cli import app
    from tests.test_hub_cache import add_to_cache

    plain = make_moe_checkpoint(tmp_path / "plain", "mixtral", seed=4, max_shard_size="400KB")
    assert len(list(plain.glob("*.safetensors"))) > 3
    snapshot = add_to_cache(tmp_path / "hub", "org/tiny-mixtral", plain)
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(snapshot), str(tmp_path / "m.gguf"), "--to", "gguf", "--gguf-type", "Q4_K_M", "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert {f["tensor"] for f in summary["fallbacks"]} >= {"blk.0.ffn_down_exps.weight", "blk.1.ffn_down_exps.weight"}
    gc.to_gguf(open_checkpoint(plain), tmp_path / "plain.gguf", "Q4_K_M")
    ours, plain_gguf = gf.read_gguf(tmp_path / "m.gguf"), gf.read_gguf(tmp_path / "plain.gguf")  # general.name differs
    assert [(t.name, t.qtype, t.shape) for t in ours.tensors] == [(t.name, t.qtype, t.shape) for t in plain_gguf.tensors]
    assert all(ours.rows(a).tobytes() == plain_gguf.rows(b).tobytes() for a, b in zip(ours.tensors, plain_gguf.tensors, strict=True))
    result = runner.invoke(app, ["convert", str(tmp_path / "m.gguf"), str(tmp_path / "back"), "--to", "safetensors"])
    assert result.exit_code == 0, result.output
    assert sorted(_shapes(tmp_path / "back")) == sorted(_shapes(plain))


def _shapes(folder) -> dict[str, tuple]:
    """Every tensor's shape across a folder's shards."""
    from safetensors import safe_open

    shapes = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), "pt") as f:
            shapes |= {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    return shapes
