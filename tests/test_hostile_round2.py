"""Hostile and careless use, round two (issue #18): outputs that would land on the source, concurrent runs
on one OUT, OUT given as a symlink or as '.', leftovers whose names hold glob characters, broken
checkpoints verify must fail, crashes in verify, real writers' dtypes, and messages that named the wrong
thing. One small test per case."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from quantkit.errors import QuantkitError
from quantkit.io import staged
from tests.hostile_files import one_error_line, refused, tiny_tensors, tree_digest, write_checkpoint
from tests.test_hub_cache import add_to_cache


def quiet_folder(folder: Path) -> list[str]:
    """What a finished run must not leave: temporary folders, old OUTs, lock files."""
    return sorted(p.name for p in folder.glob(".*quantkit-*"))


def same_files(a: Path, b: Path) -> bool:
    """Two outputs (files, or folders file by file) hold the same bytes."""
    if a.is_file():
        return a.read_bytes() == b.read_bytes()
    return {p.name: p.read_bytes() for p in a.iterdir()} == {p.name: p.read_bytes() for p in b.iterdir()}


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------- 1. outputs on the source


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "m.gguf", "sub/m.gguf"])
@pytest.mark.parametrize("force", [False, True], ids=["plain", "force"])
def test_gguf_output_inside_src_is_refused(ckpt, cli, name, force):
    before = tree_digest(ckpt)
    refused(cli, "convert", ckpt, ckpt / name, "--to", "gguf", *(["--force"] if force else []),
            naming="output is inside the source folder")
    assert tree_digest(ckpt) == before
    assert quiet_folder(ckpt) == []


@pytest.mark.parametrize("command", [
    ("quantize", "--method", "nf4"), ("convert", "--to", "gguf"), ("dequantize",), ("convert", "--to", "gptq-v2"),
], ids=["quantize", "gguf", "dequantize", "gptq"])  # fmt: skip
def test_every_writer_refuses_an_out_that_is_a_file_of_src_through_a_link(ckpt, tmp_path, cli, command):
    verb, *flags = command
    src = ckpt
    if verb == "dequantize" or flags[-1] == "gptq-v2":
        method = ("--method", "nf4") if verb == "dequantize" else ("--method", "gptq", "--group-size", "32")
        code, _, err = cli("quantize", ckpt, tmp_path / "q", *method)
        assert code == 0, err
        src = tmp_path / "q"
    link = tmp_path / "link"
    link.symlink_to(src / "model.safetensors")
    before = tree_digest(src)
    line = refused(cli, verb, src, link, *flags, "--force", naming=str(link))
    assert "source" in line
    assert tree_digest(src) == before and link.is_symlink()


def test_out_that_is_a_hub_cache_blob_of_src_is_refused(ckpt, tmp_path, cli):
    snapshot = add_to_cache(tmp_path / "hub", "org/tiny", ckpt)
    blobs = snapshot.parents[1] / "blobs"
    blob = (snapshot / "model.safetensors").resolve()
    before = tree_digest(blobs)
    refused(cli, "convert", snapshot, blob, "--to", "gguf", "--force", naming="is a file of the source")
    refused(cli, "quantize", snapshot, blobs, "--method", "nf4", "--force", naming="holds the file")
    assert tree_digest(blobs) == before


# ---------------------------------------------------------------- 3. concurrent runs


@pytest.mark.parametrize("command, out_name", [
    (("quantize", "--method", "nf4"), "out"), (("convert", "--to", "gguf"), "m.gguf"),
], ids=["quantize", "gguf"])  # fmt: skip
def test_a_second_run_on_a_locked_out_fails_with_one_line(ckpt, tmp_path, cli, command, out_name):
    verb, *flags = command
    out = tmp_path / out_name
    with staged.output_lock(out):  # as a first run holds it while writing
        line = refused(cli, verb, ckpt, out, *flags, "--force", naming="another quantkit run is writing it")
        assert str(out) in line
        assert not out.exists()
    assert quiet_folder(tmp_path) == []  # the lock is gone with its holder
    code, _, err = cli(verb, ckpt, out, *flags)
    assert code == 0, err
    assert quiet_folder(tmp_path) == []


def test_two_real_runs_at_once(tmp_path):
    """Two processes on one OUT: the second fails at once with the lock line, the first finishes."""
    rng = np.random.default_rng(0)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((1024, 4096), dtype=np.float32) for i in range(16)}
    tensors["lm_head.weight"] = rng.standard_normal((32, 4096), dtype=np.float32)
    src = write_checkpoint(tmp_path / "src", tensors)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "quantkit", "quantize", str(src), str(out), "--method", "nf4", "--backend", "numpy",
            "--max-shard-size", "5MB"]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / ".out.quantkit-lock"
    while not any(tmp_path.glob(".out.quantkit-partial-*/model-*")):  # well under way, far from done
        assert first.poll() is None, first.communicate()
        time.sleep(0.02)
    assert lock.exists()
    second = subprocess.run([*args, "--force"], capture_output=True, text=True, timeout=120)
    assert second.returncode == 2
    assert "another quantkit run is writing it" in one_error_line(second.stderr)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    assert quiet_folder(tmp_path) == [] and (out / "model.safetensors.index.json").is_file()


def test_a_run_that_finished_meanwhile_is_not_clobbered_without_force(ckpt, tmp_path):
    """Checks up front passed while OUT was absent; by the time this run holds the lock another wrote it."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "theirs.txt").write_text("finished first")
    with pytest.raises(QuantkitError, match="already exists"):
        staged.write_staged(out, [], 10**9, lambda writer: None, lambda folder: [])
    assert (out / "theirs.txt").read_text() == "finished first"
    assert quiet_folder(tmp_path) == []


