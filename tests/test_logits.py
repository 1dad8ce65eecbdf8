"""verify --logits, and verify's shape, tokenizer and GPTQ-format checks.

The layer-at-a-time forward is compared with transformers' whole-model forward on the same (dequantized)
weights; KL figures with their definitions, computed here from those whole-model logits.
"""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest

from quantkit import layerwise, logits
from quantkit.io.source import open_checkpoint
from tests.conftest import load_tensors
from tests.gguf_checkpoints import make_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def whole_model_logits(folder, ids):
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids]), use_cache=False).logits[0].numpy()


def random_ids(vocab, n=48, seed=1):
    return np.random.default_rng(seed).integers(0, vocab, n).tolist()


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.MixtralConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                        num_experts_per_tok=2, max_position_embeddings=128)
    folder = tmp_path_factory.mktemp("mixtral")
    transformers.MixtralForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A llama with a trained tokenizer (the CLI tokenizes the built-in text with it)."""
    return make_checkpoint(tmp_path_factory.mktemp("src") / "llama", hidden=128, ffn=320, layers=2)


@pytest.fixture(scope="module")
def quantized(source, tmp_path_factory):
    from typer.testing import CliRunner

    from quantkit.cli import app

    root = tmp_path_factory.mktemp("quantized")
    runs = {"nf4": ["quantize", source, root / "nf4", "--method", "nf4"],
            "int8": ["quantize", source, root / "int8", "--method", "int8"],
            "q8.gguf": ["convert", source, root / "q8.gguf", "--to", "gguf", "--gguf-type", "Q8_0"]}
    for args in runs.values():
        assert CliRunner().invoke(app, [str(a) for a in args]).exit_code == 0
    return {name: root / name for name in runs}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2", "mixtral"])
def test_layer_at_a_time_equals_whole_model(arch, models, mixtral):
    folder = mixtral if arch == "mixtral" else models[arch]  # bf16 checkpoints, float32 compute; qwen2 is tied
    weights = logits.open_weights(folder)
    ids = random_ids(weights.config["vocab_size"])
    runner = layerwise.Runner(weights)
    ours = runner.run(ids)
    runner.close()
    theirs = whole_model_logits(folder, ids)
    assert ours.shape == theirs.shape == (len(ids), weights.config["vocab_size"])
    assert np.abs(theirs).max() > 1e-3
    assert float(np.abs(ours - theirs).max()) <= 1e-4
    # one module at a time: the largest unit loaded is one matrix (for the MoE: one layer's fused experts)
    largest = max(int(np.prod(s)) for s in weights.shapes.values()) * 4
    assert 0 < runner.stats["max_unit_bytes"] <= (largest * 8 if arch == "mixtral" else largest)
    assert all(p.is_meta for p in runner.model.parameters())


@pytest.mark.parametrize("kind", ["nf4", "q8.gguf"])
def test_quantized_logits_equal_whole_model_on_dequantized_weights(kind, quantized, tmp_path, cli):
    dense = tmp_path / "dense"
    assert cli("dequantize", quantized[kind], dense, "--dtype", "float32")[0] == 0
    ids = random_ids(320)
    ours = layerwise.logits(logits.open_weights(quantized[kind]), ids)
    assert float(np.abs(ours - whole_model_logits(dense, ids)).max()) <= 1e-4


def verify_logits(cli, path, reference, *extra):
    code, out, err = cli("verify", path, "--reference", reference, "--logits", "--json", *extra)
    assert out, err
    return code, json.loads(out)


def expected_kl(source, other_dense, ids):
    p = torch.log_softmax(torch.from_numpy(whole_model_logits(source, ids)).double(), -1)
    q = torch.log_softmax(torch.from_numpy(whole_model_logits(other_dense, ids)).double(), -1)
    return (p.exp() * (p - q)).sum(-1).numpy()


@pytest.mark.parametrize("kind", ["nf4", "int8", "q8.gguf"])
def test_kl_of_quantizations_against_source(kind, source, quantized, tmp_path, cli):
    code, report = verify_logits(cli, quantized[kind], source, "--tokens", "96")
    figures = report["logits"]
    assert code == 0 and report["ok"]
    ids = logits.tokenize(source, logits.BUILTIN_TEXT, 96)
    assert figures["tokens"] == len(ids) == len(figures["per_position"]["kl"]) == 96
    dense = tmp_path / "dense"
    assert cli("dequantize", quantized[kind], dense, "--dtype", "float32")[0] == 0
    kl = expected_kl(source, dense, ids)
    assert np.allclose(figures["per_position"]["kl"], kl, rtol=1e-3, atol=1e-7)
    assert figures["kl"]["mean"] == pytest.approx(kl.mean(), rel=1e-3)
    assert figures["kl"]["max"] == pytest.approx(kl.max(), rel=1e-3)
    assert 0 < figures["kl"]["median"] <= figures["kl"]["p99"] <= figures["kl"]["max"] < 0.2
    assert 0.5 < figures["top1_agreement"] <= 1
    assert figures["perplexity"]["reference"] != figures["perplexity"]["checkpoint"]


def test_checkpoint_against_itself_is_zero(source, cli):
    code, report = verify_logits(cli, source, source, "--tokens", "64")
    figures = report["logits"]
    assert code == 0 and figures["kl"] == {"mean": 0.0, "median": 0.0, "p99": 0.0, "max": 0.0}
    assert figures["top1_agreement"] == 1.0
    assert figures["perplexity"]["reference"] == figures["perplexity"]["checkpoint"] > 1


def test_max_kl_gate(source, quantized, tmp_path, cli):
    code, report = verify_logits(cli, quantized["nf4"], source, "--tokens", "32", "--max-kl", "1e-9",
                                 "--junit", tmp_path / "r.xml")
    check = next(c for c in report["checks"] if c["name"] == "logits")
    assert code == 1 and not report["ok"] and not check["ok"] and "above --max-kl" in check["detail"]
    failures = [c.get("name") for c in ElementTree.parse(tmp_path / "r.xml").getroot() if c.find("failure") is not None]
    assert failures == ["logits"]
    code, report = verify_logits(cli, quantized["nf4"], source, "--tokens", "32", "--max-kl", "1")
    assert code == 0 and report["ok"] and report["logits"]["max_kl"] == 1


def test_logits_text_file(source, quantized, tmp_path, cli):
    text = tmp_path / "text.txt"
    text.write_text("How vexingly quick daft zebras jump! " * 10)
    code, report = verify_logits(cli, quantized["int8"], source, "--text", text, "--tokens", "1000")
    assert code == 0 and report["logits"]["tokens"] == len(logits.tokenize(source, text.read_text(), None)) < 1000


def test_logits_usage_errors(source, cli, monkeypatch):
    code, _, err = cli("verify", source, "--logits")
    assert code == 2 and "--reference" in err
    code, _, err = cli("verify", source, "--max-kl", "0.1")
    assert code == 2 and "--logits" in err
    monkeypatch.setattr(logits, "transformers_available", lambda: False)
    code, _, err = cli("verify", source, "--reference", source, "--logits")
    assert code == 2 and "pip install 'quantkit[logits]'" in err and len(err.strip().splitlines()) == 1


def test_logits_not_run_on_a_failing_checkpoint(source, tmp_path, cli):
    copy = rewritten(source, tmp_path, drop_last_norm_element)
    code, report = verify_logits(cli, copy, source)
    assert code == 1 and "logits" not in report
    assert {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}["logits"] == "not run: the checks above failed"


def test_logits_without_tokenizer_is_one_line(models, cli):
    code, _, err = cli("verify", models["llama"], "--reference", models["llama"], "--logits")
    assert code == 2 and "no tokenizer files" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------------ shapes


def failed(cli, folder, *extra):
    code, out, _ = cli("verify", folder, "--json", *extra)
    report = json.loads(out)
    assert code == (0 if report["ok"] else 1)
    return {c["name"]: c["detail"] for c in report["checks"] if not c["ok"]}


def drop_last_norm_element(tensors):
    tensors["model.norm.weight"] = tensors["model.norm.weight"][:-1].clone()


def rewritten(folder, tmp_path, edit):
    from safetensors.torch import save_file

    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    tensors = load_tensors(copy)
    edit(tensors)
    for f in copy.glob("*.safetensors"):
        f.unlink()
    (copy / "model.safetensors.index.json").unlink(missing_ok=True)
    save_file(tensors, copy / "model.safetensors", metadata={"format": "pt"})
    return copy


@pytest.mark.parametrize("with_transformers", [True, False])
def test_shape_check_catches_a_norm_missing_one_element(with_transformers, source, tmp_path, cli, monkeypatch):
    assert failed(cli, source) == {}
    copy = rewritten(source, tmp_path, drop_last_norm_element)
    if not with_transformers:
        monkeypatch.setattr(logits, "transformers_available", lambda: False)
    problems = failed(cli, copy)
    assert list(problems) == ["shapes"] and "model.norm.weight" in problems["shapes"] and "(127,)" in problems["shapes"]


@pytest.mark.parametrize("with_transformers", [True, False])
def test_shape_check_notes_a_missing_tensor(with_transformers, source, tmp_path, cli, monkeypatch):
    copy = rewritten(source, tmp_path, lambda t: t.pop("model.layers.1.post_attention_layernorm.weight"))
    if not with_transformers:
        monkeypatch.setattr(logits, "transformers_available", lambda: False)
    code, out, _ = cli("verify", copy, "--json")
    check = next(c for c in json.loads(out)["checks"] if c["name"] == "shapes")
    assert code == 0 and check["ok"] and "1 parameter(s) not in the checkpoint" in check["detail"]
    assert "model.layers.1.post_attention_layernorm.weight" in check["detail"]


def test_shape_check_quantized_by_dense_shapes(quantized, tmp_path, cli):
    assert failed(cli, quantized["nf4"]) == {}
    copy = tmp_path / "nf4"
    shutil.copytree(quantized["nf4"], copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "intermediate_size": 384}))
    assert "mlp" in failed(cli, copy)["shapes"]


def test_shape_check_moe_and_tied(models, mixtral, cli):
    for folder in (mixtral, models["qwen2"], models["gpt2"], models["bert"]):
        assert failed(cli, folder) == {}, folder


# --------------------------------------------------------------------------------------- tokenizer


def edited_copy(folder, tmp_path, name, edit):
    copy = tmp_path / "tok"
    shutil.copytree(folder, copy)
    path = copy / name
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    return copy


@pytest.mark.parametrize("case", ["bos", "vocab", "template"])
def test_tokenizer_check(case, source, tmp_path, cli):
    edits = {"bos": ("config.json", lambda c: {**c, "bos_token_id": 5000}, "bos_token_id 5000"),
             "vocab": ("config.json", lambda c: {**c, "vocab_size": 300}, "vocab_size is 300"),
             "template": ("tokenizer_config.json", lambda c: {**c, "chat_template": "{% for m in messages %}{{ m }"},
                          "does not parse as Jinja")}  # fmt: skip
    name, edit, expected = edits[case]
    problems = failed(cli, edited_copy(source, tmp_path, name, edit))
    assert "tokenizer" in problems and expected in problems["tokenizer"]


def test_tokenizer_check_passes_and_notes_absent_files(source, models, cli):
    _, out, _ = cli("verify", source, "--json")
    check = next(c for c in json.loads(out)["checks"] if c["name"] == "tokenizer")
    assert check["ok"] and "320 token ids" in check["detail"] and "1 chat template(s) parse" in check["detail"]
    _, out, _ = cli("verify", models["llama"], "--json")
    check = next(c for c in json.loads(out)["checks"] if c["name"] == "tokenizer")
    assert check["ok"] and "no tokenizer files" in check["detail"]


# -------------------------------------------------------------------------------------- GPTQ --fix


@pytest.mark.parametrize(("written", "declared"), [("v2", "gptq"), ("v1", "gptq_v2")])
def test_gptq_fix_rewrites_only_the_declared_format(written, declared, source, tmp_path, cli):
    """Symmetric zero points prove their version (v1 stores 7, v2 8 at 4 bits); asymmetric ones mostly cannot."""
    out = tmp_path / "gptq"
    assert cli("quantize", source, out, "--method", "gptq", "--bits", "4", "--group-size", "32", "--sym", "--format", written)[0] == 0
    config = json.loads((out / "config.json").read_text())
    right = config["quantization_config"]["checkpoint_format"]
    wrong = {**config, "quantization_config": {**config["quantization_config"], "checkpoint_format": declared, "format": declared}}
    (out / "config.json").write_text(json.dumps(wrong))
    (out / "quantize_config.json").write_text(json.dumps({"bits": 4, "checkpoint_format": declared, "format": declared}))
    shards = {f.name: f.read_bytes() for f in out.glob("*.safetensors")}
    assert f"stored as GPTQ {written} but config.json declares checkpoint_format '{declared}'" in failed(cli, out)["quantization"]
    code, out_json, err = cli("verify", out, "--fix", "--json")
    report = json.loads(out_json)
    assert code == 0 and report["ok"], report
    assert len(report["fixed"]) == 2 and f"'{declared}' -> '{right}'" in report["fixed"][0] and "fixed" in err
    assert json.loads((out / "config.json").read_text()) == config
    assert json.loads((out / "quantize_config.json").read_text()) == {"bits": 4, "checkpoint_format": right, "format": right}
    assert {f.name: f.read_bytes() for f in out.glob("*.safetensors")} == shards
    code, out_json, _ = cli("verify", out, "--fix", "--json")
    assert code == 0 and "fixed" not in json.loads(out_json)  # nothing left to fix


def test_fix_without_finding_changes_nothing(quantized, cli):
    before = (quantized["nf4"] / "config.json").read_bytes()
    code, out, _ = cli("verify", quantized["nf4"], "--fix", "--json")
    assert code == 0 and "fixed" not in json.loads(out)
    assert (quantized["nf4"] / "config.json").read_bytes() == before


def test_open_weights_names_and_shapes_agree_across_formats(source, quantized):
    dense = open_checkpoint(source)
    for kind in ("nf4", "int8", "q8.gguf"):
        weights = logits.open_weights(quantized[kind])
        assert weights.shapes == {n: tuple(i.shape) for n, i in dense.tensors.items()}, kind
