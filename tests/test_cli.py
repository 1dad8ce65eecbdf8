"""The command line as users and scripts meet it: hub ids, recipes, --json, errors."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from tests.conftest import load_tensors


def fake_hub_cache(tmp_path, src, repo="acme/tiny-llama"):
    """A huggingface_hub cache holding `src` as repo `repo` at revision main (what a download leaves)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / f"models--{repo.replace('/', '--')}"
    shutil.copytree(src, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    return tmp_path / "hub"


def run_quantkit(*args, **env):
    import os

    proc = subprocess.run([sys.executable, "-m", "quantkit", *map(str, args)], capture_output=True, text=True,
                          env={**os.environ, **env})  # fmt: skip
    return proc.returncode, proc.stdout, proc.stderr


def test_hub_repo_id_from_the_offline_cache(models, tmp_path):
    env = {"HF_HUB_CACHE": str(fake_hub_cache(tmp_path, models["llama"])), "HF_HUB_OFFLINE": "1"}
    code, out, err = run_quantkit("inspect", "acme/tiny-llama", "--json", **env)
    assert code == 0, err
    assert json.loads(out)["architecture"] == "LlamaForCausalLM"
    code, _, err = run_quantkit("quantize", "acme/tiny-llama", tmp_path / "q", "--method", "nf4", **env)
    assert code == 0, err
    code, _, err = run_quantkit("inspect", "acme/not-there", **env)
    assert code == 2 and "acme/not-there" in err and "Traceback" not in err


def test_inspect_json_and_quantized_detection(models, tmp_path, cli):
    code, out, _ = cli("inspect", models["gpt2"], "--json")
    data = json.loads(out)
    assert data["architecture"] == "GPT2LMHeadModel" and data["quant_method"] is None
    assert data["num_parameters"] > 0 and {"name", "dtype", "shape"} <= set(data["tensors"][0])
    assert data["plan_bytes"]["nf4"] < data["plan_bytes"]["int8"] < data["bytes"]
    cli("quantize", models["gpt2"], tmp_path / "q", "--method", "nf4", "--double-quant")
    data = json.loads(cli("inspect", tmp_path / "q", "--json")[1])
    assert data["quant_method"] == "bitsandbytes" and data["quantization"]["method"] == "nf4"


def test_recipe_and_flags_override_it(models, tmp_path, cli):
    recipe = tmp_path / "r.toml"
    recipe.write_text('method = "nf4"\ndouble_quant = true\ncompute_dtype = "bfloat16"\nskip = ["*.mlp.up_proj"]\n')
    code, _, err = cli("quantize", models["llama"], tmp_path / "q", "--recipe", recipe, "--no-double-quant")
    assert code == 0, err
    qc = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert qc["bnb_4bit_use_double_quant"] is False and qc["bnb_4bit_compute_dtype"] == "bfloat16"
    assert "model.layers.1.mlp.up_proj" in qc["llm_int8_skip_modules"]


def test_shipped_recipes_load(models, tmp_path, cli):
    from pathlib import Path

    for recipe in sorted((Path(__file__).parent.parent / "configs").glob("*.toml")):
        code, _, err = cli("quantize", models["llama"], tmp_path / recipe.stem, "--recipe", recipe)
        assert code == 0, (recipe, err)


def test_quantized_source_is_requantized_with_its_error(models, tmp_path, cli):
    cli("quantize", models["llama"], tmp_path / "q", "--method", "int8")
    code, out, err = cli("quantize", tmp_path / "q", tmp_path / "qq", "--method", "nf4", "--json")
    summary = json.loads(out)
    assert code == 0, err
    assert summary["from"] == "int8" and summary["lossless"] == [] and summary["requantized"]
    assert all(0 < row["rel_error"] < 0.2 for row in summary["requantized"])
    assert "load_in_4bit" in json.loads((tmp_path / "qq" / "config.json").read_text())["quantization_config"]


def test_bad_usage_is_one_line_exit_2(models, tmp_path, cli):
    for args in (["--method", "nf5"], ["--method", "nf4", "--blocksize", "128"], ["--method", "nf4", "--max-shard-size", "lots"],
                 ["--method", "nf4", "--compute-dtype", "int3"], ["--method", "nf4", "--backend", "numba"]):
        code, _, err = cli("quantize", models["llama"], tmp_path / "q", *args)
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)
    assert not (tmp_path / "q").exists()