def test_a_stale_lock_file_is_harmless(ckpt, tmp_path, cli):
    out = tmp_path / "out"
    code, _, err = cli("quantize", ckpt, out, "--method", "nf4")
    assert code == 0, err
    (tmp_path / ".out.quantkit-lock").write_text("")  # a run killed while holding it (the lock died with it)
    code, stdout, err = cli("verify", out, "--json")
    assert code == 0, stdout + err
    code, _, err = cli("quantize", ckpt, out, "--method", "nf4", "--force")
    assert code == 0, err
    assert quiet_folder(tmp_path) == []


# ---------------------------------------------------------------- 4. OUT as a symlink, OUT as '.'


@pytest.mark.parametrize("command, name", [
    (("quantize", "--method", "nf4"), "out"), (("convert", "--to", "gguf"), "m.gguf"),
], ids=["folder", "gguf"])  # fmt: skip
def test_out_symlink_keeps_the_link_and_replaces_what_it_points_to(ckpt, tmp_path, cli, command, name):
    verb, *flags = command
    disk = tmp_path / "disk"
    disk.mkdir()
    target = disk / name
    code, _, err = cli(verb, ckpt, target, *flags)  # an earlier output where the link points
    assert code == 0, err
    link = tmp_path / name
    link.symlink_to(target)
    refused(cli, verb, ckpt, link, *flags, naming="already exists")
    extra = ("--method", "int8") if verb == "quantize" else ("--gguf-type", "Q8_0")
    code, _, err = cli(verb, ckpt, link, *flags, *extra, "--force")
    assert code == 0, err
    assert link.is_symlink() and os.readlink(link) == str(target)
    fresh = tmp_path / "fresh" / name
    code, _, err = cli(verb, ckpt, fresh, *flags, *extra)
    assert code == 0, err
    assert same_files(target, fresh)
    assert quiet_folder(tmp_path) == [] and quiet_folder(disk) == []


def test_out_symlink_kept_when_the_run_fails(ckpt, tmp_path, cli, monkeypatch):
    from quantkit import pipeline

    disk = tmp_path / "disk"
    code, _, err = cli("quantize", ckpt, disk / "out", "--method", "nf4")
    assert code == 0, err
    before = tree_digest(disk)
    link = tmp_path / "out"
    link.symlink_to(disk / "out")

    def fail(*args, **kwargs):
        raise QuantkitError("disk gone while finishing")

    monkeypatch.setattr(pipeline, "write_config", fail)  # late in the run, after every shard
    refused(cli, "quantize", ckpt, link, "--method", "int8", "--force", naming="disk gone")
    assert link.is_symlink() and os.readlink(link) == str(disk / "out")
    assert tree_digest(disk) == before
    assert quiet_folder(tmp_path) == [] and quiet_folder(disk) == []


