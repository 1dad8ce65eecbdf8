"""GGUF for qwen3, gemma2, gemma3 (text) and phi3, both ways: tensor names, shapes and transforms (gemma's
norms stored + 1, phi3's fused matrices), the metadata llama.cpp reads for each, a config.json that
transformers loads back to the same model, and one clear refusal for what llama.cpp cannot compute.
(llama.cpp itself on these files: tests/clients/test_llamacpp_architectures.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from quantkit.errors import QuantkitError
from quantkit.io.source import open_checkpoint
from quantkit.methods.gguf import convert as gc
from quantkit.methods.gguf import file as gf
from quantkit.methods.gguf import verify as gv
from tests.gguf_checkpoints import ARCH_MODELS, make_arch_checkpoint

FAMILIES = list(ARCH_MODELS)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (source folder, its F32 GGUF)."""
    root = tmp_path_factory.mktemp("arch")
    found = {}
    for family in FAMILIES:
        src = make_arch_checkpoint(root / family, family)
        gc.to_gguf(open_checkpoint(src), root / f"{family}.gguf", "F32")
        found[family] = (src, root / f"{family}.gguf")
    return found


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(f).items()}


def _logits(folder: Path) -> tuple[torch.Tensor, object]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([list(range(2, 40))])).logits, model.config


# config attributes that change what the model computes, compared after the round trip
COMPUTING = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "head_dim", "rms_norm_eps", "vocab_size", "tie_word_embeddings", "rope_parameters", "layer_types",
             "sliding_window", "attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar",
             "hidden_activation", "hidden_act", "original_max_position_embeddings", "attention_bias")


@pytest.mark.parametrize("family", FAMILIES)
def test_f32_round_trip_gives_the_same_bf16_tensors_and_logits(models, tmp_path, family):
    src, f32 = models[family]
    gc.gguf_to_safetensors(f32, tmp_path / "back")
    ours, theirs = _tensors(tmp_path / "back"), _tensors(src)
    assert ours.keys() == theirs.keys()
    for name, values in theirs.items():
        assert ours[name].dtype == torch.bfloat16 and torch.equal(ours[name], values), name
    (back_logits, back_config), (src_logits, src_config) = _logits(tmp_path / "back"), _logits(src)
    assert type(back_config) is type(src_config)
    for key in COMPUTING:
        if hasattr(src_config, key):  # (extra keys, such as head_dim for phi3, are ignored by the class)
            assert getattr(back_config, key) == getattr(src_config, key), key
    assert torch.equal(back_logits, src_logits)


# What llama.cpp's loader reads for each architecture (tensor name -> shape in ggml order, metadata).
EXPECTED = {
    "qwen3": ({"blk.1.attn_q_norm.weight": [64], "blk.1.attn_k_norm.weight": [64], "blk.1.attn_q.weight": [320, 256],
               "output.weight": [320, 320]},
              {"attention.key_length": 64, "attention.value_length": 64, "rope.dimension_count": 64}),
    "gemma2": ({"blk.1.post_attention_norm.weight": [320], "blk.1.ffn_norm.weight": [320],
                "blk.1.post_ffw_norm.weight": [320], "blk.1.ffn_up.weight": [320, 576]},
               {"attention.sliding_window": 8, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                "attention.key_length": 64}),
    "gemma3": ({"blk.5.attn_q_norm.weight": [64], "blk.5.post_ffw_norm.weight": [320]},
               {"attention.sliding_window": 8, "final_logit_softcapping": 30.0, "rope.freq_base": 1e6,
                "rope.freq_base_swa": 1e4, "rope.scaling.type": "linear", "rope.scaling.factor": 8.0}),
    "phi3": ({"blk.1.attn_qkv.weight": [320, 640], "blk.1.ffn_up.weight": [320, 1152], "blk.1.ffn_down.weight": [576, 320],
              "output.weight": [320, 320]},
             {"rope.dimension_count": 60, "rope.scaling.original_context_length": 256}),
}
ABSENT = {"qwen3": ["blk.0.attn_q.bias"], "gemma2": ["output.weight"],
          "gemma3": ["output.weight", "gemma3.attn_logit_softcapping", "gemma3.attention.sliding_window_pattern"],
          "phi3": ["blk.0.attn_q.weight", "blk.0.ffn_gate.weight", "phi3.attention.sliding_window"]}


