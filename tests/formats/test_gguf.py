"""GGUF: names, Q/K permutation, metadata, tokenizer, the streamed writer and the bounds-checked reader.

Cross-checks use gguf-py (its reader and dequantizer) and transformers' own GGUF loader, which undoes
llama.cpp's Q/K permutation independently of us.
"""

import contextlib
import json
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from quantkit.errors import QuantkitError
from quantkit.io.source import open_checkpoint
from quantkit.methods.gguf import convert as gc
from quantkit.methods.gguf import file as gf
from quantkit.methods.gguf import types as ggml
from quantkit.methods.gguf import verify as gv
from tests.gguf_checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    return {family: make_checkpoint(root / family, family) for family in ("llama", "mistral", "qwen2")}


@pytest.fixture(scope="module")
def llama_q8(checkpoints, tmp_path_factory):
    out = tmp_path_factory.mktemp("q8") / "model.gguf"
    gc.to_gguf(open_checkpoint(checkpoints["llama"]), out, Q.Q8_0)
    return out


def _source(path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(path / "model.safetensors"))


def _llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """The permutation as llama.cpp's convert_hf_to_gguf.py writes it (reshape, swap, reshape)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def test_permutation_matches_llama_cpp_and_inverts():
    w = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    for heads in (1, 2, 4, 8):
        assert np.array_equal(gf.permute_qk(w, heads), _llama_cpp_permute(w, heads))
        assert np.array_equal(gf.unpermute_qk(gf.permute_qk(w, heads), heads), w)


def test_names_come_from_gguf_name_map():
    table = gf.name_table(gf.ARCHITECTURES["Qwen2ForCausalLM"], 2)
    assert table["model.layers.1.self_attn.q_proj.bias"] == "blk.1.attn_q.bias"
    assert table["model.layers.0.mlp.down_proj.weight"] == "blk.0.ffn_down.weight"
    assert table["lm_head.weight"] == "output.weight"
    assert len(set(table.values())) == len(table)


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_f32_round_trip_is_exact(checkpoints, tmp_path, family):
    src = checkpoints[family]
    out = tmp_path / "model.gguf"
    report = gc.to_gguf(open_checkpoint(src), out, Q.F32)
    assert report.fallbacks == [] and report.warnings == []
    back = gc.from_gguf(out)
    source = _source(src)
    got = dict(back.tensors())
    assert got.keys() == source.keys()
    for name, values in source.items():
        assert np.array_equal(got[name], values), name
    config = json.loads((src / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "vocab_size"):
        assert back.config[key] == config[key], key


def test_qwen2_is_not_permuted_llama_is(checkpoints, tmp_path):
    for family, permuted in (("qwen2", False), ("llama", True)):
        out = tmp_path / f"{family}.gguf"
        gc.to_gguf(open_checkpoint(checkpoints[family]), out, Q.F32)
        file = gf.read_gguf(out)
        q = {t.name: t for t in file.tensors}["blk.0.attn_q.weight"]
        stored = file.rows(q).reshape(q.shape)
        hf = _source(checkpoints[family])["model.layers.0.self_attn.q_proj.weight"]
        assert np.array_equal(stored, _llama_cpp_permute(hf, 4) if permuted else hf)


def test_q8_0_file_holds_our_bytes_and_gguf_py_reads_it(checkpoints, llama_q8):
    reader = gguf.GGUFReader(llama_q8)
    tensors = {t.name: t for t in reader.tensors}
    source = _source(checkpoints["llama"])
    down = tensors["blk.1.ffn_down.weight"]
    assert down.tensor_type == Q.Q8_0
    expected = ggml.quantize_reference(source["model.layers.1.mlp.down_proj.weight"], Q.Q8_0)
    assert np.asarray(down.data).tobytes() == expected.tobytes()
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0
    assert reader.fields["llama.attention.head_count_kv"].contents() == 2


def test_tokenizer_metadata_and_back(checkpoints, llama_q8, tmp_path):
    from transformers import AutoTokenizer

    meta = gf.read_gguf(llama_q8).metadata
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (0, 1)
    assert "messages" in meta["tokenizer.chat_template"]
    conv = gc.from_gguf(llama_q8)
    gc.write_tokenizer_files(conv, tmp_path)
    text = "How vexingly quick daft zebras jump! 1969"
    ours = AutoTokenizer.from_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(checkpoints["llama"])
    assert ours(text)["input_ids"] == theirs(text)["input_ids"]
    assert ours.chat_template == theirs.chat_template and ours.eos_token == "</s>"


def test_unknown_pre_tokenizer_gets_default_and_a_warning(checkpoints, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in checkpoints["llama"].iterdir():
        (src / f.name).symlink_to(f)
    tok = json.loads((checkpoints["llama"] / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Whitespace"}
    (src / "tokenizer.json").unlink()
    (src / "tokenizer.json").write_text(json.dumps(tok))
    report = gc.to_gguf(open_checkpoint(src), tmp_path / "m.gguf", Q.F16)
    assert gf.read_gguf(tmp_path / "m.gguf").metadata["tokenizer.ggml.pre"] == "default"
    [warning] = [w for w in report.warnings if "pre-tokenizer" in w]
    assert "not in llama.cpp's list (hash " in warning and '"default"' in warning


@pytest.mark.parametrize("want, fallback", [(Q.Q4_K, Q.Q5_0), (Q.Q6_K, Q.Q8_0)])
def test_k_quant_fallback_is_reported(tmp_path_factory, want, fallback):
    src = make_checkpoint(tmp_path_factory.mktemp("narrow"), "llama", hidden=128, ffn=256, vocab=320)
    out = tmp_path_factory.mktemp("o") / "m.gguf"
    report = gc.to_gguf(open_checkpoint(src), out, want)
    types = {t.name: t.qtype for t in gf.read_gguf(out).tensors}
    assert types["blk.0.ffn_down.weight"] == want  # rows of 256 fit
    assert types["blk.0.attn_q.weight"] == fallback  # rows of 128 do not
    assert [(f.wanted, f.stored) for f in report.fallbacks if f.name == "blk.0.attn_q.weight"] == [(want, fallback)]


def test_k_quants_decode_close(checkpoints, tmp_path):
    source = _source(checkpoints["llama"])
    for qtype, bound in ((Q.Q4_K, 0.1), (Q.Q6_K, 0.03)):
        out = tmp_path / f"{qtype.name}.gguf"
        gc.to_gguf(open_checkpoint(checkpoints["llama"]), out, qtype)
        for name, values in gc.from_gguf(out).tensors():
            ref = source[name]
            assert np.abs(values - ref).mean() <= bound * np.abs(ref).mean() + 1e-7, (qtype, name)


def test_transformers_loads_our_gguf_like_the_source(checkpoints, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    tied = make_checkpoint(tmp_path / "tied", "qwen2", hidden=64, ffn=128, tied=True)
    ids = torch.tensor([[0, 5, 17, 42, 99, 200, 3]])
    for name, src in (("llama", checkpoints["llama"]), ("qwen2", checkpoints["qwen2"]), ("tied", tied)):
        out = tmp_path / f"{name}.gguf"
        gc.to_gguf(open_checkpoint(src), out, Q.F32)
        ours = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32)
        ref = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
        with torch.no_grad():
            assert torch.allclose(ours(ids).logits, ref(ids).logits, atol=1e-5), name
    assert "output.weight" not in {t.name for t in gf.read_gguf(tmp_path / "tied.gguf").tensors}
    assert gc.from_gguf(tmp_path / "tied.gguf").config["tie_word_embeddings"] is True


def test_unsupported_architecture_is_refused(checkpoints, tmp_path):
    ck = open_checkpoint(checkpoints["llama"])
    ck.config = {**ck.config, "architectures": ["GPT2LMHeadModel"]}
    with pytest.raises(QuantkitError, match="GPT2LMHeadModel is not supported yet"):
        gc.to_gguf(ck, tmp_path / "m.gguf", Q.F16)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing_behind(checkpoints, tmp_path, monkeypatch):
    def boom(rows, dtype, qtype):
        raise QuantkitError("simulated failure")

    monkeypatch.setattr(ggml, "quantize_stored", boom)
    out = tmp_path / "m.gguf"
    out.write_bytes(b"old")
    with pytest.raises(QuantkitError, match="simulated"):
        gc.to_gguf(open_checkpoint(checkpoints["llama"]), out, Q.Q8_0)
    assert [p.name for p in tmp_path.iterdir()] == ["m.gguf"] and out.read_bytes() == b"old"


def test_inspect_file_reads_no_data(llama_q8):
    info = gf.inspect_file(llama_q8)
    assert info["architecture"] == "llama" and info["quantization"]["file_type"] == "MOSTLY_Q8_0"
    assert info["metadata"]["tokenizer.ggml.tokens"] == "[320 items]"
    down = next(t for t in info["tensors"] if t["name"] == "blk.0.ffn_down.weight")
    assert down == {"name": "blk.0.ffn_down.weight", "shape": [256, 512], "dtype": "Q8_0", "bytes": 256 * 16 * 34}


# ------------------------------------------------------------------------------------- damaged files


@pytest.fixture()
def damaged(llama_q8, tmp_path):
    data = bytearray(llama_q8.read_bytes())

    def write(mutate) -> Path:
        out = tmp_path / "bad.gguf"
        out.write_bytes(bytes(mutate(bytearray(data))))
        return out

    return write


def test_bad_magic(damaged):
    with pytest.raises(QuantkitError, match="bad magic"):
        gf.read_gguf(damaged(lambda d: b"GGUX" + d[4:]))


def test_unsupported_version(damaged):
    with pytest.raises(QuantkitError, match="version 9"):
        gf.read_gguf(damaged(lambda d: d[:4] + struct.pack("<I", 9) + d[8:]))


def test_huge_tensor_count(damaged):
    with pytest.raises(QuantkitError, match="tensor count .* cannot fit"):
        gf.read_gguf(damaged(lambda d: d[:8] + struct.pack("<Q", 2**40) + d[16:]))


def test_huge_metadata_count(damaged):
    with pytest.raises(QuantkitError, match="metadata count .* cannot fit"):
        gf.read_gguf(damaged(lambda d: d[:16] + struct.pack("<Q", 2**62) + d[24:]))


def test_huge_key_length(damaged):
    with pytest.raises(QuantkitError, match="metadata key #0 runs past the end"):
        gf.read_gguf(damaged(lambda d: d[:24] + struct.pack("<Q", 2**60) + d[32:]))


def test_truncated_header(damaged):
    with pytest.raises(QuantkitError, match="cannot fit in the file|runs past the end"):
        gf.read_gguf(damaged(lambda d: d[:3000]))


def test_truncated_data(damaged):
    with pytest.raises(QuantkitError, match="runs past the end of the file"):
        gf.read_gguf(damaged(lambda d: d[:-5000]))


def _patch_tensor_field(d: bytearray, name: bytes, skip: int, value: bytes) -> bytearray:
    """Overwrite bytes `skip` after the tensor info name `name` (n_dims u32, dims u64 each, type u32...)."""
    at = d.index(struct.pack("<Q", len(name)) + name) + 8 + len(name) + skip
    d[at:at + len(value)] = value
    return d


@pytest.mark.parametrize("skip, value, message", [
    (12, struct.pack("<I", 250), "unknown type 250"),
    (16, struct.pack("<Q", 3), "not aligned"),
    (16, struct.pack("<Q", 2**40), "runs past the end of the file"),
    (16, struct.pack("<Q", 0), "overlaps"),
    (0, struct.pack("<I", 5), "5 dimensions"),
], ids=["bad-type", "misaligned", "offset-past-end", "overlap", "too-many-dims"])
def test_damaged_tensor_info(damaged, skip, value, message):
    name = b"blk.0.attn_norm.weight"  # 1-D: n_dims u32, ne u64, type u32, offset u64
    with pytest.raises(QuantkitError, match=message):
        gf.read_gguf(damaged(lambda d: _patch_tensor_field(d, name, skip, value)))


@pytest.mark.parametrize("seed", range(20))
def test_random_corruption_never_crashes(damaged, seed):
    rng = np.random.default_rng(seed)

    def flip(d):
        end = 4096
        for at in rng.integers(0, end, 8):
            d[at] = int(rng.integers(0, 256))
        return d

    with contextlib.suppress(QuantkitError):
        gf.read_gguf(damaged(flip))


# ------------------------------------------------------------------------------------------------ CLI


def _cli(*args):
    from typer.testing import CliRunner

    from quantkit.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_round_trip_and_inspect(checkpoints, tmp_path):
    gguf_path = tmp_path / "m.gguf"
    result = _cli("convert", checkpoints["qwen2"], gguf_path, "--to", "gguf", "--gguf-type", "q8_0", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["gguf_type"] == "Q8_0"
    result = _cli("convert", gguf_path, tmp_path / "dense", "--to", "safetensors", "--json")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "dense" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"] and config["dtype"] == "bfloat16"  # --dtype float32: exact
    result = _cli("inspect", gguf_path, "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["architecture"] == "qwen2"


def test_cli_refuses_existing_output_and_bad_type(checkpoints, tmp_path):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    result = _cli("convert", checkpoints["llama"], out, "--to", "gguf")
    assert result.exit_code == 2 and "already exists" in result.output
    result = _cli("convert", checkpoints["llama"], tmp_path / "n.gguf", "--to", "gguf", "--gguf-type", "Q3_K_X")
    assert result.exit_code == 2 and "'Q3_K_X' is not one of" in result.output and len(result.output.splitlines()) == 1
    assert out.read_bytes() == b"keep me" and not (tmp_path / "n.gguf").exists()



def test_q2_k_s_without_an_importance_matrix_is_refused_as_llama_quantize_does(checkpoints, tmp_path):
    result = _cli("convert", checkpoints["llama"], tmp_path / "n.gguf", "--to", "gguf", "--gguf-type", "Q2_K_S")
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) <= 2, result.output
    assert "token_embd.weight would be Q2_K in a Q2_K_S file" in result.output and "--imatrix" in result.output
    assert not (tmp_path / "n.gguf").exists()
    result = _cli("convert", checkpoints["llama"], tmp_path / "q2.gguf", "--to", "gguf", "--gguf-type", "Q2_K")
    assert result.exit_code == 0 and (tmp_path / "q2.gguf").stat().st_size > 0

# --------------------------------------------------------------------------------------------- verify


def test_verify_with_reference_reports_per_tensor_error(checkpoints, llama_q8):
    report = gv.verify_gguf(llama_q8, str(checkpoints["llama"]))
    assert report.ok, report.as_dict()
    assert len(report.layers) == 21 and all(x.rel_error < 0.01 for x in report.layers)


@pytest.mark.parametrize("type_name", [t for t in gc.FILE_TYPES if t not in ("F32", "Q8_0", "Q2_K_S")])  # Q2_K_S: --imatrix
def test_verify_bounds_pass_every_type(checkpoints, tmp_path, type_name):
    out = tmp_path / "m.gguf"
    gc.to_gguf(open_checkpoint(checkpoints["llama"]), out, type_name)
    report = gv.verify_gguf(out, str(checkpoints["llama"]))
    assert report.ok, [x for x in report.layers if not x.ok]
    assert gv.verify_gguf(out, str(checkpoints["qwen2"])).ok is False  # another model is caught


def test_verify_turns_damage_into_a_finding(damaged):
    report = gv.verify_gguf(damaged(lambda d: d[:-5000]))
    assert not report.ok
    assert [(c.name, c.ok) for c in report.checks] == [("leftovers", True), ("structure", False)]
    assert "runs past the end" in report.checks[1].detail


def test_verify_flags_non_finite_data(llama_q8, tmp_path):
    data = bytearray(llama_q8.read_bytes())
    norm = {t.name: t for t in gf.read_gguf(llama_q8).tensors}["blk.0.attn_norm.weight"]
    data[norm.offset:norm.offset + 4] = struct.pack("<f", float("nan"))
    bad = tmp_path / "nan.gguf"
    bad.write_bytes(bytes(data))
    checks = {c.name: c for c in gv.verify_gguf(bad).checks}
    assert not checks["values"].ok and "blk.0.attn_norm.weight" in checks["values"].detail


def test_cli_verify_and_dequantize(checkpoints, llama_q8, tmp_path):
    result = _cli("verify", llama_q8, "--reference", checkpoints["llama"], "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"]
    result = _cli("dequantize", llama_q8, tmp_path / "dense", "--dtype", "bfloat16", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["dtype"] == "bfloat16"
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(llama_q8.read_bytes()[:-100])
    assert _cli("verify", truncated).exit_code == 1


def test_sentencepiece_vocab(tmp_path):
    import sentencepiece

    from tests.gguf_checkpoints import train_sentencepiece

    src = make_checkpoint(tmp_path / "spm", "llama", hidden=64, ffn=128, vocab=320)
    train_sentencepiece(src, 320)
    gc.to_gguf(open_checkpoint(src), tmp_path / "m.gguf", Q.F16)
    meta = gf.read_gguf(tmp_path / "m.gguf").metadata
    sp = sentencepiece.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))
    assert meta["tokenizer.ggml.model"] == "llama"
    assert meta["tokenizer.ggml.tokens"] == [sp.id_to_piece(i) for i in range(320)]
    assert np.allclose(meta["tokenizer.ggml.scores"], [sp.get_score(i) for i in range(320)])
    assert meta["tokenizer.ggml.token_type"][:4] == [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL,
                                                     gguf.TokenType.CONTROL, gguf.TokenType.BYTE]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.unknown_token_id"]) == (1, 0)


def test_small_chunks_dequantize_like_whole_tensors(llama_q8):
    conv = gc.from_gguf(llama_q8)
    for name, whole in conv.tensors():
        pieces = list(conv.chunks(name, max_bytes=3000))
        assert np.array_equal(np.concatenate([p.reshape(-1) for p in pieces]), whole.reshape(-1)), name
        assert len(pieces) > 1 or whole.ndim == 1 or "q_proj" in name or "k_proj" in name


def test_llama_attention_bias_is_permuted_like_its_weight(tmp_path):
    src = make_checkpoint(tmp_path / "bias", "llama", hidden=64, ffn=128, attention_bias=True)
    out = tmp_path / "m.gguf"
    gc.to_gguf(open_checkpoint(src), out, Q.F32)
    file = gf.read_gguf(out)
    stored = {t.name: t for t in file.tensors}
    hf = _source(src)
    bias = file.rows(stored["blk.0.attn_k.bias"]).reshape(-1)
    assert np.array_equal(bias, _llama_cpp_permute(hf["model.layers.0.self_attn.k_proj.bias"], 2))
    back = gc.from_gguf(out)
    assert back.config["attention_bias"] is True
    assert all(np.array_equal(values, hf[name]) for name, values in back.tensors())


def test_config_contradicting_the_weights_is_refused_before_writing(checkpoints, tmp_path):
    ck = open_checkpoint(checkpoints["llama"])
    ck.config = {**ck.config, "intermediate_size": 384}
    with pytest.raises(QuantkitError, match=r"disagree: model.layers.0.mlp.\w+_proj.weight has shape .* implies .*384"):
        gc.to_gguf(ck, tmp_path / "m.gguf", Q.F16)
    assert list(tmp_path.iterdir()) == []


def test_missing_tensors_are_a_warning_then_a_verify_failure(checkpoints, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in checkpoints["llama"].iterdir():
        (src / f.name).symlink_to(f)
    ck = open_checkpoint(src)
    ck.tensors = {n: i for n, i in ck.tensors.items() if "layers.1.mlp.up_proj" not in n}
    report = gc.to_gguf(ck, tmp_path / "m.gguf", Q.F16)
    assert any("will not load" in w and "layers.1.mlp.up_proj" in w for w in report.warnings)
    checks = {c.name: c for c in gv.verify_gguf(tmp_path / "m.gguf").checks}
    assert not checks["metadata"].ok and "is missing" in checks["metadata"].detail


def test_verify_catches_metadata_that_contradicts_the_tensors(checkpoints, tmp_path, monkeypatch):
    ck = open_checkpoint(checkpoints["llama"])
    ck.config = {**ck.config, "intermediate_size": 384}
    out = tmp_path / "m.gguf"
    with monkeypatch.context() as m:
        m.setattr(gf, "shape_problems", lambda *args: ([], []))
        gc.to_gguf(ck, out, Q.F16)
    checks = {c.name: c for c in gv.verify_gguf(out).checks}
    assert not checks["metadata"].ok and "mlp" in checks["metadata"].detail and "384" in checks["metadata"].detail


def test_llama3_pre_tokenizer_is_recognised_and_written_back(tmp_path):
    from transformers import AutoTokenizer

    from tests.gguf_checkpoints import use_llama3_pre_tokenizer

    src = make_checkpoint(tmp_path / "src", "llama", hidden=64, ffn=128)
    use_llama3_pre_tokenizer(src)
    report = gc.to_gguf(open_checkpoint(src), tmp_path / "m.gguf", Q.F16)
    assert report.warnings == []  # a vocabulary of its own (an unknown hash) with Llama 3's splitting rules
    assert gf.read_gguf(tmp_path / "m.gguf").metadata["tokenizer.ggml.pre"] == "llama-bpe"
    gc.gguf_to_safetensors(tmp_path / "m.gguf", tmp_path / "back")
    text = "I'd say it's 12345 fine,\n\n  def main(argv):"
    ours = AutoTokenizer.from_pretrained(tmp_path / "back")(text)["input_ids"]
    assert ours == AutoTokenizer.from_pretrained(src)(text)["input_ids"]


def test_damaged_tokenizer_json_is_one_error(checkpoints, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in checkpoints["llama"].iterdir():
        if f.name != "tokenizer.json":
            (src / f.name).symlink_to(f)
    (src / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": ["not", "a", "dict"]}}))
    with pytest.raises(QuantkitError, match="tokenizer files have an unexpected structure"):
        gc.to_gguf(open_checkpoint(src), tmp_path / "m.gguf", Q.F16)


def test_vocabulary_with_mismatched_token_types_still_writes_tokenizer(tmp_path):
    from quantkit.methods.gguf.vocab import write_hf_tokenizer

    warnings: list[str] = []
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"], "tokenizer.ggml.token_type": [1],
            "tokenizer.ggml.merges": ["a b", 7]}
    assert "tokenizer.json" in write_hf_tokenizer(meta, tmp_path, warnings)
    assert write_hf_tokenizer({"tokenizer.ggml.tokens": [1, 2]}, tmp_path, warnings) == []


def test_named_chat_templates_go_both_ways(checkpoints, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in checkpoints["llama"].iterdir():
        if f.name not in ("tokenizer_config.json", "chat_template.jinja"):
            (src / f.name).symlink_to(f)
    config = json.loads((checkpoints["llama"] / "tokenizer_config.json").read_text())
    templates = [{"name": "default", "template": "{{ a }}"}, {"name": "tool_use", "template": "{{ b }}"}]
    (src / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": templates}))
    gc.to_gguf(open_checkpoint(src), tmp_path / "m.gguf", Q.F16)
    meta = gf.read_gguf(tmp_path / "m.gguf").metadata
    assert meta["tokenizer.chat_template"] == "{{ a }}" and meta["tokenizer.chat_template.tool_use"] == "{{ b }}"
    gc.gguf_to_safetensors(tmp_path / "m.gguf", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "tokenizer_config.json").read_text())["chat_template"] == templates


def test_cli_reports_fallbacks_once_per_kind_and_lists_them_in_json(tmp_path):
    src = make_checkpoint(tmp_path / "narrow", "llama", hidden=128, ffn=256, vocab=320, layers=2)
    text = _cli("convert", src, tmp_path / "a.gguf", "--to", "gguf", "--gguf-type", "Q4_K_M")
    assert text.exit_code == 0, text.output
    lines = [line for line in text.output.splitlines() if "do not hold" in line]
    # Q4_K: attn q/k/o, gate, up of both layers, layer 0's attn_v, token_embd; Q6_K: layer 1's attn_v (more
    # bits in the last eighth); the head's rows of 128 go to Q8_0 directly, not as a fallback
    assert lines == ["warning: 12 tensors: rows of 128 do not hold Q4_K blocks of 256, stored as Q5_0",
                     "warning: blk.1.attn_v.weight: rows of 128 do not hold Q6_K blocks of 256, stored as Q8_0"], lines
    data = json.loads(_cli("convert", src, tmp_path / "b.gguf", "--to", "gguf", "--gguf-type", "Q4_K_M", "--json").stdout)
    assert len(data["fallbacks"]) == 13 and data["gguf_type"] == "Q4_K_M"
    assert {"tensor": "blk.0.attn_q.weight", "row_length": 128, "wanted": "Q4_K", "stored": "Q5_0"} in data["fallbacks"]
