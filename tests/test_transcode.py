"""Any format to any format through one pipeline: quantized sources (GPTQ, bitsandbytes, GGUF) into
quantize and convert --to gguf; lossless where the integers fit the target (GPTQ <-> Q4_0 / Q8_0), else
re-quantized with the error reported against the source's dequantized values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quantkit import pipeline
from quantkit.api import IntegerBlocks
from quantkit.methods.gguf import convert as gc
from quantkit.methods.gguf import file as gf
from quantkit.methods.gptq.integers import from_integers, from_qweight, to_integers, to_qweight
from tests.conftest import load_tensors
from tests.gguf_checkpoints import make_checkpoint


def bf16_llama(out: Path) -> Path:
    """A bf16 llama (hidden 160: not a multiple of 128) with a trained tokenizer, as users have them."""
    import torch
    import transformers

    src = make_checkpoint(out.with_name(out.name + "-f32"), hidden=160, ffn=288, heads=5, kv_heads=1)
    model = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
    model.save_pretrained(out)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return bf16_llama(tmp_path_factory.mktemp("transcode") / "llama")


def dense_of(path: Path, tmp: Path) -> dict[str, np.ndarray]:
    """float32 weights as quantkit dequantizes `path` (folder or .gguf), with HF names."""
    if path.suffix == ".gguf":
        return dict(gc.from_gguf(path).tensors())
    out = tmp / f"{path.name}-dense"
    pipeline.dequantize(str(path), out, dtype="float32", force=True)
    return {k: v.float().numpy() for k, v in load_tensors(out).items()}


def same_values(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit as float32, +0 and -0 aside (a turned scale gives the zeros of a block the other sign)."""
    a32, b32 = np.asarray(a, np.float32) + np.float32(0), np.asarray(b, np.float32) + np.float32(0)
    return a32.shape == b32.shape and np.array_equal(a32.view(np.uint32), b32.view(np.uint32))


def projections(values: dict[str, np.ndarray]) -> list[str]:
    return sorted(n for n in values if n.endswith("_proj.weight"))


@pytest.mark.parametrize("bits,gguf_type", [(4, "Q4_0"), (8, "Q8_0")])
def test_gptq_to_gguf_is_lossless(llama, tmp_path, bits, gguf_type):
    gptq = tmp_path / "gptq"
    pipeline.quantize(str(llama), gptq, pipeline.quantizer_for("gptq").options(method="gptq", bits=bits, group_size=32))
    out = tmp_path / "m.gguf"
    result = pipeline.convert(str(gptq), out, "gguf", gguf_type=gguf_type)
    source, ours = dense_of(gptq, tmp_path), dense_of(out, tmp_path)
    names = projections(source)
    assert sorted(result.summary["lossless"]) == names and result.summary["requantized"] == []
    for name in names:
        assert same_values(source[name], ours[name]), name
    # k_proj and q_proj rows moved (llama's head permutation) together with their blocks
    assert any(".k_proj." in n for n in names)


