"""Damaged and hostile input, one small test per case: every subcommand fails with one line naming the
file or tensor (exit 2; verify turns damage into a finding, exit 1), nothing large is allocated and no
code from a pickle ever runs."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import time
import tracemalloc

import numpy as np
import pytest

from quantkit.errors import QuantkitError
from quantkit.io.safetensors import read_header
from quantkit.io.source import open_checkpoint
from tests.hostile_files import CONFIG, one_error_line, raw_shard, refused, tiny_tensors, write_checkpoint


@pytest.fixture
def sharded(tmp_path):
    return write_checkpoint(tmp_path / "sharded", tiny_tensors(), shards=2)


# ---------------------------------------------------------------- safetensors headers


def test_forged_header_length_fails_at_once(tmp_path, cli):
    shard = raw_shard(tmp_path / "model.safetensors", b"{}", length=2**50)
    tracemalloc.start()
    started = time.perf_counter()
    with pytest.raises(QuantkitError, match="header length 1125899906842624 exceeds the file size"):
        read_header(shard)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert time.perf_counter() - started < 0.5 and peak < 1 << 20
    (tmp_path / "config.json").write_text(json.dumps(CONFIG))
    refused(cli, "inspect", tmp_path, naming=str(shard))


@pytest.mark.parametrize("header, data, message", [
    (b"{not json", b"", "header is not valid JSON"),
    ([1, 2], b"", "header is not a JSON object"),
    ({"w": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unknown dtype 'F33'"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "shape [-1] is not a list"),
    ({"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}, b"\0" * 12, "12 bytes of data but dtype F32"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, b"\0" * 4, "data_offsets [4, 0] are invalid"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
     b"\0" * 8, "overlaps another tensor"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "leaves a gap"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 9, "5 bytes after the last tensor"),
    ({"__metadata__": {"x": 1}}, b"", "__metadata__ must map strings to strings"),
    (b"[" * 100_000 + b"]" * 100_000, b"", "header is not valid JSON"),
], ids=["not-json", "not-object", "dtype", "shape", "size-mismatch", "offsets-reversed", "overlap", "gap", "trailing",
        "metadata", "nested-too-deep"])  # fmt: skip
def test_inconsistent_header_is_refused(tmp_path, cli, header, data, message):
    shard = raw_shard(tmp_path / "model.safetensors", header if isinstance(header, (dict, bytes)) else json.dumps(header).encode(), data)
    with pytest.raises(QuantkitError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
        read_header(shard)
    assert str(shard) in e.value.message


@pytest.fixture
def truncated(tmp_path, cli):
    """A quantized and a dense checkpoint, each with its shard cut short by 100 bytes."""
    dense = write_checkpoint(tmp_path / "dense", tiny_tensors())
    code, _, err = cli("quantize", dense, tmp_path / "nf4", "--method", "nf4")
    assert code == 0, err
    for folder in (dense, tmp_path / "nf4"):
        shard = folder / "model.safetensors"
        shard.write_bytes(shard.read_bytes()[:-100])
    return {"dense": dense, "nf4": tmp_path / "nf4"}


@pytest.mark.parametrize("command", [
    ("inspect", "dense"), ("quantize", "dense", "--method", "int8"), ("dequantize", "nf4"),
    ("convert", "dense", "--to", "gguf"),
], ids=["inspect", "quantize", "dequantize", "convert"])  # fmt: skip
def test_truncated_shard_fails_in_one_line_naming_it(truncated, tmp_path, cli, command):
    verb, which, *flags = command
    out = [tmp_path / "out.gguf" if verb == "convert" else tmp_path / "out"] if verb != "inspect" else []
    line = refused(cli, verb, truncated[which], *out, *flags, naming=str(truncated[which] / "model.safetensors"))
    assert "truncated" in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.gguf").exists()


def test_verify_reports_a_truncated_shard_as_a_finding(truncated, cli):
    code, stdout, stderr = cli("verify", truncated["nf4"], "--json")
    report = json.loads(stdout)
    assert code == 1 and "Traceback" not in stderr
    structure = next(c for c in report["checks"] if c["name"] == "structure")
    assert not structure["ok"] and "truncated" in structure["detail"]


# ---------------------------------------------------------------- index.json


def _rewrite_index(folder, change) -> None:
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    change(index["weight_map"])
    index_file.write_text(json.dumps(index))


@pytest.mark.parametrize("shard_path", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"],
                         ids=["dotdot", "absolute", "nested-dotdot"])
def test_index_path_leaving_the_folder_is_refused(sharded, cli, shard_path):
    _rewrite_index(sharded, lambda m: m.update({"model.embed_tokens.weight": shard_path}))
    line = refused(cli, "inspect", sharded, naming="model.safetensors.index.json")
    assert "leaves the checkpoint folder" in line


def test_index_may_name_a_symlink_inside_the_folder(sharded, tmp_path, cli):
    """What the index names must lie inside the folder; the file there may be a link to anywhere (the
    Hugging Face cache links every snapshot file into ../../blobs/): the folder's owner put it there."""
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(sharded / "model-00001-of-00002.safetensors", outside)
    (sharded / "model-00001-of-00002.safetensors").symlink_to(outside)
    code, stdout, err = cli("inspect", sharded, "--json")
    assert code == 0, err
    assert json.loads(stdout)["shards"] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    code, stdout, err = cli("verify", sharded)
    assert code == 0, stdout + err


