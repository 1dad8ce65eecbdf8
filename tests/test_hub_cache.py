"""Checkpoints in the Hugging Face cache, laid out as huggingface_hub writes it: `models--org--name/` with
`blobs/` (files named by their sha256 or git etag), `refs/main` (the revision) and `snapshots/<rev>/`, whose
every file is a relative symlink into `../../blobs/`. Sharded checkpoints are the common case. Every command
runs on them by repo id (offline, the cache found through HF_HUB_CACHE or HF_HOME) and by snapshot path, in
a subprocess (huggingface_hub reads its environment at import), and gives what the same files give from a
plain folder."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import load_tensors
from tests.hostile_files import tiny_tensors, tree_digest, write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
REVISION = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".safetensors", ".gguf", ".bin")


def add_to_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """`folder`'s files as huggingface_hub stores a download of `repo_id` in `cache`; returns the snapshot."""
    from huggingface_hub.file_download import _create_symlink, repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    snapshot = repo / "snapshots" / REVISION
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        if file.suffix in LFS_SUFFIXES:  # LFS files: the etag is the sha256; others: the git blob sha1
            etag = hashlib.sha256(data).hexdigest()
        else:
            etag = hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
        blob = repo / "blobs" / etag
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(link), new_blob=True)  # huggingface_hub's own (relative) link
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """A cache holding a two-shard dense model (org/tiny) and its two-shard nf4 quantization (org/tiny-nf4),
    plus the plain folders they came from."""
    root = tmp_path_factory.mktemp("hub")
    plain = write_checkpoint(root / "plain", tiny_tensors(), shards=2)
    (plain / "generation_config.json").write_text('{"do_sample": false}')
    plain_q = root / "plain-nf4"
    code, _, err = quantkit(root, {}, "quantize", plain, plain_q, "--method", "nf4", "--max-shard-size", "20KB")
    assert code == 0, err
    assert (plain_q / "model.safetensors.index.json").is_file()
    code, _, err = quantkit(root, {}, "dequantize", plain_q, root / "plain-d")
    assert code == 0, err
    cache = root / "home" / "hub"
    snapshots = {"dense": add_to_cache(cache, "org/tiny", plain), "nf4": add_to_cache(cache, "org/tiny-nf4", plain_q)}
    return {"root": root, "cache": cache, "plain": plain, "plain_q": plain_q, "plain_d": root / "plain-d", **snapshots}


