"""imatrix readers: both formats written by hand as llama-imatrix writes them (save_imatrix /
save_imatrix_legacy), hostile variants refused cleanly, and `inspect` on them. Files written by
llama-imatrix itself are read in tests/clients/test_llama_quantize.py."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest

from quantkit.errors import QuantkitError
from quantkit.methods.gguf.imatrix import read_imatrix, weights_for


def write_gguf_imatrix(path: Path, entries: dict[str, tuple[np.ndarray, np.ndarray]], *, datasets=("wiki.txt",),
                       chunk_count=10, chunk_size=512, meta=True) -> Path:
    """entries: name -> (sums [n_mat, ne0], counts [n_mat]) as float32, like save_imatrix."""
    import gguf
    w = gguf.GGUFWriter(str(path), "imatrix")
    # GGUFWriter always adds general.architecture; llama-imatrix does not, but readers ignore it
    w.add_string("general.type", "imatrix")
    if meta:
        w.add_array("imatrix.datasets", list(datasets))
        w.add_uint32("imatrix.chunk_count", chunk_count)
        w.add_uint32("imatrix.chunk_size", chunk_size)
    for name in sorted(entries):
        sums, counts = entries[name]
        w.add_tensor(name + ".in_sum2", np.asarray(sums, np.float32).reshape(len(counts), -1))
        w.add_tensor(name + ".counts", np.asarray(counts, np.float32).reshape(len(counts), 1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def write_legacy_imatrix(path: Path, entries: dict[str, tuple[int, np.ndarray]], chunk_count=7, dataset=b"d.txt"):
    b = struct.pack("<i", len(entries))
    for name, (ncall, vals) in entries.items():
        nb = name.encode()
        b += struct.pack("<i", len(nb)) + nb + struct.pack("<ii", ncall, len(vals)) + np.asarray(vals, "<f4").tobytes()
    if chunk_count is not None:
        b += struct.pack("<i", chunk_count) + struct.pack("<i", len(dataset)) + dataset
    path.write_bytes(b)
    return path


def test_gguf_per_expert_normalisation(tmp_path):
    sums = np.arange(12, dtype=np.float32).reshape(3, 4) + 1
    counts = np.array([4, 0, 2.5], np.float32)          # 2.5 -> lround 3; 0 -> weights 1
    p = write_gguf_imatrix(tmp_path / "a.gguf", {"blk.0.ffn_down_exps.weight": (sums, counts),
                                                 "blk.0.attn_q.weight": (np.full((1, 4), 6, np.float32), np.array([3.0]))})
    im = read_imatrix(p)
    w = im.weights["blk.0.ffn_down_exps.weight"]
    assert w.dtype == np.float32
    np.testing.assert_array_equal(w, np.concatenate([sums[0] / np.float32(4), np.ones(4, np.float32),
                                                     sums[2] / np.float32(3)]))
    np.testing.assert_array_equal(im.weights["blk.0.attn_q.weight"], np.full(4, 2, np.float32))
    d = im.describe()
    assert d["format"] == "imatrix, GGUF" and d["entries"] == 2 and d["chunk_count"] == 10 and d["chunk_size"] == 512
    assert d["datasets"] == ["wiki.txt"]
    assert {t["name"]: t["shape"] for t in d["tensors"]}["blk.0.ffn_down_exps.weight"] == [3, 4]
    assert weights_for(im, "blk.0.ffn_down_exps.weight", 4, 3).shape == (3, 4)
    with pytest.raises(QuantkitError, match="different from tensor size"):
        weights_for(im, "blk.0.attn_q.weight", 8)
    assert weights_for(im, "nope", 4) is None


def test_gguf_without_metadata_is_refused(tmp_path):
    p = write_gguf_imatrix(tmp_path / "a.gguf", {"x.weight": (np.ones((1, 4)), np.array([1.0]))}, meta=False)
    with pytest.raises(QuantkitError, match="missing imatrix metadata"):
        read_imatrix(p)


def test_gguf_unpaired_and_nonfinite(tmp_path):
    import gguf
    p = tmp_path / "b.gguf"
    w = gguf.GGUFWriter(str(p), "imatrix")
    w.add_array("imatrix.datasets", ["x"])
    w.add_uint32("imatrix.chunk_count", 1)
    w.add_uint32("imatrix.chunk_size", 1)
    w.add_tensor("a.weight.in_sum2", np.ones((1, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(QuantkitError, match="mismatched sums and counts"):
        read_imatrix(p)
    p2 = write_gguf_imatrix(tmp_path / "c.gguf", {"a.weight": (np.array([[np.inf, 1, 1, 1]]), np.array([1.0]))})
    with pytest.raises(QuantkitError, match="non-finite"):
        read_imatrix(p2)


def test_legacy(tmp_path):
    vals = np.array([3, 6, 9, 12], np.float32)
    p = write_legacy_imatrix(tmp_path / "i.dat", {"blk.0.attn_k.weight": (3, vals), "blk.1.x.weight": (0, vals)})
    im = read_imatrix(p)
    np.testing.assert_array_equal(im.weights["blk.0.attn_k.weight"], vals / np.float32(3))
    np.testing.assert_array_equal(im.weights["blk.1.x.weight"], vals)
    assert im.format == "legacy" and im.chunk_count == 7 and im.datasets == ["d.txt"]
    # the trailer is optional
    p2 = write_legacy_imatrix(tmp_path / "j.dat", {"a": (1, vals)}, chunk_count=None)
    assert read_imatrix(p2).chunk_count == 0


def _mutations(data: bytes):
    yield data[:3]
    for cut in range(4, len(data), max(1, len(data) // 40)):
        yield data[:cut]
    for pos in range(0, min(len(data), 200), 4):
        for val in (0xFFFFFFFF, 0x7FFFFFFF, 0x80000000, 0):
            yield data[:pos] + struct.pack("<I", val) + data[pos + 4:]


@pytest.mark.parametrize("kind", ["gguf", "legacy"])
def test_hostile_files_give_clean_errors(tmp_path, kind):
    vals = np.ones((2, 8), np.float32)
    if kind == "gguf":
        src = write_gguf_imatrix(tmp_path / "s.gguf", {"blk.0.ffn_up_exps.weight": (vals, np.array([1, 2.0]))})
    else:
        src = write_legacy_imatrix(tmp_path / "s.dat", {"blk.0.ffn_up.weight": (2, vals.reshape(-1))})
    data = src.read_bytes()
    bad = tmp_path / "bad"
    n_err = 0
    for m in _mutations(data):
        bad.write_bytes(m)
        try:
            im = read_imatrix(bad)
        except QuantkitError:
            n_err += 1
            continue
        for w in im.weights.values():          # whatever parses must be sane
            assert w.dtype == np.float32 and np.isfinite(w).all() and w.size <= len(m)
    assert n_err > 10


def test_missing_and_empty(tmp_path):
    with pytest.raises(QuantkitError):
        read_imatrix(tmp_path / "nope.dat")
    (tmp_path / "e").write_bytes(b"")
    with pytest.raises(QuantkitError, match="too small"):
        read_imatrix(tmp_path / "e")
    (tmp_path / "z").write_bytes(struct.pack("<i", 0))
    with pytest.raises(QuantkitError, match="no data"):
        read_imatrix(tmp_path / "z")


@pytest.mark.parametrize("name", ["imatrix.gguf", "model.imatrix", "legacy.dat"])
def test_inspect_describes_an_imatrix(tmp_path, name):
    import json

    from typer.testing import CliRunner

    from quantkit.cli import app

    vals = np.array([[3, 6, 9, 12]], np.float32)
    if name.endswith(".dat"):
        path = write_legacy_imatrix(tmp_path / name, {"blk.0.attn_k.weight": (3, vals[0])})
    else:
        path = write_gguf_imatrix(tmp_path / name, {"blk.0.attn_k.weight": (vals, np.array([3.0]))})
    result = CliRunner().invoke(app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["format"].startswith("imatrix") and data["entries"] == 1
    assert data["tensors"][0]["name"] == "blk.0.attn_k.weight" and data["tensors"][0]["shape"] == [1, 4]
    text = CliRunner().invoke(app, ["inspect", str(path)])
    assert text.exit_code == 0 and "importance matrix of 1 weights" in text.stdout
    dense = CliRunner().invoke(app, ["convert", str(path), str(tmp_path / "out"), "--to", "safetensors"])
    assert dense.exit_code == 2 and "is an importance matrix" in dense.output