@pytest.mark.parametrize("shard_path, message", [
    ("a\0b", "is not a file name"), ("loop.safetensors", "is a symlink loop"), ("x" * 5000, "File name too long"),
], ids=["nul", "symlink-loop", "too-long"])  # fmt: skip
def test_index_path_that_cannot_be_a_shard_is_refused(sharded, cli, shard_path, message):
    (sharded / "loop.safetensors").symlink_to(sharded / "loop2.safetensors")
    (sharded / "loop2.safetensors").symlink_to(sharded / "loop.safetensors")
    _rewrite_index(sharded, lambda m: m.update({"model.embed_tokens.weight": shard_path}))
    line = refused(cli, "inspect", sharded, naming="model.safetensors.index.json: tensor 'model.embed_tokens.weight'")
    assert message in line


def test_index_tensor_missing_from_its_shard(sharded, cli):
    _rewrite_index(sharded, lambda m: m.update({"model.layers.9.mlp.up_proj.weight": "model-00001-of-00002.safetensors"}))
    refused(cli, "inspect", sharded, naming="tensor 'model.layers.9.mlp.up_proj.weight' is not in model-00001-of-00002")


def test_index_missing_shard(sharded, cli):
    (sharded / "model-00002-of-00002.safetensors").unlink()
    refused(cli, "inspect", sharded, naming="points at missing shard 'model-00002-of-00002.safetensors'")


def test_index_duplicate_entry_is_refused(sharded, cli):
    index_file = sharded / "model.safetensors.index.json"
    text = index_file.read_text().replace('"weight_map": {', '"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors", ')
    index_file.write_text(text)
    refused(cli, "inspect", sharded, naming="duplicate key 'lm_head.weight'")


def test_index_nested_too_deep_is_refused(sharded, cli):
    (sharded / "model.safetensors.index.json").write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(cli, "inspect", sharded, naming="model.safetensors.index.json: not valid JSON")


def test_index_not_listing_a_shard_tensor_is_refused(sharded, cli):
    _rewrite_index(sharded, lambda m: m.pop("lm_head.weight"))
    refused(cli, "quantize", sharded, sharded.parent / "out", "--method", "nf4", naming="'lm_head.weight'")


def test_same_tensor_in_two_shards_is_refused(tmp_path, cli):
    from safetensors.numpy import save_file

    folder = write_checkpoint(tmp_path / "dup", tiny_tensors())
    save_file({"lm_head.weight": np.zeros((2, 2), np.float32)}, str(folder / "extra.safetensors"))
    (folder / "model.safetensors").rename(folder / "base.safetensors")
    refused(cli, "inspect", folder, naming="tensor 'lm_head.weight' also appears in")


# ---------------------------------------------------------------- config.json


@pytest.mark.parametrize("text, message", [
    (None, "config.json: missing"),
    ("{oops", "config.json: not valid JSON"),
    ("[1, 2]", "config.json: must hold a JSON object"),
    ('{"quantization_config": 3}', "config.json: quantization_config must be an object"),
    ("[" * 100_000 + "]" * 100_000, "config.json: not valid JSON"),
], ids=["missing", "malformed", "not-object", "bad-quantization-config", "nested-too-deep"])  # fmt: skip
def test_bad_config_is_named(ckpt, tmp_path, cli, text, message):
    config = ckpt / "config.json"
    config.unlink() if text is None else config.write_text(text)
    for command in (("inspect", ckpt), ("quantize", ckpt, tmp_path / "o", "--method", "nf4"), ("dequantize", ckpt, tmp_path / "o")):
        refused(cli, *command, naming=message)


def test_config_missing_what_gguf_needs_is_named(ckpt, tmp_path, cli):
    (ckpt / "config.json").write_text(json.dumps({k: v for k, v in CONFIG.items() if k != "num_attention_heads"}))
    line = refused(cli, "convert", ckpt, tmp_path / "m.gguf", "--to", "gguf", naming="config.json")
    assert "num_attention_heads" in line