@pytest.mark.parametrize("family", FAMILIES)
def test_names_shapes_and_metadata_are_llama_cpps(models, family):
    import gguf

    src, f32 = models[family]
    reader = gguf.GGUFReader(f32)  # gguf-py's own reader as the cross-check
    shapes = {t.name: [int(d) for d in t.shape] for t in reader.tensors}
    tensors, metadata = EXPECTED[family]
    for name, shape in tensors.items():
        assert shapes.get(name) == shape, name
    assert reader.fields["general.architecture"].contents() == family
    for key, value in metadata.items():
        assert reader.fields[f"{family}.{key}"].contents() == pytest.approx(value), key
    for name in ABSENT[family]:
        assert name not in shapes and name not in reader.fields, name


def _source_values(src: Path, name: str) -> np.ndarray:
    return _tensors(src)[name].float().numpy()


@pytest.mark.parametrize("family, norm", [("gemma2", "model.layers.1.pre_feedforward_layernorm.weight"),
                                          ("gemma3", "model.layers.0.self_attn.q_norm.weight"),
                                          ("gemma3", "model.norm.weight")])
def test_gemma_norms_are_stored_plus_one(models, family, norm):
    src, f32 = models[family]
    conv = gc.from_gguf(f32)
    stored = conv.file.rows(conv.names[norm]).reshape(-1)
    assert np.array_equal(stored, _source_values(src, norm) + np.float32(1))
    assert np.array_equal(conv.whole(norm), _source_values(src, norm))


def test_phi3_fused_matrices_are_stored_as_they_are(models):
    src, f32 = models["phi3"]
    conv = gc.from_gguf(f32)
    for name in ("model.layers.0.self_attn.qkv_proj.weight", "model.layers.1.mlp.gate_up_proj.weight"):
        assert np.array_equal(conv.file.rows(conv.names[name]), _source_values(src, name)), name


def test_qwen3_q_and_k_are_not_permuted(models):
    src, f32 = models["qwen3"]
    conv = gc.from_gguf(f32)
    name = "model.layers.0.self_attn.k_proj.weight"
    assert np.array_equal(conv.file.rows(conv.names[name]), _source_values(src, name))


@pytest.mark.parametrize("family", FAMILIES)
def test_q4_k_m_follows_the_mix_and_verifies_against_the_source(models, tmp_path, family):
    from quantkit.methods.gguf import mixes

    src, _ = models[family]
    out = tmp_path / "q.gguf"
    report = gc.to_gguf(open_checkpoint(src), out, "Q4_K_M")
    file = gf.read_gguf(out)
    want = mixes.tensor_types(mixes.parse_file_type("Q4_K_M"), family, file.metadata[f"{family}.block_count"],
                              [(t.name, t.shape) for t in file.tensors], n_head=4, n_head_kv=2)
    assert {t.name: t.qtype for t in file.tensors} == want.types
    assert {t.qtype.name for t in file.tensors} >= {"F32", "Q5_0", "Q8_0"}  # Q4_K, Q6_K fall back on rows of 320, 576
    assert report.fallbacks  # rows of 320 and 576 do not hold 256-blocks
    checks = {c.name: c for c in gv.verify_gguf(out, str(src)).checks}
    assert all(c.ok for c in checks.values()), checks


# ------------------------------------------------------------------------------------------- refusals


def _refused(src: Path, tmp_path: Path, **config_changes) -> str:
    config = json.loads((src / "config.json").read_text())
    config.update(config_changes)
    ck = open_checkpoint(src)
    ck.config = config
    with pytest.raises(QuantkitError) as e:
        gc.to_gguf(ck, tmp_path / "m.gguf", "F16")
    assert not (tmp_path / "m.gguf").exists()
    return str(e.value)