def test_json_output_is_clean_and_real_console_script(models, tmp_path):
    code, out, err = run_quantkit("quantize", models["bert"], tmp_path / "q", "--method", "int8", "--json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["quantized"] > 0 and summary["files"] == ["model.safetensors"]
    assert set(load_tensors(tmp_path / "q")) >= {"encoder.layer.0.attention.self.query.SCB"}


def test_a_reader_that_went_away_gets_no_traceback(models):
    """`quantkit inspect --json | true`: click's exit code for a closed pipe and nothing on stderr, now that the
    process ends without the interpreter's teardown (its last flush must not raise). With the flush gone,
    test_json_output_is_clean_and_real_console_script loses its JSON."""
    proc = subprocess.Popen([sys.executable, "-m", "quantkit", "inspect", str(models["bert"]), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # long before the command has anything to say
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 1, err  # click's answer to a closed pipe
    assert err == "", err


def test_inspect_counts_quantized_weights_at_their_dense_size(models, tmp_path, cli):
    dense = json.loads(cli("inspect", models["llama"], "--json")[1])["num_parameters"]
    for method in ("nf4", "int8"):
        cli("quantize", models["llama"], tmp_path / method, "--method", method)
        assert json.loads(cli("inspect", tmp_path / method, "--json")[1])["num_parameters"] == dense


def test_a_skip_glob_that_matches_nothing_is_reported(models, tmp_path, cli):
    code, out, err = cli("quantize", models["llama"], tmp_path / "q", "--method", "nf4", "--skip", "*.no_such_module", "--skip", "*.mlp.up_proj")
    assert code == 0 and "'*.no_such_module' matched no linear module" in err and "up_proj" not in err
    code, out, _ = cli("quantize", models["llama"], tmp_path / "j", "--method", "nf4", "--skip", "*.nope", "--json")
    assert json.loads(out)["unmatched_skips"] == ["*.nope"]


def test_a_flag_the_method_lacks_is_refused(models, tmp_path, cli):
    for args, flag in ((["--method", "nf4", "--bits", "4"], "--bits"), (["--method", "int8", "--group-size", "32", "--format", "v1"], "--group-size"),
                       (["--method", "gptq", "--double-quant"], "--double-quant"), (["--method", "gptq", "--device", "cuda"], "--device")):
        code, _, err = cli("quantize", models["llama"], tmp_path / "q", *args)
        assert code == 2 and f"{flag} does not apply to method" in err and len(err.strip().splitlines()) == 1, (args, err)
    assert not (tmp_path / "q").exists()


def test_recipe_values_must_have_the_option_type(models, tmp_path, cli):
    for line, expected in (('double_quant = "false"', "double_quant = 'false': expected true or false"),
                           ('sym = "false"', "expected true or false"), ("bits = 4.0", "bits = 4.0: expected a whole number"),
                           ("bits = true", "expected a whole number"), ('skip = "*.q_proj"', "expected a list of strings"),
                           ("group_sizes = 32", "group_sizes: unknown setting")):
        recipe = tmp_path / "r.toml"
        recipe.write_text(f'method = "gptq"\n{line}\n' if "double" not in line else f'method = "nf4"\n{line}\n')
        code, _, err = cli("quantize", models["llama"], tmp_path / "q", "--recipe", recipe)
        assert code == 2 and expected in err and str(recipe) in err, (line, err)
    recipe.write_text('method = "nf4"\nbits = 4\n')
    code, _, err = cli("quantize", models["llama"], tmp_path / "q", "--recipe", recipe)
    assert code == 2 and "bits does not apply to method nf4" in err