def test_dangling_out_symlink_is_created_where_it_points(ckpt, tmp_path, cli):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "elsewhere" / "out")
    code, _, err = cli("quantize", ckpt, link, "--method", "nf4")
    assert code == 0, err
    assert link.is_symlink() and (tmp_path / "elsewhere" / "out" / "model.safetensors").is_file()


@pytest.mark.parametrize("out", [".", "..", "./"])
@pytest.mark.parametrize("command", [("quantize", "--method", "nf4"), ("convert", "--to", "gguf"), ("dequantize",)],
                         ids=["quantize", "gguf", "dequantize"])
def test_out_without_a_name_is_refused_up_front(ckpt, tmp_path, cli, monkeypatch, out, command):
    verb, *flags = command
    work = tmp_path / "work" / "here"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    source = ckpt
    if verb == "dequantize":
        code, _, err = cli("quantize", ckpt, tmp_path / "q", "--method", "nf4")
        assert code == 0, err
        source = tmp_path / "q"
    refused(cli, verb, source, out, *flags, naming="OUT must name the")
    assert list((tmp_path / "work").rglob("*")) == [work]


# ---------------------------------------------------------------- 10. leftovers and glob characters


def test_verify_reports_a_leftover_whose_name_holds_glob_characters(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / f".out[1].quantkit-partial-{dead_pid()}").mkdir()
    code, stdout, err = cli("verify", "out[1]", "--json")
    assert code == 1, err
    checks = json.loads(stdout)["checks"]
    assert not checks[0]["ok"] and ".out[1].quantkit-partial-" in checks[0]["detail"]


def test_verify_does_not_flag_a_siblings_leftover(ckpt, tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli("quantize", ckpt, tmp_path / "a?", "--method", "nf4")
    assert code == 0, err
    (tmp_path / f".ab.quantkit-partial-{dead_pid()}").mkdir()
    (tmp_path / f".a[.quantkit-partial-{dead_pid()}").mkdir()
    code, stdout, err = cli("verify", "a?", "--json")
    assert code == 0, stdout + err
    code, stdout, _ = cli("verify", "ab", "--json")
    assert code == 1 and ".ab.quantkit-partial-" in json.loads(stdout)["checks"][0]["detail"]


# ---------------------------------------------------------------- 2. real writers' dtypes (bf16 scales)


def _rewrite(src: Path, out: Path, tensors: dict, config: dict) -> Path:
    """A checkpoint folder holding `tensors` (torch) with `config`, side files of `src` left out."""
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config))
    return out


def _as_awq(tensors: dict, group_size: int) -> tuple[dict, dict]:
    """GPTQ v2 4-bit modules rewritten in AWQ GEMM layout (codes and zero points as is), as torch tensors."""
    import torch

    from quantkit.methods.gptq import layout

    out = {}
    for name, t in tensors.items():
        if name.endswith(".qweight"):
            module = name.removesuffix(".qweight")
            codes = layout.unpack_rows(tensors[name].numpy(), 4)  # [in, out]
            zeros = layout.zero_points(tensors[f"{module}.qzeros"].numpy(), 4, "v2")  # [groups, out]
            out[name] = torch.from_numpy(layout.pack_awq(codes.astype(np.uint8)))
            out[f"{module}.qzeros"] = torch.from_numpy(layout.pack_awq(zeros.astype(np.uint8)))
            out[f"{module}.scales"] = tensors[f"{module}.scales"]
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            out[name] = t
    return out, {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}