def test_phi3_longrope_is_refused(models, tmp_path):
    msg = _refused(models["phi3"][0], tmp_path, rope_parameters={"rope_type": "longrope", "rope_theta": 1e4,
                                                                 "long_factor": [1.0] * 30, "short_factor": [1.0] * 30})
    assert "rope scaling 'longrope' is not supported yet for GGUF output of phi3" in msg


@pytest.mark.parametrize("changes, words", [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping = 50.0 is not supported for GGUF output of gemma3"),
    ({"query_pre_attn_scalar": 80}, "query_pre_attn_scalar = 80, but llama.cpp's gemma3 scales queries by 1/sqrt(64)"),
    ({"layer_types": ["full_attention", "sliding_attention"] * 3}, "has no fixed sliding-window period"),
    ({"hidden_activation": "silu"}, "hidden_activation = silu is not supported"),
    ({"rope_parameters": {"full_attention": {"rope_type": "yarn", "factor": 4.0}}}, "rope scaling 'yarn'"),
])  # fmt: skip
def test_gemma3_settings_llama_cpp_cannot_compute_are_refused(models, tmp_path, changes, words):
    assert words in _refused(models["gemma3"][0], tmp_path, **changes)


def test_gemma2_without_soft_capping_is_refused(models, tmp_path):
    assert "attn_logit_softcapping is missing" in _refused(models["gemma2"][0], tmp_path, attn_logit_softcapping=None)


def test_gemma3_sliding_period_other_than_six_goes_both_ways(tmp_path):
    from transformers import AutoConfig

    types = ["sliding_attention", "full_attention"] * 2
    src = make_arch_checkpoint(tmp_path / "src", "gemma3", layers=4, layer_types=types, hidden=64, ffn=128)
    gc.to_gguf(open_checkpoint(src), tmp_path / "m.gguf", "F32")
    assert gf.read_gguf(tmp_path / "m.gguf").metadata["gemma3.attention.sliding_window_pattern"] == 2
    gc.gguf_to_safetensors(tmp_path / "m.gguf", tmp_path / "back")
    assert AutoConfig.from_pretrained(tmp_path / "back").layer_types == types


def test_unknown_architecture_is_one_error_naming_it_and_the_supported_ones(models, tmp_path):
    msg = _refused(models["qwen3"][0], tmp_path, architectures=["FalconForCausalLM"])
    assert "FalconForCausalLM is not supported yet" in msg
    assert all(name in msg for name in ("Qwen3ForCausalLM", "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM"))


def test_gguf_of_an_unknown_architecture_is_one_error_naming_it(models, tmp_path):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "falcon.gguf", "falcon")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(QuantkitError) as e:
        gc.gguf_to_safetensors(tmp_path / "falcon.gguf", tmp_path / "out")
    assert "GGUF architecture 'falcon' is not supported yet" in str(e.value)
    assert all(name in str(e.value) for name in ("llama", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"))
    assert not (tmp_path / "out").exists()


def test_gemma2_lm_head_beside_tied_embeddings_is_left_out_as_llama_cpp_does(models, tmp_path):
    import shutil

    from safetensors.torch import save_file

    src = shutil.copytree(models["gemma2"][0], tmp_path / "src")
    tensors = _tensors(src)
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, src / "model.safetensors",
              metadata={"format": "pt"})
    report = gc.to_gguf(open_checkpoint(src), tmp_path / "m.gguf", "F32")
    assert report.tensors == len(tensors)
    assert "output.weight" not in {t.name for t in gf.read_gguf(tmp_path / "m.gguf").tensors}
    assert "tie_word_embeddings is false, but llama.cpp's gemma2 reads the embeddings as the output head" in \
        _refused(src, tmp_path / "untied", tie_word_embeddings=False)
