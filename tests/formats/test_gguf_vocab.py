"""Tokenizer and general.* metadata round trips on small vocabularies trained here (the real vocabularies
llama.cpp wrote are in tests/clients/test_gguf_vocabs.py)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q

from quantkit.io.source import open_checkpoint
from quantkit.methods.gguf import convert as gc
from quantkit.methods.gguf import file as gf
from quantkit.methods.gguf import vocab as gv
from quantkit.methods.gguf.pretokenizers import CHECK_TEXT, SPLITS
from tests.gguf_checkpoints import TEXT, make_checkpoint, train_sentencepiece

CARD = """---
license: apache-2.0
language:
- en
- fr
tags:
- text-generation
- tiny
pipeline_tag: text-generation
name: Tiny Llama
basename: tiny-llama
size_label: 1M
organization: Quantkit Tests
finetune: instruct
version: v2
---

# Tiny
"""


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    src = make_checkpoint(tmp_path_factory.mktemp("ck") / "llama", "llama", hidden=64, ffn=128)
    (src / "README.md").write_text(CARD)
    return src


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _keys(meta: dict, prefix: str) -> dict:
    return {k: v for k, v in meta.items() if k.startswith(prefix)}


def test_check_hash_is_of_the_ids_transformers_encodes_the_check_text_to(llama):
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(llama).encode(CHECK_TEXT)
    assert gv.check_hash(llama / "tokenizer.json") == hashlib.sha256(str(ids).encode()).hexdigest()


def test_card_fills_general_keys_as_llama_cpp_converter_does(llama, tmp_path):
    gc.to_gguf(open_checkpoint(llama), tmp_path / "m.gguf", Q.F16)
    general = _keys(gf.read_gguf(tmp_path / "m.gguf").metadata, "general.")
    assert general["general.name"] == "Tiny Llama"
    assert {k: general[k] for k in ("general.basename", "general.size_label", "general.organization", "general.finetune",
                                    "general.version", "general.license")} == {
        "general.basename": "tiny-llama", "general.size_label": "1M", "general.organization": "Quantkit Tests",
        "general.finetune": "instruct", "general.version": "v2", "general.license": "apache-2.0"}
    # tags gather `tags` and `pipeline_tag`, languages `language`, as gguf-py's metadata.py does
    assert general["general.tags"] == ["text-generation", "tiny", "text-generation"]
    assert general["general.languages"] == ["en", "fr"]


def test_general_keys_survive_gguf_to_safetensors_and_back(llama, tmp_path):
    gc.to_gguf(open_checkpoint(llama), tmp_path / "m.gguf", Q.F16)
    gc.gguf_to_safetensors(tmp_path / "m.gguf", tmp_path / "hf")
    gc.to_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "back.gguf", Q.F16)
    first, back = gf.read_gguf(tmp_path / "m.gguf").metadata, gf.read_gguf(tmp_path / "back.gguf").metadata
    assert _keys(back, "general.") == _keys(first, "general.")
    assert _keys(back, "tokenizer.") == _keys(first, "tokenizer.")


def test_a_checkpoint_without_card_is_named_after_its_folder(tmp_path):
    src = make_checkpoint(tmp_path / "my-model", "llama", hidden=64, ffn=128)
    gc.to_gguf(open_checkpoint(src), tmp_path / "m.gguf", Q.F16)
    assert _keys(gf.read_gguf(tmp_path / "m.gguf").metadata, "general.name") == {"general.name": "my-model"}


@pytest.mark.parametrize("name", ["gpt-2", "mpt", "llama-bpe", "qwen2", "qwen35", "smollm", "falcon", "deepseek-llm",
                                  "deepseek-coder", "deepseek-v3", "default"])
def test_every_pre_tokenizer_name_comes_back(llama, tmp_path, name):
    """GGUF -> HF writes llama.cpp's splitting rules for the name (and the name); back, the name is kept
    while the rules are unchanged, though this vocabulary's hash is unknown and mpt / olmo, qwen2 / qwen35
    share their rules."""
    gc.to_gguf(open_checkpoint(llama), tmp_path / "m.gguf", Q.F16)
    meta = dict(gf.read_gguf(tmp_path / "m.gguf").metadata, **{"tokenizer.ggml.pre": name})
    hf = tmp_path / "hf"
    hf.mkdir()
    warnings: list[str] = []
    gv.write_hf_tokenizer(meta, hf, warnings)
    assert warnings == []
    vocab = gv.read_vocab(hf, {}, len(meta["tokenizer.ggml.tokens"]), warnings)
    assert (vocab.pre, warnings) == (name, [])
    # the name is a hint, not a claim: once the splitting rules change, the hash decides
    tok = json.loads((hf / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (hf / "tokenizer.json").write_text(json.dumps(tok))
    assert gv.read_vocab(hf, {}, len(meta["tokenizer.ggml.tokens"]), warnings).pre == "default"
    [warning] = warnings
    assert "hash " + gv.check_hash(hf / "tokenizer.json") in warning


def test_splits_of_known_names_compile_in_tokenizers():
    from tokenizers import Regex

    for regexes in set(SPLITS.values()):
        for regex in regexes:
            Regex(regex)


def test_sentencepiece_vocab_round_trip_rebuilds_tokenizer_model(tmp_path):
    import sentencepiece
    from transformers import AutoTokenizer

    src = make_checkpoint(tmp_path / "src", "llama", hidden=64, ffn=128, vocab=320)
    train_sentencepiece(src, 320)
    gc.to_gguf(open_checkpoint(src), tmp_path / "m.gguf", Q.F16)
    result = gc.gguf_to_safetensors(tmp_path / "m.gguf", tmp_path / "hf")
    assert {"tokenizer.model", "tokenizer.json"} <= set(result.files)
    gc.to_gguf(open_checkpoint(tmp_path / "hf"), tmp_path / "back.gguf", Q.F16)
    first, back = gf.read_gguf(tmp_path / "m.gguf").metadata, gf.read_gguf(tmp_path / "back.gguf").metadata
    assert _keys(back, "tokenizer.") == _keys(first, "tokenizer.") and first["tokenizer.ggml.pre"] == "default"
    original = sentencepiece.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    rebuilt = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "hf" / "tokenizer.model"))
    ours = AutoTokenizer.from_pretrained(tmp_path / "hf")
    # (whitespace runs left out: this trained model's normalizer collapses them, which a GGUF llama vocabulary
    # does not record and llama.cpp does not do)
    for line in [*(line for line in TEXT.splitlines()[:4] if "  " not in line), "ünïcödé 1969: they're (here)!"]:
        assert rebuilt.encode(line) == original.encode(line)
        assert ours.encode(line, add_special_tokens=False) == original.encode(line)