def test_gguf_q4_0_to_gptq_and_back_is_lossless(llama, tmp_path):
    q4 = tmp_path / "m.gguf"
    pipeline.convert(str(llama), q4, "gguf", gguf_type="Q4_0")
    gptq = tmp_path / "gptq"
    options = pipeline.quantizer_for("gptq").options(method="gptq", bits=4, group_size=32, sym=False)
    result = pipeline.quantize(str(q4), gptq, options)
    source, ours = dense_of(q4, tmp_path), dense_of(gptq, tmp_path)
    names = projections(source)
    assert sorted(result.summary["lossless"]) == names
    for name in names:
        assert same_values(source[name], ours[name]), name
    config = json.loads((gptq / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq" and (gptq / "tokenizer.json").is_file()
    back = tmp_path / "back.gguf"
    pipeline.convert(str(gptq), back, "gguf", gguf_type="Q4_0")
    # general.* carried in gptq's model card; its tags gain the method's, as llama.cpp's converter would read them
    general = [{k: v for k, v in gf.read_gguf(f).metadata.items() if k.startswith("general.")} for f in (q4, back)]
    assert general[1].pop("general.tags") == ["gptq", "quantized", "gptq", "4-bit"]
    assert general[0] == general[1] and general[0]["general.name"] == llama.name
    assert (q4.read_bytes() == back.read_bytes()) or all(
        same_values(source[n], v) for n, v in dense_of(back, tmp_path).items() if n in names)


def test_symmetric_gptq_cannot_hold_negative_q4_0_scales(llama, tmp_path):
    """Q4_0 stores signed scales; GPTQ's are positive, so --sym re-quantizes (and says what it cost)."""
    q4 = tmp_path / "m.gguf"
    pipeline.convert(str(llama), q4, "gguf", gguf_type="Q4_0")
    options = pipeline.quantizer_for("gptq").options(method="gptq", bits=4, group_size=32, sym=True)
    result = pipeline.quantize(str(q4), tmp_path / "gptq", options)
    rows = result.summary["requantized"]
    assert rows and all(0 < r["rel_error"] < 0.3 for r in rows)


def test_nf4_to_q8_0_reports_error(llama, tmp_path):
    nf4 = tmp_path / "nf4"
    pipeline.quantize(str(llama), nf4, pipeline.quantizer_for("nf4").options(method="nf4"))
    out = tmp_path / "m.gguf"
    result = pipeline.convert(str(nf4), out, "gguf", gguf_type="Q8_0")
    s = result.summary
    assert s["from"] == "nf4" and s["lossless"] == []
    source, ours = dense_of(nf4, tmp_path), dense_of(out, tmp_path)
    reported = {r["tensor"]: r for r in s["requantized"]}
    assert sorted(reported) == projections(source)
    for name, row in reported.items():
        diff = np.linalg.norm(source[name] - ours[name]) / np.linalg.norm(source[name])
        assert row["rel_error"] == pytest.approx(diff, rel=1e-3) and 0 < diff < 0.02, name
        assert row["snr_db"] > 30


def test_gguf_q4_k_to_nf4_loads_and_runs_in_transformers(tmp_path):
    import torch
    import transformers

    src = make_checkpoint(tmp_path / "src", hidden=256, ffn=320)  # rows of 256 hold Q4_K blocks; 320 fall back
    q4k = tmp_path / "m.gguf"
    pipeline.convert(str(src), q4k, "gguf", gguf_type="Q4_K")
    assert {t.qtype.name for t in gc.from_gguf(q4k).file.tensors} >= {"Q4_K", "Q5_0"}
    nf4 = tmp_path / "nf4"
    result = pipeline.quantize(str(q4k), nf4, pipeline.quantizer_for("nf4").options(method="nf4"))
    assert result.summary["from"] == "gguf" and result.summary["requantized"]
    assert all(r["rel_error"] < 0.2 for r in result.summary["requantized"])
    model = transformers.AutoModelForCausalLM.from_pretrained(nf4, device_map="cpu")
    assert type(model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    tokenizer = transformers.AutoTokenizer.from_pretrained(nf4)
    ids = tokenizer("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits.float()
    # against the GGUF's own values run densely
    dense = tmp_path / "dense"
    pipeline.dequantize(str(q4k), dense, dtype="float32")
    reference = transformers.AutoModelForCausalLM.from_pretrained(dense)
    with torch.no_grad():
        expected = reference(ids).logits.float()
    assert torch.isfinite(logits).all()
    assert (torch.linalg.norm(logits - expected) / torch.linalg.norm(expected)).item() < 0.25


def test_int8_to_gptq(llama, tmp_path):
    int8 = tmp_path / "int8"
    pipeline.quantize(str(llama), int8, pipeline.quantizer_for("int8").options(method="int8"))
    gptq = tmp_path / "gptq"
    options = pipeline.quantizer_for("gptq").options(method="gptq", bits=8, group_size=32)
    result = pipeline.quantize(str(int8), gptq, options)
    s = result.summary
    assert s["from"] == "int8" and s["lossless"] == []
    source, ours = dense_of(int8, tmp_path), dense_of(gptq, tmp_path)
    for row in s["requantized"]:
        name = row["tensor"]
        diff = np.linalg.norm(source[name] - ours[name]) / np.linalg.norm(source[name])
        assert row["rel_error"] == pytest.approx(diff, rel=1e-3) and diff < 0.02, name
    config = json.loads((gptq / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "gptq" and "load_in_8bit" not in config["quantization_config"]
    assert not any(k.endswith(".SCB") for k in load_tensors(gptq))


def test_integer_blocks_round_trip_through_gptq_groups():
    rng = np.random.default_rng(0)
    q = rng.integers(-8, 8, (6, 128)).astype(np.int8)
    d = (rng.standard_normal((6, 4)) * 0.01).astype(np.float16)
    blocks = IntegerBlocks(4, 32, q, d)
    codes, scales, zeros = from_integers(blocks, 4, 32, sym=False)
    assert (scales >= 0).all() and set(np.unique(zeros)) <= {7, 8}
    back = to_integers(codes, zeros, scales, 4, 32)
    assert same_values(back.values(), blocks.values())
    assert from_integers(blocks, 4, 32, sym=True) is None  # negative factors need the turned zero point
    assert from_integers(blocks, 4, 128, sym=False) is None  # four factors cannot share one group
    assert from_integers(blocks, 2, 32, sym=False) is None  # fewer bits
    wide = IntegerBlocks(4, 128, q, np.abs(d[:, :1]))
    assert same_values(wide.regroup(32).values(), wide.values())


@pytest.mark.parametrize("bits,group", [(4, 32), (4, 128), (8, 32), (8, 64), (2, 32), (4, 8)])
def test_compiled_gptq_integers_equal_the_reference(bits, group):
    """native.unpack_signed / pack_signed against integers.py's numpy: every zero point mid or mid - 1."""
    from quantkit.methods.gptq import native
    from quantkit.methods.gptq.layout import pack_qweight

    if not native.AVAILABLE:
        pytest.skip("the compiled extension is not built")
    rng = np.random.default_rng(bits * group)
    out_features, in_features = 40, 256  # 40 output columns: one tile and a partial one
    codes = rng.integers(0, 2**bits, (out_features, in_features)).astype(np.uint8)
    mid = 2 ** (bits - 1)
    zeros = rng.choice([mid - 1, mid], (out_features, in_features // group)).astype(np.uint8)
    scales = (rng.random((out_features, in_features // group)) * 0.01 + 1e-3).astype(np.float16)
    qweight = pack_qweight(codes, bits)
    reference = to_integers(codes, zeros, scales, bits, group)
    turned = zeros == mid - 1
    q = native.unpack_signed(qweight, turned, bits, group)
    assert np.array_equal(q, reference.q)
    assert np.array_equal(native.pack_signed(q, turned, bits, group), qweight)
    found = from_qweight(qweight, zeros, scales, bits, group)
    assert np.array_equal(found.q, reference.q) and np.array_equal(found.d.view(np.uint16), reference.d.view(np.uint16))
    packed, back_scales, back_zeros = to_qweight(reference, bits, group, sym=False)
    assert np.array_equal(packed, qweight) and np.array_equal(back_zeros, zeros) and np.array_equal(back_scales, scales)
    bad = zeros.copy()
    bad[3, 0] = mid + 1
    assert from_qweight(qweight, bad, scales, bits, group) is None


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_compiled_integer_blocks_equal_the_reference(qtype):
    from quantkit.methods.gguf import legacy, native

    if not native.AVAILABLE:
        pytest.skip("the compiled extension is not built")
    qt = legacy.QType[qtype]
    bits = legacy.INTEGER_BITS[qt]
    rng = np.random.default_rng(bits)
    q = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), (7, 96)).astype(np.int8)
    d = (rng.standard_normal((7, 3)) * 0.01).astype(np.float16)
    raw = legacy.blocks_of(q, d, qt)
    assert np.array_equal(native.blocks_of(q, d, bits), raw)
    back_q, back_d = native.integers_of(raw, bits, 96)
    ref_q, ref_d = legacy.integers_of(raw, qt)
    assert np.array_equal(back_q, ref_q) and np.array_equal(back_d.view(np.uint16), ref_d.view(np.uint16))
    assert np.array_equal(back_q, q)


def test_lossless_modules_are_never_dequantized(llama, tmp_path, monkeypatch):
    """A module moved as its integers costs no float32 pass: the reader's dequantize is not called."""
    from quantkit.methods.gptq import reader

    gptq = tmp_path / "gptq"
    pipeline.quantize(str(llama), gptq, pipeline.quantizer_for("gptq").options(method="gptq", bits=4, group_size=32))

    def refuse(*args, **kwargs):
        raise AssertionError("dequantized a module that moves losslessly")

    monkeypatch.setattr(reader.GptqReader, "dequantize", refuse)
    result = pipeline.convert(str(gptq), tmp_path / "m.gguf", "gguf", gguf_type="Q4_0")
    assert result.summary["lossless"] and result.summary["requantized"] == []


def _options(method: str, **fields):
    return pipeline.quantizer_for(method).options(method=method, **fields)


def _lossless(result, source: Path, out: Path, tmp: Path) -> list[str]:
    """The tensors reported lossless, each checked bit for bit (dequantized source against output)."""
    a, b = dense_of(source, tmp), dense_of(out, tmp)
    names = sorted(result.summary["lossless"])
    assert names == projections(a) and result.summary["requantized"] == []
    for name in names:
        assert same_values(a[name], b[name]), name
    return names


def assert_library_decompresses_to(ct: Path, values: dict[str, np.ndarray]) -> None:
    """compressed-tensors' own decompression of every module equals `values` bit for bit (but zeros' signs)."""
    from tests.test_quantize_ct import library_decompress

    for name in projections(values):
        theirs = library_decompress(ct, name.removesuffix(".weight")).float().numpy()
        assert same_values(theirs, values[name]), name


def test_gptq_v1_v2_and_compressed_tensors_are_the_same_integers(llama, tmp_path):
    """GPTQ v1 -> v2 -> compressed-tensors W4A16 -> GPTQ v1: the integers move, the values stay bit for bit,
    and the last file is the first one byte for byte."""
    v1 = tmp_path / "v1"
    pipeline.quantize(str(llama), v1, _options("gptq", bits=4, group_size=32))
    assert json.loads((v1 / "config.json").read_text())["quantization_config"]["checkpoint_format"] == "gptq"
    v2 = tmp_path / "v2"
    _lossless(pipeline.quantize(str(v1), v2, _options("gptq", bits=4, group_size=32, format="v2")), v1, v2, tmp_path)
    ct = tmp_path / "ct"
    result = pipeline.quantize(str(v2), ct, _options("w4a16", group_size=32))
    _lossless(result, v2, ct, tmp_path)
    assert result.summary["from"] == "gptq-4"
    config = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    assert_library_decompresses_to(ct, dense_of(v2, tmp_path))
    back = tmp_path / "back"
    _lossless(pipeline.quantize(str(ct), back, _options("gptq", bits=4, group_size=32)), ct, back, tmp_path)
    assert (back / "model.safetensors").read_bytes() == (v1 / "model.safetensors").read_bytes()
    gguf = tmp_path / "ct.gguf"
    _lossless(pipeline.convert(str(ct), gguf, "gguf", gguf_type="Q4_0"), ct, gguf, tmp_path)


@pytest.mark.parametrize("method,gguf_type", [("w4a16-asym", "Q4_0"), ("w8a16", "Q8_0")])
def test_gguf_to_compressed_tensors_and_back_is_lossless(llama, tmp_path, method, gguf_type):
    """Q4_0's negative scales take the zero point -1 (W4A16_ASYM); Q8_0's scales are never negative."""
    gguf = tmp_path / "m.gguf"
    pipeline.convert(str(llama), gguf, "gguf", gguf_type=gguf_type)
    ct = tmp_path / "ct"
    _lossless(pipeline.quantize(str(gguf), ct, _options(method, group_size=32)), gguf, ct, tmp_path)
    assert_library_decompresses_to(ct, dense_of(gguf, tmp_path))
    back = tmp_path / "back.gguf"
    _lossless(pipeline.convert(str(ct), back, "gguf", gguf_type=gguf_type), ct, back, tmp_path)


def test_compressed_tensors_whose_arithmetic_rounds_is_requantized(llama, tmp_path):
    """compressed-tensors multiplies in the scale's dtype: W4A16 written from a bf16 model rounds q * scale to
    bf16, which no Q4_0 block reproduces, so it is re-quantized with its error reported."""
    ct = tmp_path / "ct"
    pipeline.quantize(str(llama), ct, _options("w4a16", group_size=32))
    result = pipeline.convert(str(ct), tmp_path / "m.gguf", "gguf", gguf_type="Q4_0")
    assert result.summary["lossless"] == [] and len(result.summary["requantized"]) == 14
    assert all(0 < r["rel_error"] < 0.3 for r in result.summary["requantized"])


def test_compressed_tensors_integers_exact_only_where_the_scale_dtype_holds_the_products():
    from quantkit.dtypes import bf16_bits
    from quantkit.methods.ct import integers as ct_integers
    from quantkit.methods.ct.schemes import pack_int32

    rng = np.random.default_rng(1)
    q = rng.integers(-8, 8, (4, 64)).astype(np.int8)
    packed = pack_int32(q, 4)
    coarse = np.full((4, 2), 2.0**-7, np.float32)  # one significant bit: every product is a bf16 value
    found = ct_integers.from_packed(packed, bf16_bits(coarse), "BF16", None, 4, 32, 64)
    assert found is not None and np.array_equal(found.q, q)
    fine = np.full((4, 2), np.float32(1 + 2.0**-7) * np.float32(2.0**-7), np.float32)  # 8 significant bits
    assert ct_integers.from_packed(packed, bf16_bits(fine), "BF16", None, 4, 32, 64) is None
    assert ct_integers.from_packed(packed, fine, "F32", None, 4, 32, 64) is not None
    assert ct_integers.to_packed(IntegerBlocks(4, 32, q, fine.astype(np.float16)), 4, 32, True, "BF16") is None
    again = ct_integers.to_packed(IntegerBlocks(4, 32, q, fine.astype(np.float16)), 4, 32, True, "F32")
    assert np.array_equal(again[0], packed) and np.array_equal(again[1], fine)


def test_gguf_to_int8_reports_error(llama, tmp_path):
    """int8 as the target of a quantized source: its read-back (for the error) reads weight_format from memory."""
    gguf = tmp_path / "m.gguf"
    pipeline.convert(str(llama), gguf, "gguf", gguf_type="Q4_0")
    result = pipeline.quantize(str(gguf), tmp_path / "int8", _options("int8"))
    source, ours = dense_of(gguf, tmp_path), dense_of(tmp_path / "int8", tmp_path)
    rows = result.summary["requantized"]
    assert sorted(r["tensor"] for r in rows) == projections(source)
    for row in rows:
        name = row["tensor"]
        diff = np.linalg.norm(source[name] - ours[name]) / np.linalg.norm(source[name])
        assert row["rel_error"] == pytest.approx(diff, rel=1e-3) and 0 < diff < 0.02, name
