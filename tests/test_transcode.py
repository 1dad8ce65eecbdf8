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
from quantkit.methods.gptq.integers import from_integers, to_integers
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
