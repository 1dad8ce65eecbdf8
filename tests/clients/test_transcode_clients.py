"""Quantized -> quantized with the real clients (#15): GPTQModel writes GPTQ that becomes a GGUF Q4_0
llama.cpp runs, a GGUF Q4_0 becomes GPTQ that GPTQModel loads, and transformers + bitsandbytes NF4 becomes a
GGUF Q8_0 whose logits in llama.cpp stay close to the NF4 model's own. Run with `make test-clients`."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from quantkit import pipeline
from quantkit.methods.gguf import convert as gc
from tests.clients.test_gptqmodel import GPTQ_PYTHON, clients_root, dense, dense_weights, gptqmodel_view, worker  # noqa: F401
from tests.clients.test_llamacpp import _llama_cpp_logits as llama_cpp_logits
from tests.conftest import reference_bnb
from tests.gguf_checkpoints import TEXT, make_checkpoint, train_tokenizer
from tests.test_transcode import same_values

pytestmark = pytest.mark.clients


def with_bpe_tokenizer(folder: Path, out: Path) -> Path:
    """A copy of a GPTQModel worker's folder with a byte-level BPE tokenizer of the same 320 tokens in place
    of its WordLevel one (a test stand-in, which GGUF vocabularies do not cover; real Llamas ship BPE)."""
    if not out.exists():
        shutil.copytree(folder, out)
        train_tokenizer(out, 320)
    return out


def test_gptqmodel_checkpoint_to_q4_0_runs_in_llama_cpp(dense, clients_root):  # noqa: F811
    assert GPTQ_PYTHON.exists(), f"{GPTQ_PYTHON} is missing: make test-clients installs GPTQModel there"
    theirs = clients_root / "theirs-gptq-4bit-sym-noact"
    worker("produce", theirs, "gptq", "4", "32", "sym", "noact", "gptq")
    out = clients_root / "theirs-q4_0.gguf"
    result = pipeline.convert(str(with_bpe_tokenizer(theirs, clients_root / "theirs-bpe")), out, "gguf", gguf_type="Q4_0")
    assert result.summary["requantized"] == [] and len(result.summary["lossless"]) == 7
    pipeline.dequantize(str(theirs), clients_root / "theirs-noact-dense", dtype="float32")
    source = dense_weights(clients_root / "theirs-noact-dense")
    ours = dict(gc.from_gguf(out).tensors())
    for module, seen in gptqmodel_view(theirs).items():
        name = f"{module}.weight"
        assert same_values(ours[name], source[name]), name
        # GPTQModel's own module computes the same values (in float16)
        assert np.array_equal(seen["weight"], ours[name].astype(np.float16).astype(np.float32)), name
    logits = llama_cpp_logits(out, [3, 10, 11, 12, 13])
    assert np.isfinite(logits).all() and logits.shape == (5, 320)


def test_gguf_q4_0_to_gptq_loads_in_gptqmodel(dense, clients_root):  # noqa: F811
    q4 = clients_root / "dense-q4_0.gguf"
    pipeline.convert(str(with_bpe_tokenizer(dense, clients_root / "dense-bpe")), q4, "gguf", gguf_type="Q4_0")
    out = clients_root / "from-q4_0-gptq"
    options = pipeline.quantizer_for("gptq").options(method="gptq", bits=4, group_size=32, sym=False)
    result = pipeline.quantize(str(q4), out, options)
    assert result.summary["requantized"] == [] and len(result.summary["lossless"]) == 7
    ours = dict(gc.from_gguf(q4).tensors())
    for module, seen in gptqmodel_view(out).items():
        name = f"{module}.weight"
        assert np.array_equal(seen["weight"], ours[name].astype(np.float16).astype(np.float32)), name


def test_transformers_nf4_to_q8_0_logits_in_llama_cpp(tmp_path):
    import torch
    import transformers

    src = make_checkpoint(tmp_path / "src", hidden=256, ffn=512)
    nf4 = reference_bnb(src, tmp_path / "nf4", load_in_4bit=True, bnb_4bit_quant_type="nf4")
    for f in src.glob("tokenizer*"):
        (nf4 / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "m.gguf"
    result = pipeline.convert(str(nf4), out, "gguf", gguf_type="Q8_0")
    assert result.summary["from"] == "nf4" and all(r["rel_error"] < 0.02 for r in result.summary["requantized"])
    ids = [0, *transformers.AutoTokenizer.from_pretrained(src)(TEXT[:200])["input_ids"]]
    model = transformers.AutoModelForCausalLM.from_pretrained(nf4, device_map="cpu")
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].float().numpy()
    ours = llama_cpp_logits(out, ids)
    assert np.linalg.norm(ours - expected) / np.linalg.norm(expected) < 0.05