@pytest.fixture(scope="module")
def scale_dtypes(tmp_path_factory):
    """The same GPTQ and AWQ checkpoints with scales stored as F16, BF16 and F32, holding the same values
    (rounded to bf16 first, which float16 and float32 hold exactly)."""
    import torch
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from quantkit.cli import app

    root = tmp_path_factory.mktemp("scales")
    src = write_checkpoint(root / "src", tiny_tensors())
    result = CliRunner().invoke(app, ["quantize", str(src), str(root / "q"), "--method", "gptq", "--group-size", "32",
                                      "--format", "v2"])
    assert result.exit_code == 0, result.stderr
    config = json.loads((root / "q" / "config.json").read_text())
    gptq = load_file(str(root / "q" / "model.safetensors"))
    awq, awq_config = _as_awq(gptq, 32)
    made = {}
    for method, tensors, qc in (("gptq", gptq, config["quantization_config"]), ("awq", awq, awq_config)):
        for dtype in (torch.float16, torch.bfloat16, torch.float32):
            scaled = {n: (t.to(torch.bfloat16).to(dtype) if n.endswith(".scales") else t) for n, t in tensors.items()}
            made[method, str(dtype).removeprefix("torch.")] = _rewrite(
                src, root / f"{method}-{dtype}", scaled, {**config, "quantization_config": qc})
    return {"src": src, **made}


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_scales_are_read_as_their_header_declares(scale_dtypes, tmp_path, cli, method, dtype):
    from safetensors import safe_open

    from tests.conftest import load_tensors

    folder = scale_dtypes[method, dtype]
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert str(f.get_slice("model.layers.0.mlp.up_proj.scales").get_dtype()) == {"bfloat16": "BF16", "float32": "F32"}[dtype]
    code, stdout, err = cli("verify", folder, "--reference", scale_dtypes["src"], "--json")
    assert code == 0, stdout + err
    for name, path in (("ours", folder), ("f16", scale_dtypes[method, "float16"])):
        code, _, err = cli("dequantize", path, tmp_path / name, "--dtype", "float32")
        assert code == 0, err
    ours, f16 = load_tensors(tmp_path / "ours"), load_tensors(tmp_path / "f16")
    assert sorted(ours) == sorted(f16)
    for name in ours:
        assert ours[name].equal(f16[name]), name
    dense = load_tensors(scale_dtypes["src"])["model.layers.0.mlp.up_proj.weight"]
    error = (ours["model.layers.0.mlp.up_proj.weight"] - dense).norm() / dense.norm()
    assert 0 < float(error) < 0.2  # 4-bit, not 1e5 from bf16 bits read as float16


def test_awq_scales_of_an_integer_dtype_are_a_finding(scale_dtypes, tmp_path, cli):
    import torch
    from safetensors.torch import load_file

    folder = scale_dtypes["awq", "float16"]
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.scales"] = tensors["model.layers.0.mlp.up_proj.scales"].view(torch.int16)
    bad = _rewrite(folder, tmp_path / "bad", tensors, json.loads((folder / "config.json").read_text()))
    code, stdout, _ = cli("verify", bad, "--json")
    assert code == 1 and "model.layers.0.mlp.up_proj.scales" in stdout
    refused(cli, "dequantize", bad, tmp_path / "out", naming="model.layers.0.mlp.up_proj.scales")


# ---------------------------------------------------------------- 5. broken checkpoints verify must fail


def _quantized(ckpt: Path, out: Path, cli, *flags: str) -> Path:
    code, _, err = cli("quantize", ckpt, out, *flags)
    assert code == 0, err
    return out


