"""Hostile config values and counts: `convert --to gguf` names config.json and the key in one line (exit 2)
for every value it cannot write, bounds every count by what the files hold before it allocates, and
fails cleanly on an OUT whose folder cannot take it."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest

from tests.gguf_checkpoints import make_checkpoint
from tests.hostile_files import CONFIG, one_error_line, tiny_tensors, write_checkpoint
from tests.test_output_safety import tmpfs


@pytest.fixture
def ckpt(tmp_path):
    return write_checkpoint(tmp_path / "src", tiny_tensors())


@pytest.fixture(scope="module")
def bpe_ckpt(tmp_path_factory):
    """A random llama with a byte-level BPE tokenizer.json (what llama.cpp's converter reads)."""
    return make_checkpoint(tmp_path_factory.mktemp("bpe") / "src", hidden=64, ffn=128, vocab=320)


def with_config(folder: Path, text: str) -> Path:
    (folder / "config.json").write_text(text)
    return folder


def refused_convert(cli, src: Path, out: Path, *naming: str) -> str:
    started = time.monotonic()
    code, _, stderr = cli("convert", src, out, "--to", "gguf")
    assert code == 2, stderr
    line = one_error_line(stderr)
    assert all(n in line for n in naming), line
    assert time.monotonic() - started < 20, "a bounded refusal takes no time"
    assert [p.name for p in out.parent.iterdir() if out.name in p.name] == []
    return line


def config_text(**changes) -> str:
    return json.dumps(dict(CONFIG, **changes))


@pytest.mark.parametrize("text, key", [
    (config_text(max_position_embeddings=2**40), "max_position_embeddings"),
    (config_text(max_position_embeddings=-1), "max_position_embeddings"),
    (config_text().replace('"hidden_size": 64', '"hidden_size": 1e999'), "hidden_size"),
    (config_text(hidden_size="64"), "hidden_size"),
    (config_text(num_attention_heads=True), "num_attention_heads"),
    (config_text(num_key_value_heads=8), "num_key_value_heads"),
    (config_text(architectures=[5]), "architectures"),
    (config_text(rope_parameters="x"), "rope_parameters"),
    (config_text(rope_scaling=[1]), "rope_scaling"),
    (config_text(rope_theta=-1.0), "rope_theta"),
    (config_text(rope_parameters={"rope_type": "default", "rope_theta": "big"}), "rope_theta"),
    (config_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": NaN'), "rms_norm_eps"),
    (config_text().replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": Infinity'), "rms_norm_eps"),
    (config_text(rms_norm_eps=0), "rms_norm_eps"),
    (config_text(head_dim=2**33), "head_dim"),
    (config_text(vocab_size=None), "vocab_size"),
], ids=["context-2^40", "context-negative", "hidden-1e999", "hidden-string", "heads-bool", "kv-heads-above-heads",
        "architectures-int", "rope-parameters-string", "rope-scaling-list", "rope-theta-negative",
        "rope-theta-string", "eps-nan", "eps-inf", "eps-zero", "head-dim-2^33", "vocab-null"])  # fmt: skip
def test_hostile_config_value_is_named(ckpt, tmp_path, cli, text, key):
    refused_convert(cli, with_config(ckpt, text), tmp_path / "m.gguf", "config.json", key)


@pytest.mark.parametrize("key, value", [("model_type", []), ("model_type", 5), ("architectures", {"a": 1}),
                                        ("architectures", [5]), ("tie_word_embeddings", "false"), ("torch_dtype", ["x"])])
def test_general_keys_of_the_wrong_type_are_named(ckpt, tmp_path, cli, key, value):
    """Keys every command reads (found by scripts/fuzz.py: model_type [] crashed quantize)."""
    with_config(ckpt, config_text(**{key: value}))
    for args in (("inspect", ckpt), ("quantize", ckpt, tmp_path / "q", "--method", "gptq", "--group-size", "32"),
                 ("dequantize", ckpt, tmp_path / "d")):
        code, _, err = cli(*args)
        assert code == 2, err
        line = one_error_line(err)
        assert "config.json" in line and key in line, line


@pytest.mark.parametrize("layers", [2_000_000, 10**9])
def test_layer_count_is_bounded_by_the_tensors_present(ckpt, tmp_path, cli, layers):
    refused_convert(cli, with_config(ckpt, config_text(num_hidden_layers=layers)), tmp_path / "m.gguf",
                    "config.json", "num_hidden_layers", "6 tensors")


def test_pad_token_id_minus_one_means_none(bpe_ckpt, tmp_path, cli):
    """Old LLaMA configs write pad_token_id -1 for "no padding token": the GGUF gets no pad id."""
    from gguf import GGUFReader

    config = json.loads((bpe_ckpt / "config.json").read_text())
    with_config(bpe_ckpt, json.dumps(dict(config, pad_token_id=-1)))
    code, _, err = cli("convert", bpe_ckpt, tmp_path / "m.gguf", "--to", "gguf")
    assert code == 0, err
    fields = GGUFReader(tmp_path / "m.gguf").fields
    assert "tokenizer.ggml.padding_token_id" not in fields and "tokenizer.ggml.tokens" in fields
    with_config(bpe_ckpt, json.dumps(dict(config, pad_token_id=10**6)))
    refused_convert(cli, bpe_ckpt, tmp_path / "n.gguf", "config.json", "pad_token_id")
    with_config(bpe_ckpt, json.dumps(config))


@pytest.mark.parametrize("token_id", [2 * 10**9, -3, "7"])
def test_added_token_id_is_bounded_by_the_vocabulary(bpe_ckpt, tmp_path, cli, token_id):
    tokenizer = bpe_ckpt / "tokenizer.json"
    original = tokenizer.read_text()
    tok = json.loads(original)
    tok["added_tokens"].append({"id": token_id, "content": "<huge>", "special": True})
    tokenizer.write_text(json.dumps(tok))
    try:
        refused_convert(cli, bpe_ckpt, tmp_path / "m.gguf", "tokenizer.json", "<huge>", "outside the vocabulary")
    finally:
        tokenizer.write_text(original)


def test_a_million_tensor_header_fails_fast(tmp_path, cli):
    n = 1_000_000
    header = json.dumps({f"t{i}": {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]} for i in range(n)}).encode()
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(4 * n))
    (folder / "config.json").write_text(config_text())
    for args in (("inspect", folder), ("quantize", folder, tmp_path / "q", "--method", "int8")):
        started = time.monotonic()
        code, _, err = cli(*args)
        assert code == 2 and "more than 200000 tensors" in one_error_line(err), err
        assert time.monotonic() - started < 10


# ---------------------------------------------------------------- where OUT goes


def test_missing_out_parent_is_created(ckpt, tmp_path, cli):
    out = tmp_path / "a" / "b" / "m.gguf"
    code, _, err = cli("convert", ckpt, out, "--to", "gguf")
    assert code == 0, err
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == ["m.gguf"]


def test_out_parent_that_is_a_file_is_one_line(ckpt, tmp_path, cli):
    (tmp_path / "file").write_text("x")
    code, _, err = cli("convert", ckpt, tmp_path / "file" / "m.gguf", "--to", "gguf")
    assert code == 2 and "is not a folder" in one_error_line(err), err
    assert (tmp_path / "file").read_text() == "x"


@pytest.fixture
def read_only_folder(tmp_path):
    """A read-only tmpfs (needs root); skipped where mounting is not allowed."""
    with tmpfs(tmp_path / "ro", "ro,size=64k") as mount:
        yield mount


@pytest.mark.parametrize("command", [("convert", "--to", "gguf"), ("quantize", "--method", "int8")], ids=["gguf", "folder"])
def test_out_parent_that_cannot_be_written_is_one_line(ckpt, read_only_folder, cli, command):
    verb, *flags = command
    code, _, err = cli(verb, ckpt, read_only_folder / ("m.gguf" if verb == "convert" else "out"), *flags)
    assert code == 2 and "Read-only file system" in one_error_line(err), err