def test_side_json_nested_too_deep_is_named(ckpt, tmp_path, cli):
    (ckpt / "tokenizer.json").write_text('{"model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    refused(cli, "convert", ckpt, tmp_path / "m.gguf", "--to", "gguf", naming="tokenizer.json: cannot read as JSON")


# ---------------------------------------------------------------- non-finite weights


@pytest.mark.parametrize("method", ["nf4", "int8", "gptq"])
@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
def test_quantize_refuses_non_finite_weights_naming_the_tensor(tmp_path, cli, method, bad):
    tensors = tiny_tensors()
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = bad
    folder = write_checkpoint(tmp_path / "src", tensors)
    flags = ("--group-size", "32") if method == "gptq" else ()
    line = refused(cli, "quantize", folder, tmp_path / "out", "--method", method, *flags, naming="model.layers.1.mlp.down_proj")
    assert "NaN" in line or "infinite" in line
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.*"))


# ---------------------------------------------------------------- legacy PyTorch pickles


class RunsCode:
    """A pickle payload that, if ever unpickled normally, creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _torch_folder(folder, state, config=CONFIG, name="pytorch_model.bin", **save_kwargs):
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    torch.save(state, folder / name, **save_kwargs)
    return folder


@pytest.fixture
def torch_state():
    import torch

    return {n: torch.from_numpy(a) for n, a in tiny_tensors().items()} | {"scale": torch.tensor([1.5], dtype=torch.bfloat16)}


def test_inspect_describes_a_pickle_checkpoint_without_loading_it(tmp_path, cli, torch_state, monkeypatch):
    import torch

    folder = _torch_folder(tmp_path / "bin", torch_state)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("inspect must not unpickle"))
    code, stdout, err = cli("inspect", folder, "--json")
    assert code == 0, err
    info = json.loads(stdout)
    assert info["format"] == "pytorch (pickle)" and "convert" in info["note"]
    assert {t["name"]: (t["dtype"], t["shape"]) for t in info["tensors"]} == {
        n: ("BF16" if n == "scale" else "F32", list(t.shape)) for n, t in torch_state.items()}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_convert_bin_to_safetensors(tmp_path, cli, torch_state, legacy):
    from safetensors.torch import load_file

    folder = _torch_folder(tmp_path / "bin", torch_state, _use_new_zipfile_serialization=not legacy)
    (folder / "tokenizer.json").write_text("{}")
    code, _, err = cli("convert", folder, tmp_path / "st", "--to", "safetensors")
    assert code == 0, err
    ours = load_file(tmp_path / "st" / "model.safetensors")
    assert sorted(ours) == sorted(torch_state)
    assert all(ours[n].dtype == t.dtype and (ours[n] == t).all() for n, t in torch_state.items())
    assert (tmp_path / "st" / "tokenizer.json").exists() and json.loads((tmp_path / "st" / "config.json").read_text()) == CONFIG
    code, _, err = cli("quantize", tmp_path / "st", tmp_path / "q", "--method", "nf4")
    assert code == 0, err


def test_convert_a_transformers_state_dict_gives_what_transformers_saves(models, tmp_path, cli):
    """A real model's state_dict() (an OrderedDict carrying _metadata) through torch.save, as transformers 4
    wrote pytorch_model.bin; converted, it holds the tensors transformers itself writes as safetensors."""
    import torch

    from tests.conftest import assert_same_tensors, auto_class, load_tensors

    model = auto_class(models["llama"]).from_pretrained(models["llama"], dtype=torch.bfloat16)
    folder = tmp_path / "bin"
    folder.mkdir()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    shutil.copy(models["llama"] / "config.json", folder)
    code, _, err = cli("convert", folder, tmp_path / "st", "--to", "safetensors")
    assert code == 0, err
    assert_same_tensors(load_tensors(tmp_path / "st"), load_tensors(models["llama"]))


def test_convert_sharded_bin_with_index(tmp_path, cli, torch_state):
    import torch
    from safetensors.torch import load_file

    folder = tmp_path / "bin"
    names = list(torch_state)
    halves = {"pytorch_model-00001-of-00002.bin": names[:3], "pytorch_model-00002-of-00002.bin": names[3:]}
    _torch_folder(folder, {n: torch_state[n] for n in halves["pytorch_model-00001-of-00002.bin"]},
                  name="pytorch_model-00001-of-00002.bin")
    torch.save({n: torch_state[n] for n in names[3:]}, folder / "pytorch_model-00002-of-00002.bin")
    weight_map = {n: shard for shard, ns in halves.items() for n in ns}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    code, _, err = cli("convert", folder, tmp_path / "st", "--to", "safetensors", "--dtype", "bfloat16", "--max-shard-size", "20KB")
    assert code == 0, err
    ours = {}
    for shard in (tmp_path / "st").glob("*.safetensors"):
        ours |= load_file(shard)
    assert sorted(ours) == sorted(names) and all(t.dtype == torch.bfloat16 for t in ours.values())
    assert torch.equal(ours["lm_head.weight"], torch_state["lm_head.weight"].bfloat16())
    weight_map["lm_head.weight"] = "../x.bin"
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    refused(cli, "convert", folder, tmp_path / "st2", "--to", "safetensors", naming="leaves the checkpoint folder")


@pytest.mark.parametrize("how", ["torch-save", "bare-pickle", "protocol-0"])
def test_pickle_that_runs_code_is_refused_and_never_run(tmp_path, cli, torch_state, how):
    import torch

    marker = tmp_path / "PWNED"
    folder = tmp_path / "evil"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CONFIG))
    payload = {"lm_head.weight": torch_state["lm_head.weight"], "x": RunsCode(marker)}
    if how == "torch-save":
        torch.save(payload, folder / "pytorch_model.bin")
    else:
        (folder / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCode(marker), protocol=0 if how == "protocol-0" else 4))
    for command in (("inspect", folder), ("convert", folder, tmp_path / "out", "--to", "safetensors")):
        code, _, stderr = cli(*command)
        assert code == 2, stderr
        line = one_error_line(stderr)
        assert str(folder / "pytorch_model.bin") in line
        assert ("refused" in line and "system" in line) if how == "torch-save" else "not" in line or "refused" in line
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_tensor_reaching_past_its_storage_is_refused(tmp_path):
    import torch

    from quantkit.io.torchpickle import read_state_dict_meta

    path = tmp_path / "w.bin"
    torch.save({"w": torch.zeros(4, 4)}, path)
    # Rewrite the pickled size (4, 4) as (4, 40): the storage holds 16 elements.
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    pkl = next(n for n in members if n.endswith("data.pkl"))
    members[pkl] = members[pkl].replace(b"K\x04K\x04\x86", b"K\x04K(\x86", 1)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, data in members.items():
            z.writestr(name, data)
    with pytest.raises(QuantkitError, match="reaching past its storage"):
        read_state_dict_meta(path)


# ---------------------------------------------------------------- GGUF reader, from the CLI


@pytest.mark.parametrize("counts", [(2**60, 0), (0, 2**60)], ids=["tensor-count", "metadata-count"])
def test_gguf_with_impossible_counts_fails_in_one_line(tmp_path, cli, counts):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, *counts) + b"\0" * 64)
    refused(cli, "inspect", path, naming=str(path))
    refused(cli, "dequantize", path, tmp_path / "out", naming=str(path))
    code, _, stderr = cli("verify", path)
    assert code == 1 and "Traceback" not in stderr


def _gguf_with(path, **metadata):
    """A small llama GGUF the reader accepts, with metadata set by hand (GGUFWriter's add_* by value type)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    for key, value in {"embedding_length": 32, "feed_forward_length": 32, "attention.head_count": 4,
                       "context_length": 64, **metadata}.items():  # fmt: skip
        add = {list: writer.add_array, float: writer.add_float32, str: writer.add_string}.get(type(value), writer.add_uint32)
        add(key if key.startswith(("general.", "tokenizer.")) else f"llama.{key}", value)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_tensor("token_embd.weight", np.zeros((2, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("metadata, message", [
    ({"attention.head_count": 0}, "llama.attention.head_count = 0 is not a positive number"),
    ({"embedding_length": 1.5}, "llama.embedding_length = 1.5 is not a positive number"),
    ({"block_count": 2**31}, "exceeds the tensor count"),
    ({"general.architecture": [1, 2]}, "architecture [1, 2] is not supported"),
], ids=["zero-heads", "float-size", "huge-block-count", "architecture-not-a-string"])  # fmt: skip
def test_gguf_metadata_that_makes_no_model_is_refused(tmp_path, cli, metadata, message):
    path = _gguf_with(tmp_path / "m.gguf", **metadata)
    refused(cli, "dequantize", path, tmp_path / "out", naming=message)
    assert not (tmp_path / "out").exists()


def test_gguf_inspect_shows_an_odd_file_type_as_is(tmp_path, cli):
    code, stdout, err = cli("inspect", _gguf_with(tmp_path / "m.gguf", **{"general.file_type": [7]}), "--json")
    assert code == 0, err
    assert json.loads(stdout)["quantization"]["file_type"] == [7]


def test_open_checkpoint_reads_no_data(ckpt, monkeypatch):
    from quantkit.io import safetensors

    monkeypatch.setattr(safetensors.ShardReader, "read_rows", lambda *a: pytest.fail("data read while opening"))
    assert len(open_checkpoint(ckpt).tensors) == 6