def _edit_tensors(folder: Path, change) -> None:
    """Rewrite model.safetensors with `change(tensors)` applied (numpy arrays by name)."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _edit_quant_state(folder: Path, **changes) -> None:
    def change(tensors):
        for name in [n for n in tensors if "quant_state.bitsandbytes__" in n]:
            state = {**json.loads(tensors[name].tobytes()), **changes}
            tensors[name] = np.frombuffer(json.dumps(state).encode(), np.uint8).copy()

    _edit_tensors(folder, change)


def verify_finding(cli, folder: Path, naming: str, *extra) -> None:
    code, stdout, stderr = cli("verify", folder, *extra, "--json")
    assert code == 1, stdout + stderr
    assert "Traceback" not in stderr
    failed = [c["detail"] for c in json.loads(stdout)["checks"] if not c["ok"]]
    assert any(naming in detail for detail in failed), failed


@pytest.mark.parametrize("method", ["nf4", "int8", "gptq"])
def test_quantized_tensors_without_a_quantization_config_are_a_finding(ckpt, tmp_path, cli, method):
    flags = ("--method", method, *(("--group-size", "32") if method == "gptq" else ()))
    folder = _quantized(ckpt, tmp_path / "q", cli, *flags)
    config = json.loads((folder / "config.json").read_text())
    del config["quantization_config"]
    (folder / "config.json").write_text(json.dumps(config))
    verify_finding(cli, folder, "has no quantization_config")
    verify_finding(cli, folder, "has no quantization_config", "--reference", ckpt)
    refused(cli, "dequantize", folder, tmp_path / "out", naming="not quantized")


@pytest.mark.parametrize("changes, message", [
    ({"nested_offset": None}, "nested_offset None is not a finite number"),
    ({"nested_offset": "0.1"}, "nested_offset '0.1' is not a finite number"),
    ({"nested_blocksize": 0}, "nested_blocksize 0 is not one of"),
    ({"nested_blocksize": 7}, "nested_blocksize 7 is not one of"),
    ({"nested_blocksize": 32}, "do not fit nested_blocksize 32"),
], ids=["offset-null", "offset-string", "blocksize-0", "blocksize-7", "blocksize-disagrees"])  # fmt: skip
def test_double_quant_state_damage(ckpt, tmp_path, cli, changes, message):
    folder = _quantized(ckpt, tmp_path / "q", cli, "--method", "nf4", "--double-quant")
    _edit_quant_state(folder, **changes)
    code, stdout, stderr = cli("verify", folder, "--reference", ckpt, "--json")
    assert code == 1 and "Traceback" not in stderr, stdout + stderr
    # a nested block size the tensors disagree with is verify's finding on nested_absmax's shape
    verify_finding(cli, folder, message if "fit" not in message else ".nested_absmax': F32[1], expected F32[2]")
    line = refused(cli, "dequantize", folder, tmp_path / "out", naming=message)
    assert "model.layers." in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value", [255, 1])
def test_int8_weight_format_other_than_row_major(ckpt, tmp_path, cli, value):
    folder = _quantized(ckpt, tmp_path / "q", cli, "--method", "int8")
    name = "model.layers.0.mlp.up_proj.weight_format"
    _edit_tensors(folder, lambda t: t.update({name: np.array(value, np.uint8)}))
    verify_finding(cli, folder, f"'{name}' is {value}")
    refused(cli, "dequantize", folder, tmp_path / "out", naming=f"'{name}' is {value}")


def test_nan_from_dequantizing_is_an_error_naming_the_tensor(ckpt, tmp_path, cli):
    folder = _quantized(ckpt, tmp_path / "q", cli, "--method", "nf4")
    name = "model.layers.1.mlp.down_proj.weight"
    _edit_tensors(folder, lambda t: t[name + ".absmax"].__setitem__(0, np.nan))
    verify_finding(cli, folder, name)
    refused(cli, "dequantize", folder, tmp_path / "out", naming=f"dequantizing '{name}' gives NaN")
    assert not (tmp_path / "out").exists()


def _gguf(path: Path, tensors: dict, **metadata) -> Path:
    """A one-block llama GGUF with the given tensors ({name: array, or (raw bytes array, quant type)})."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    for key, value in {"embedding_length": 32, "feed_forward_length": 32, "attention.head_count": 4,
                       "context_length": 64, **metadata}.items():  # fmt: skip
        writer.add_uint32(f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            writer.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_shapes_that_disagree_with_its_metadata(tmp_path, cli):
    tensors = {"token_embd.weight": np.ones((2, 32), np.float32), "output_norm.weight": np.ones(32, np.float32)}
    path = _gguf(tmp_path / "m.gguf", tensors, embedding_length=16)
    verify_finding(cli, path, "model.norm.weight has shape (32,), the config implies (16,)")
    refused(cli, "dequantize", path, tmp_path / "out", naming="model.norm.weight has shape (32,), the config implies (16,)")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- 13. verify crashes


@pytest.mark.parametrize("kind", ["Q8_K", "I8", "F64"])
def test_gguf_tensor_types_that_cannot_be_dequantized_are_a_finding(tmp_path, cli, kind):
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    embed = np.ones((2, 32), np.float32)
    if kind == "Q8_K":  # one block of 256 values
        norm = (np.zeros((1, GGML_QUANT_SIZES[Q.Q8_K][1]), np.uint8), Q.Q8_K)
    else:
        norm = np.ones(32, {"I8": np.int8, "F64": np.float64}[kind])
    path = _gguf(tmp_path / "m.gguf", {"token_embd.weight": embed, "output_norm.weight": norm})
    code, stdout, stderr = cli("verify", path, "--json")
    assert code == 1 and "Traceback" not in stderr, stdout + stderr


def test_dequantizing_random_k_and_iq_blocks_prints_no_warnings(tmp_path):
    """Random bytes as IQ/K blocks: the values may be NaN (a finding or an error), never a numpy warning."""
    import warnings

    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    from quantkit.methods.gguf import convert

    rng = np.random.default_rng(0)
    for qtype in (Q.Q4_K, Q.Q6_K, Q.Q2_K, Q.IQ4_XS, Q.IQ2_XXS, Q.IQ3_S):
        block, size = GGML_QUANT_SIZES[qtype]
        path = _gguf(tmp_path / f"{qtype.name}.gguf", {
            "token_embd.weight": np.ones((2, 256), np.float32),
            "output_norm.weight": (rng.integers(0, 256, (4, size), dtype=np.uint8), qtype),
        }, embedding_length=256, feed_forward_length=256)  # fmt: skip
        conv = convert.from_gguf(path)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            conv.whole("model.norm.weight")


# ---------------------------------------------------------------- 6. max_shard_size in a recipe


def _shards(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob("*.safetensors"))


@pytest.mark.parametrize("value", ['"20KB"', "20000"], ids=["size-string", "integer"])
def test_recipe_max_shard_size_is_honoured_and_the_flag_wins(ckpt, tmp_path, cli, value):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'method = "nf4"\nmax_shard_size = {value}\n')
    code, _, err = cli("quantize", ckpt, tmp_path / "recipe", "--recipe", recipe)
    assert code == 0, err
    assert len(_shards(tmp_path / "recipe")) == 2  # 26 kB of output in shards of at most 20 kB
    code, _, err = cli("quantize", ckpt, tmp_path / "flag", "--recipe", recipe, "--max-shard-size", "5GB")
    assert code == 0, err
    assert _shards(tmp_path / "flag") == ["model.safetensors"]
    code, _, err = cli("quantize", ckpt, tmp_path / "plain", "--method", "nf4")
    assert code == 0, err
    assert _shards(tmp_path / "plain") == ["model.safetensors"]


