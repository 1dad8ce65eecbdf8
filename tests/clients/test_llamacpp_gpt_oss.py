"""llama.cpp as the client for gpt-oss GGUFs made from an MXFP4 release (quant_method "mxfp4", the experts as
`*_blocks` / `*_scales`; the tiny release of tests/releases.py):

- llama.cpp's own converter (convert_hf_to_gguf.py, vendored by the llama-cpp-python sdist) writes, at each
  of its float and Q8_0 outtypes, the tensors (names, types, shapes, bytes: the experts' MXFP4 blocks too)
  and the gpt-oss metadata we write, from config.json as transformers 5 saves it and as the Hub has it;
- llama.cpp (llama-cpp-python) loads our GGUF and its logits match transformers' GptOssForCausalLM on the
  release dequantized (quantkit's dequantization equals transformers' own, tests/test_fp8_mxfp4.py).
"""

import subprocess
import sys

import pytest

from quantkit.methods.gguf import file as gf
from tests.clients.test_llama_quantize import assert_same_file
from tests.clients.test_llamacpp_moe import CONVERTER, LLAMA_CPP
from tests.gguf_checkpoints import TEXT
from tests.releases import gpt_oss_mxfp4, hub_style

pytestmark = pytest.mark.clients
OURS_ONLY = {"gpt-oss.vocab_size", "gpt-oss.rope.dimension_count"}  # llama.cpp's defaults, written by us


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return gpt_oss_mxfp4(tmp_path_factory.mktemp("gpt_oss") / "release")


@pytest.mark.parametrize("outtype, style", [("f32", "saved"), ("f16", "saved"), ("bf16", "saved"), ("q8_0", "saved"),
                                            ("q8_0", "hub")])
def test_llama_cpp_converter_writes_what_we_write(release, cli, tmp_path, outtype, style):
    assert (LLAMA_CPP / "convert_hf_to_gguf.py").exists(), f"{LLAMA_CPP} is missing: run scripts/install_clients.py"
    release = hub_style(release, tmp_path / "hub") if style == "hub" else release
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    run = subprocess.run([sys.executable, "-c", CONVERTER.format(root=str(LLAMA_CPP)), str(release), "--outtype", outtype,
                          "--outfile", str(theirs)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    code, _, err = cli("convert", release, ours, "--to", "gguf", "--gguf-type", outtype.upper())
    assert code == 0, err
    types = assert_same_file(ours, theirs)
    assert sum(q.name == "MXFP4" for q in types.values()) == 6
    a, b = gf.read_gguf(ours).metadata, gf.read_gguf(theirs).metadata
    mine = {k: v for k, v in a.items() if k.startswith("gpt-oss.")}
    their_meta = {k: v for k, v in b.items() if k.startswith("gpt-oss.")}
    assert set(mine) - set(their_meta) == OURS_ONLY and set(their_meta) <= set(mine)
    assert {k: mine[k] for k in their_meta} == their_meta
    print(f"gpt-oss {outtype} ({style} config): {len(types)} tensors byte-identical to llama.cpp's converter, {len(their_meta)} metadata keys equal")


# Relative logit error (Frobenius norm) of llama.cpp on our GGUF against transformers on the dequantized
# release (measured 3.3e-2 F32, 3.3e-2 F16, 1.7e-2 BF16, 4.2e-2 Q8_0, with margin): the experts are the same
# values in both; what differs is the other tensors' type and llama.cpp's arithmetic (8-bit activations
# against MXFP4 and Q8_0 weights), which routing amplifies. Gate and up biases swapped measure 1.2e-1.
TO_SOURCE = {"F32": 5e-2, "F16": 5e-2, "BF16": 5e-2, "Q8_0": 7e-2}


@pytest.mark.parametrize("type_name", TO_SOURCE)
def test_llama_cpp_logits_match_transformers(tmp_path, cli, type_name):
    from transformers import AutoTokenizer

    from tests.clients.test_llamacpp import _llama_cpp_logits, _relative, _transformers_logits, llama_cpp

    assert llama_cpp is not None, "llama_cpp is not installed: `make test-clients` installs llama-cpp-python"
    # scales near 2**-6 give weights of a trained model's spread (the module fixture's span every code)
    src = gpt_oss_mxfp4(tmp_path / "release", codes=(119, 124), every_code=False)
    code, _, err = cli("dequantize", src, tmp_path / "dense", "--dtype", "float32")
    assert code == 0, err
    out = tmp_path / "model.gguf"
    code, _, err = cli("convert", src, out, "--to", "gguf", "--gguf-type", type_name)
    assert code == 0, err
    ids = [0, *AutoTokenizer.from_pretrained(src)(TEXT[:200])["input_ids"]]
    ours = _llama_cpp_logits(out, ids)
    error = _relative(ours, _transformers_logits(tmp_path / "dense", ids))
    print(f"gpt-oss {type_name}: relative logit error {error:.2e} to transformers on the dequantized release, "
          f"over {len(ids)} tokens")
    assert error < TO_SOURCE[type_name]