def quantkit(cwd: Path, env: dict, *args) -> tuple[int, str, str]:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", **env}
    done = subprocess.run([sys.executable, "-m", "quantkit", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


def test_the_fixture_is_a_cache_huggingface_hub_recognises(hub):
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(hub["cache"])
    assert not info.warnings
    repos = {r.repo_id: r for r in info.repos}
    assert sorted(repos) == ["org/tiny", "org/tiny-nf4"]
    revision = next(iter(repos["org/tiny"].revisions))
    assert revision.commit_hash == REVISION and revision.refs == frozenset({"main"})
    shard = hub["dense"] / "model-00001-of-00002.safetensors"
    assert shard.is_symlink() and os.readlink(shard).startswith("../../blobs/")


# Each way of naming the cached checkpoints: (environment, dense source, quantized source).
WAYS = {
    "repo-id": (lambda h: {"HF_HUB_CACHE": str(h["cache"])}, "org/tiny", "org/tiny-nf4"),
    "snapshot-path": (lambda h: {}, None, None),
}


def sources(hub, way: str) -> tuple[dict, str, str]:
    env_of, dense, quantized = WAYS[way]
    return env_of(hub), dense or str(hub["dense"]), quantized or str(hub["nf4"])


def test_repo_id_found_through_hf_home(hub, tmp_path):
    env = {"HF_HOME": str(hub["cache"].parent)}
    code, stdout, err = quantkit(tmp_path, env, "inspect", "org/tiny", "--json")
    assert code == 0, err
    assert len(json.loads(stdout)["shards"]) == 2
    code, stdout, err = quantkit(tmp_path, env, "verify", "org/tiny-nf4", "--json")
    assert code == 0, stdout + err


@pytest.mark.parametrize("way", WAYS)
def test_inspect(hub, way):
    env, dense, quantized = sources(hub, way)
    code, stdout, err = quantkit(hub["root"], env, "inspect", dense, "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert len(data["tensors"]) == len(tiny_tensors()) and len(data["shards"]) == 2
    code, stdout, err = quantkit(hub["root"], env, "inspect", quantized, "--json")
    assert code == 0, err
    data = json.loads(stdout)
    assert data["quant_method"] == "bitsandbytes" and len(data["shards"]) == 2


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("flags", [(), ("--no-sync",)], ids=["durable", "no-sync"])
def test_quantize_gives_what_the_plain_folder_gives(hub, way, tmp_path, flags):
    """--no-sync copies kept tensors from the snapshot's links (copy_file_range) in its last shard."""
    env, dense, _ = sources(hub, way)
    before = tree_digest(hub["cache"])
    code, _, err = quantkit(tmp_path, env, "quantize", dense, tmp_path / "q", "--method", "nf4", "--max-shard-size", "20KB", *flags)
    assert code == 0, err
    _same_bytes(tmp_path / "q", hub["plain_q"])
    assert tree_digest(hub["cache"]) == before


def _same_bytes(a: Path, b: Path) -> None:
    """Every file equal, but the model card, which names the hub repo as base_model when it knows it."""
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for name in files:
        if name != "README.md":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("flags", [(), ("--no-sync",)], ids=["durable", "no-sync"])
def test_dequantize_gives_what_the_plain_folder_gives(hub, way, tmp_path, flags):
    env, _, quantized = sources(hub, way)
    code, _, err = quantkit(tmp_path, env, "dequantize", quantized, tmp_path / "d", *flags)
    assert code == 0, err
    _same_bytes(tmp_path / "d", hub["plain_d"])
    assert (tmp_path / "d" / "generation_config.json").read_text() == '{"do_sample": false}'


@pytest.mark.parametrize("way", WAYS)
def test_convert_to_gguf_gives_what_the_plain_folder_gives(hub, way, tmp_path):
    env, dense, _ = sources(hub, way)
    code, _, err = quantkit(tmp_path, env, "convert", dense, tmp_path / "m.gguf", "--to", "gguf")
    assert code == 0, err
    code, _, err = quantkit(tmp_path, env, "convert", hub["plain"], tmp_path / "plain.gguf", "--to", "gguf")
    assert code == 0, err
    from gguf import GGUFReader

    ours, plain = GGUFReader(tmp_path / "m.gguf"), GGUFReader(tmp_path / "plain.gguf")
    assert ours.get_field("general.name").contents() == "tiny"  # the repo's name, not the revision's hash
    assert plain.get_field("general.name").contents() == "plain"
    assert [(t.name, t.data.tobytes()) for t in ours.tensors] == [(t.name, t.data.tobytes()) for t in plain.tensors]
    assert {f for f in ours.fields if f != "general.name"} == {f for f in plain.fields if f != "general.name"}


@pytest.mark.parametrize("way", WAYS)
def test_verify_with_reference(hub, way, tmp_path):
    env, dense, quantized = sources(hub, way)
    code, stdout, err = quantkit(tmp_path, env, "verify", quantized, "--reference", dense, "--json")
    assert code == 0, stdout + err
    report = json.loads(stdout)
    assert report["ok"] and len(report["layers"]) == 4
    code, stdout, err = quantkit(tmp_path, env, "verify", dense, "--json")
    assert code == 0, stdout + err


def test_dequantized_values_from_the_cache(hub, tmp_path):
    """Not just equal to the plain run: close to the dense model the quantization came from."""
    code, _, err = quantkit(tmp_path, {"HF_HUB_CACHE": str(hub["cache"])}, "dequantize", "org/tiny-nf4", tmp_path / "d",
                            "--dtype", "float32")
    assert code == 0, err
    ours, dense = load_tensors(tmp_path / "d"), load_tensors(hub["plain"])
    assert sorted(ours) == sorted(dense)
    weight = "model.layers.0.mlp.up_proj.weight"
    error = (ours[weight] - dense[weight]).norm() / dense[weight].norm()
    assert 0 < float(error) < 0.15
