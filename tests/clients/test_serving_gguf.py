"""Serving checkpoints (fine-grained FP8, compressed-tensors FP8 and MXFP4) converted --to gguf run in
llama.cpp, and its logits stay close to transformers' on the same checkpoint dequantized (float32): what
is left is Q8_0's rounding and llama.cpp's own arithmetic. Run with `make test-clients`."""

from __future__ import annotations

import numpy as np
import pytest

from quantkit import pipeline
from quantkit.methods.ct.quantizer import CtOptions
from quantkit.methods.fp8.quantizer import Fp8FineOptions
from tests.clients.test_llamacpp import _client_installed  # noqa: F401  (fails the test where llama_cpp is missing)
from tests.clients.test_llamacpp import _llama_cpp_logits as llama_cpp_logits
from tests.gguf_checkpoints import TEXT, make_checkpoint

pytestmark = pytest.mark.clients
SOURCES = {"fp8-fine": Fp8FineOptions(method="fp8-fine"), "fp8": CtOptions(method="fp8"), "mxfp4a16": CtOptions(method="mxfp4a16")}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("serving") / "llama", hidden=256, ffn=512)


@pytest.mark.parametrize("source", list(SOURCES))
def test_serving_checkpoint_to_q8_0_runs_in_llama_cpp(llama, tmp_path, source):
    import torch
    import transformers

    pipeline.quantize(str(llama), tmp_path / "src", SOURCES[source])
    for f in llama.glob("tokenizer*"):
        (tmp_path / "src" / f.name).write_bytes(f.read_bytes())
    out = tmp_path / "m.gguf"
    result = pipeline.convert(str(tmp_path / "src"), out, "gguf", gguf_type="Q8_0")
    assert result.summary["requantized"] and all(r["rel_error"] < 0.02 for r in result.summary["requantized"])
    pipeline.dequantize(str(tmp_path / "src"), tmp_path / "dense", dtype="float32")
    ids = [0, *transformers.AutoTokenizer.from_pretrained(llama)(TEXT[:200])["input_ids"]]
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0].float().numpy()
    ours = llama_cpp_logits(out, ids)
    relative = np.linalg.norm(ours - expected) / np.linalg.norm(expected)
    print(f"{source} -> Q8_0: relative logit error {relative:.2e} against transformers on the dequantized checkpoint")
    assert relative < 0.05
