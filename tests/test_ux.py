"""What a user expects before and after a run (#17): the plan with exact bytes, choices in --help, verify's
summary, model cards, the Python API, file modes, GGUF back to bfloat16."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import load_tensors
from tests.gguf_checkpoints import make_checkpoint

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    """A llama with a tokenizer and widths that fit GPTQ groups of 32 and every GGUF type (256-wide rows)."""
    folder = make_checkpoint(tmp_path_factory.mktemp("ux") / "llama", hidden=256, ffn=512)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\nbase_model: acme/base-llama\n---\n\n# Tiny llama\n\nSource card text.\n")
    return folder


def files_on_disk(out: Path, files: list[str]) -> int:
    return sum((out / f).stat().st_size for f in files)


@pytest.mark.parametrize("flags", [
    ["--method", "nf4"], ["--method", "int8"], ["--method", "fp4"],
    ["--method", "gptq", "--group-size", "32"], ["--method", "gptq", "--bits", "8", "--group-size", "64", "--asym"],
])  # fmt: skip
def test_dry_run_bytes_are_what_the_run_writes(llama, tmp_path, cli, flags):
    out = tmp_path / "q"
    code, plan_text, err = cli("quantize", llama, out, *flags, "--max-shard-size", "300KB", "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(plan_text)
    assert not out.exists()  # a dry run writes nothing
    code, run_text, err = cli("quantize", llama, out, *flags, "--max-shard-size", "300KB", "--json")
    assert code == 0, err
    run = json.loads(run_text)
    assert len(run["files"]) > 2  # sharded: headers and the index are part of the plan too
    assert plan["output_bytes_exact"] is True
    assert plan["output_bytes"] == run["output_bytes"] == files_on_disk(out, run["files"])
    assert plan["files"] == {f: (out / f).stat().st_size for f in run["files"]}


def test_double_quant_plan_is_an_upper_bound_within_a_few_bytes_per_module(llama, tmp_path, cli):
    plan = json.loads(cli("quantize", llama, tmp_path / "q", "--method", "nf4", "--double-quant", "--dry-run", "--json")[1])
    run = json.loads(cli("quantize", llama, tmp_path / "q", "--method", "nf4", "--double-quant", "--json")[1])
    assert plan["output_bytes_exact"] is False
    assert 0 <= plan["output_bytes"] - run["output_bytes"] <= 24 * plan["counts"]["quantize"]


@pytest.mark.parametrize("gguf_type", ["F16", "Q8_0", "Q4_K", "Q6_K"])
def test_gguf_plan_bytes_are_the_file_size(llama, tmp_path, cli, gguf_type):
    out = tmp_path / "m.gguf"
    plan = json.loads(cli("convert", llama, out, "--to", "gguf", "--gguf-type", gguf_type, "--dry-run", "--json")[1])
    code, text, err = cli("convert", llama, out, "--to", "gguf", "--gguf-type", gguf_type, "--json")
    assert code == 0, err
    assert plan["output_bytes"] == json.loads(text)["output_bytes"] == out.stat().st_size
    norm = next(t for t in plan["tensors"] if t["name"] == "model.norm.weight")
    assert norm["outputs"][0]["dtype"] == "F32" and "norm" in norm["reason"]


def test_inspect_size_table_covers_every_method_and_gguf_type(llama, tmp_path, cli):
    data = json.loads(cli("inspect", llama, "--json")[1])
    labels = [row["label"] for row in data["plans"]]
    for label in ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8", "gptq-4bit-g128", "gptq-8bit-g128",
                  "gguf-F16", "gguf-BF16", "gguf-Q8_0", "gguf-Q4_0", "gguf-Q4_K_M", "gguf-Q6_K"):
        assert label in labels
    sizes = {row["label"]: row["output_bytes"] for row in data["plans"]}
    assert sizes["nf4-dq"] < sizes["nf4"] < sizes["int8"] < sizes["gguf-F16"]
    run = json.loads(cli("quantize", llama, tmp_path / "q", "--method", "int8", "--json")[1])
    assert sizes["int8"] == run["output_bytes"]
    # the command each row gives is one that runs
    row = next(r for r in data["plans"] if r["label"] == "nf4-dq")
    assert row["command"] == "quantize --method nf4 --double-quant"


def test_plan_says_why_each_tensor_is_kept(minilm, llama, tmp_path, cli):
    plan = json.loads(cli("inspect", llama, "--method", "nf4", "--skip", "*.mlp.down_proj", "--json")[1])
    reasons = {t["name"]: (t["fate"], t["reason"]) for t in plan["tensors"]}
    assert reasons["lm_head.weight"][0] == "keep" and "output head" in reasons["lm_head.weight"][1]
    assert reasons["model.embed_tokens.weight"] == ("keep", "embedding")
    assert reasons["model.layers.0.mlp.down_proj.weight"] == ("keep", "skipped: matches '*.mlp.down_proj' from --skip")
    assert reasons["model.layers.0.self_attn.q_proj.weight"][0] == "quantize"
    assert "free_disk_bytes" not in plan and plan["estimated_peak_memory_bytes"] > 100e6
    # MiniLM (as published): its position ids buffer is dropped, and the plan says why
    plan = json.loads(cli("inspect", minilm, "--method", "int8", "--json")[1])
    dropped = [t for t in plan["tensors"] if t["fate"] == "drop"]
    assert dropped and all("non-persistent" in t["reason"] for t in dropped)


def test_dry_run_lists_every_refused_weight_and_exits_2(models, tmp_path, cli):
    code, out, _ = cli("quantize", models["llama"], tmp_path / "q", "--method", "gptq", "--group-size", "64", "--dry-run", "--json")
    plan = json.loads(out)
    assert code == 2
    assert plan["refused"] == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]
    assert "free_disk_bytes" in plan and plan["disk"] == str(tmp_path)


def test_recipe_globs_for_other_families_are_silent_but_a_recipe_that_fits_nothing_warns(models, tmp_path, cli):
    recipe = ROOT / "configs" / "mixed-nf4.toml"
    for arch in ("llama", "gpt2", "bert"):
        code, _, err = cli("quantize", models[arch], tmp_path / arch, "--recipe", recipe)
        assert code == 0, err
        assert "warning" not in err, (arch, err)
    other = tmp_path / "other.toml"
    other.write_text('method = "nf4"\nskip = ["*.nothing_here", "*.nor_here"]\n')
    code, _, err = cli("quantize", models["llama"], tmp_path / "o", "--recipe", other)
    assert code == 0 and err.count("warning") == 1 and str(other) in err and "--skip" not in err
    code, _, err = cli("quantize", models["llama"], tmp_path / "s", "--method", "nf4", "--skip", "*.nothing_here")
    assert "warning: --skip '*.nothing_here' matched no linear module" in err


def test_help_shows_choices_and_defaults(cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # one line per option
    from quantkit import api, methods

    methods.load()
    code, out, _ = cli("quantize", "-h")
    assert code == 0
    assert {"nf4", "gptq", "fp8", "w4a16"} <= set(api.QUANTIZERS)
    for text in ("[" + "|".join(sorted(api.QUANTIZERS)) + "]", "[default: 64]", "[bfloat16|float16|float32]", "[default: 128]", "[v1|v2]", "--dry-run"):
        assert text in out, text
    code, out, _ = cli("convert", "--help")
    assert "q4_k" in out.lower() and "safetensors" in out and "default: bfloat16" in out
    code, out, _ = cli("--version")
    assert code == 0 and out.strip().startswith("quantkit ")
    code, out, _ = cli("--help")
    assert "--install-completion" in out and "formats" in out


def test_help_defaults_agree_with_the_options_classes(cli, monkeypatch):
    from quantkit import api, methods

    methods.load()
    monkeypatch.setenv("COLUMNS", "300")
    out = cli("quantize", "--help")[1]
    defaults = {f: getattr(q.options(method=m), f) for m, q in api.QUANTIZERS.items()
                for f in ("blocksize", "compute_dtype", "quant_storage", "group_size", "bits") if hasattr(q.options(method=m), f)}
    for value in defaults.values():
        assert f"[default: {value}]" in out, value


def test_formats_lists_methods_types_and_architectures(cli):
    data = json.loads(cli("formats", "--json")[1])
    assert {"nf4", "fp4", "int8", "gptq"} <= set(data["quantize"])
    assert data["quantize"]["gptq"]["settings"]["group_size"] == 128
    assert "Q4_K_M" in data["convert"]["gguf"]["gguf_types"] and "LlamaForCausalLM" in data["convert"]["gguf"]["architectures"]
    assert {"bitsandbytes", "gptq", "awq"} <= set(data["dequantize"]["quant_methods"])


def test_verify_prints_a_summary_and_every_layer_with_verbose(models, tmp_path, cli, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    cli("quantize", models["llama"], tmp_path / "q", "--method", "nf4")
    code, short, _ = cli("verify", tmp_path / "q", "--reference", models["llama"])
    assert code == 0
    code, full, _ = cli("verify", tmp_path / "q", "--reference", models["llama"], "--verbose")
    layers = json.loads(cli("verify", tmp_path / "q", "--reference", models["llama"], "--json")[1])["layers"]
    rows = lambda text: sum(name["name"] in text for name in layers)  # noqa: E731
    assert rows(full) == len(layers) == 14 and rows(short) == 5
    worst = max(layers, key=lambda x: x["rel_error"] / x["max_error"])
    assert worst["name"] in short


def test_verify_on_a_single_safetensors_file_is_bad_input(models, cli):
    code, out, err = cli("verify", models["llama"] / "model.safetensors")
    assert code == 2 and err.count("\n") == 1 and "single file" in err and "Traceback" not in err


def test_gguf_verify_streams_and_matches_a_dense_comparison(llama, tmp_path, cli):
    cli("convert", llama, tmp_path / "m.gguf", "--to", "gguf", "--gguf-type", "Q4_K")
    report = json.loads(cli("verify", tmp_path / "m.gguf", "--reference", llama, "--json")[1])
    assert report["ok"]
    cli("convert", tmp_path / "m.gguf", tmp_path / "back", "--to", "safetensors", "--dtype", "float32")
    back, source = load_tensors(tmp_path / "back"), load_tensors(llama)
    for layer in report["layers"]:
        a, b = source[layer["name"]].float().numpy().astype(np.float64), back[layer["name"]].numpy().astype(np.float64)
        assert layer["rel_error"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(a), rel=1e-6, abs=1e-9)


def test_gguf_to_safetensors_defaults_to_bfloat16(llama, tmp_path, cli):
    cli("convert", llama, tmp_path / "m.gguf", "--to", "gguf", "--gguf-type", "Q8_0")
    code, out, err = cli("convert", tmp_path / "m.gguf", tmp_path / "bf16", "--to", "safetensors", "--json")
    assert code == 0, err and json.loads(out)["dtype"] == "bfloat16"
    assert {str(t.dtype) for t in load_tensors(tmp_path / "bf16").values()} == {"torch.bfloat16"}
    exact = json.loads(cli("dequantize", tmp_path / "m.gguf", tmp_path / "f32", "--dtype", "float32", "--json")[1])
    assert exact["dtype"] == "float32"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_files_are_created_without_execute_bits_and_respect_umask(models, tmp_path, umask):
    code = (f"import os, sys; os.umask({umask}); from quantkit.cli import main; sys.argv = ['quantkit', 'quantize', "
            f"{str(models['gpt2'])!r}, {str(tmp_path / 'q')!r}, '--method', 'int8']; main()")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "q").iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask and set(modes.values()) == {0o666 & ~umask}


def test_dash_as_out_is_refused(models, tmp_path, cli):
    os.chdir(tmp_path)
    for args in (("quantize", models["llama"], "-", "--method", "nf4"), ("convert", models["llama"], "-", "--to", "gguf")):
        code, _, err = cli(*args)
        assert code == 2 and "OUT '-'" in err
    assert not (tmp_path / "-").exists()


def test_model_card_parses_and_keeps_the_source_card(llama, tmp_path, cli):
    from huggingface_hub import ModelCard

    cli("quantize", llama, tmp_path / "q", "--method", "gptq", "--group-size", "32")
    card = ModelCard.load(tmp_path / "q" / "README.md")
    assert card.data.base_model == "acme/base-llama" and card.data.library_name == "transformers"
    assert {"quantkit", "gptq", "4-bit"} <= set(card.data.tags) and card.data.license == "apache-2.0"
    assert card.data.quantization["group_size"] == 32
    assert card.text.index("quantized to gptq") < card.text.index("Source card text.")
    cli("dequantize", tmp_path / "q", tmp_path / "d")
    assert ModelCard.load(tmp_path / "d" / "README.md").data.tags == ["quantkit", "dequantized"]


def test_python_api_returns_what_json_prints(models, tmp_path, cli):
    import quantkit

    result = quantkit.quantize(models["llama"], tmp_path / "a", method="nf4", double_quant=True)
    cli_data = json.loads(cli("quantize", models["llama"], tmp_path / "b", "--method", "nf4", "--double-quant", "--json")[1])
    api_data = result.as_dict()
    assert {k: v for k, v in api_data.items() if k != "out"} == {k: v for k, v in cli_data.items() if k != "out"}
    assert quantkit.verify(tmp_path / "a", reference=models["llama"]).ok
    plan = quantkit.inspect(models["llama"], method="int8")
    assert plan["output_bytes"] == quantkit.quantize(models["llama"], tmp_path / "c", method="int8").summary["output_bytes"]
    with pytest.raises(quantkit.QuantkitError, match="unknown method"):
        quantkit.quantize(models["llama"], tmp_path / "d", method="nf5")


def test_import_quantkit_stays_cheap():
    code = "import sys, quantkit; assert quantkit.__version__; print(sorted(m for m in ('numpy', 'typer', 'quantkit.api') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"