@pytest.mark.parametrize("value, message", [
    ('"lots"', "max_shard_size = 'lots': not a size"), ("0", "max_shard_size = 0: must be positive"),
    ("true", "expected a whole number"),
], ids=["not-a-size", "zero", "bool"])  # fmt: skip
def test_recipe_max_shard_size_of_the_wrong_kind_is_refused(ckpt, tmp_path, cli, value, message):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'method = "nf4"\nmax_shard_size = {value}\n')
    line = refused(cli, "quantize", ckpt, tmp_path / "q", "--recipe", recipe, naming=message)
    assert str(recipe) in line


# ---------------------------------------------------------------- 13. config values that crashed verify


def _with_quantization_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"].update(changes)
    (folder / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("method, changes, message", [
    ("gptq", {"group_size": 0}, "group_size 0 is neither -1 nor positive"),
    ("gptq", {"bits": 3}, "3-bit GPTQ is not supported"),
    ("gptq", {"bits": "4"}, "needs integer bits and group_size, not '4'"),
    ("nf4", {"llm_int8_skip_modules": [5]}, "llm_int8_skip_modules [5] is not a list of module names"),
    ("int8", {"llm_int8_skip_modules": "lm_head"}, "is not a list of module names"),
], ids=["group-size-0", "bits-3", "bits-string", "skip-int", "skip-string"])  # fmt: skip
def test_quantization_config_values_are_findings_not_crashes(ckpt, tmp_path, cli, method, changes, message):
    folder = _quantized(ckpt, tmp_path / "q", cli, "--method", method, *(("--group-size", "32") if method == "gptq" else ()))
    _with_quantization_config(folder, **changes)
    verify_finding(cli, folder, message)
    verify_finding(cli, folder, message, "--reference", ckpt)


@pytest.mark.parametrize("method", ["nf4", "gptq"])
def test_quantkit_threads_out_of_range_is_one_clear_error(ckpt, tmp_path, cli, monkeypatch, method):
    monkeypatch.setenv("QUANTKIT_THREADS", "99999999999")
    flags = ("--group-size", "32", "--backend", "numba") if method == "gptq" else ("--backend", "c")
    refused(cli, "quantize", ckpt, tmp_path / "q", "--method", method, *flags, naming="QUANTKIT_THREADS='99999999999'")
    assert not (tmp_path / "q").exists()


def test_gptq_kernels_run_on_quantkit_threads(ckpt, tmp_path, cli, monkeypatch):
    import numba

    from quantkit import jit

    outputs = []
    for count in ("1", "2"):
        monkeypatch.setenv("QUANTKIT_THREADS", count)
        jit.use_threads()
        assert numba.get_num_threads() == min(int(count), numba.config.NUMBA_NUM_THREADS)
        code, _, err = cli("quantize", ckpt, tmp_path / count, "--method", "gptq", "--group-size", "32", "--backend", "numba")
        assert code == 0, err
        outputs.append((tmp_path / count / "model.safetensors").read_bytes())
    assert outputs[0] == outputs[1]  # the thread count never changes the bytes


# ---------------------------------------------------------------- 14. messages


def test_architectures_given_as_a_string_is_one_name(ckpt, tmp_path, cli):
    from tests.hostile_files import CONFIG

    (ckpt / "config.json").write_text(json.dumps({**CONFIG, "architectures": "Llama"}))
    line = refused(cli, "convert", ckpt, tmp_path / "m.gguf", "--to", "gguf", naming="architecture Llama is not supported")
    assert "L, l" not in line
    code, stdout, _ = cli("inspect", ckpt, "--json")
    assert code == 0 and json.loads(stdout)["architecture"] == "Llama"


def _torch_checkpoint(folder: Path, tensors: dict) -> Path:
    import torch

    from tests.hostile_files import CONFIG

    folder.mkdir()
    torch.save(tensors, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(CONFIG))
    return folder


@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "uint16"])
def test_bin_tensor_of_an_unsupported_dtype_is_named_as_such(tmp_path, cli, dtype):
    import torch

    src = _torch_checkpoint(tmp_path / "src", {"model.w.weight": torch.zeros(2, 4, dtype=getattr(torch, dtype))})
    line = refused(cli, "convert", src, tmp_path / "out", "--to", "safetensors", naming=f"dtype {dtype} is not supported")
    assert "run any code" not in line
    refused(cli, "inspect", src, naming=f"dtype {dtype} is not supported")


def test_bin_broadcast_tensor_with_stride_0_converts(tmp_path, cli):
    import torch

    row = torch.arange(4, dtype=torch.float32)
    src = _torch_checkpoint(tmp_path / "src", {"model.w.weight": row.expand(3, 4), "model.b": torch.ones(2)})
    code, _, err = cli("convert", src, tmp_path / "out", "--to", "safetensors")
    assert code == 0, err
    from safetensors.numpy import load_file

    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert np.array_equal(out["model.w.weight"], np.tile(np.arange(4, dtype=np.float32), (3, 1)))
