"""llama.cpp as the client for gpt-oss GGUFs made from an MXFP4 release (quant_method "mxfp4", the experts as
`*_blocks` / `*_scales`; the tiny release of tests/releases.py) and from a dense gpt-oss checkpoint (that release
dequantized to bfloat16 by quantkit, as bf16 releases store their experts: fused gate_up [E, in, 2 * out]):

- llama.cpp's own converter (convert_hf_to_gguf.py, vendored by the llama-cpp-python sdist) writes, at each
  of its float and Q8_0 outtypes, the tensors (names, types, shapes, bytes: the experts' MXFP4 blocks, or the
  dense experts split and turned) and the gpt-oss metadata we write, from config.json as transformers 5
  saves it and as the Hub has it;
- from the dense checkpoint, every file type: our tensor types and bytes == what `llama-quantize` writes from
  our F32 GGUF, with an importance matrix `llama-imatrix` computed too;
- llama.cpp (llama-cpp-python) loads our GGUF and its logits match transformers' GptOssForCausalLM on the
  release dequantized (quantkit's dequantization equals transformers' own, tests/test_fp8_mxfp4.py).
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q

from quantkit.io.source import open_checkpoint
from quantkit.methods.gguf import convert as gc
from quantkit.methods.gguf import file as gf
from quantkit.methods.gguf.imatrix import read_imatrix
from quantkit.methods.gguf.types import IGNORES_IMPORTANCE
from tests.clients.test_llama_quantize import (
    FILE_TYPES,
    assert_like_llama_quantize,
    assert_same_file,
    llama_imatrix,
    llama_quantize,
)
from tests.clients.test_llamacpp_moe import CONVERTER, LLAMA_CPP
from tests.gguf_checkpoints import TEXT
from tests.releases import gpt_oss_mxfp4, hub_style

pytestmark = pytest.mark.clients
OURS_ONLY = {"gpt-oss.vocab_size", "gpt-oss.rope.dimension_count"}  # llama.cpp's defaults, written by us


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    return gpt_oss_mxfp4(tmp_path_factory.mktemp("gpt_oss") / "release")


def _dequantized(src: Path, out: Path, dtype: str = "bfloat16") -> Path:
    from typer.testing import CliRunner

    from quantkit.cli import app

    result = CliRunner().invoke(app, ["dequantize", str(src), str(out), "--dtype", dtype])
    assert result.exit_code == 0, result.stderr
    return out


@pytest.fixture(scope="module")
def dense(release, tmp_path_factory):
    """The release dequantized to bfloat16: a dense gpt-oss checkpoint, its scales spanning every code."""
    return _dequantized(release, tmp_path_factory.mktemp("gpt_oss_dense") / "dense")


def _assert_converter_writes_what_we_write(src: Path, cli, tmp_path: Path, outtype: str) -> dict[str, Q]:
    """llama.cpp's convert_hf_to_gguf.py and `quantkit convert` on `src`: byte-identical tensors, the same
    gpt-oss metadata (besides the keys we write with llama.cpp's defaults). Returns each tensor's type."""
    assert (LLAMA_CPP / "convert_hf_to_gguf.py").exists(), f"{LLAMA_CPP} is missing: run scripts/install_clients.py"
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    run = subprocess.run([sys.executable, "-c", CONVERTER.format(root=str(LLAMA_CPP)), str(src), "--outtype", outtype,
                          "--outfile", str(theirs)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    code, _, err = cli("convert", src, ours, "--to", "gguf", "--gguf-type", outtype.upper())
    assert code == 0, err
    types = assert_same_file(ours, theirs)
    a, b = gf.read_gguf(ours).metadata, gf.read_gguf(theirs).metadata
    mine = {k: v for k, v in a.items() if k.startswith("gpt-oss.")}
    their_meta = {k: v for k, v in b.items() if k.startswith("gpt-oss.")}
    assert set(mine) - set(their_meta) == OURS_ONLY and set(their_meta) <= set(mine)
    assert {k: mine[k] for k in their_meta} == their_meta
    print(f"gpt-oss {src.parent.name}/{src.name} {outtype}: {len(types)} tensors byte-identical to llama.cpp's converter, "
          f"{len(their_meta)} metadata keys equal")
    return types


STYLES = [("f32", "saved"), ("f16", "saved"), ("bf16", "saved"), ("q8_0", "saved"), ("q8_0", "hub")]


@pytest.mark.parametrize("outtype, style", STYLES)
def test_llama_cpp_converter_writes_what_we_write(release, cli, tmp_path, outtype, style):
    release = hub_style(release, tmp_path / "hub") if style == "hub" else release
    types = _assert_converter_writes_what_we_write(release, cli, tmp_path, outtype)
    assert sum(q.name == "MXFP4" for q in types.values()) == 6


@pytest.mark.parametrize("outtype, style", STYLES)
def test_llama_cpp_converter_writes_what_we_write_from_dense(release, dense, cli, tmp_path, outtype, style):
    src = _dequantized(hub_style(release, tmp_path / "hub"), tmp_path / "dense") if style == "hub" else dense
    assert "quantization_config" not in json.loads((src / "config.json").read_text())
    types = _assert_converter_writes_what_we_write(src, cli, tmp_path, outtype)
    experts = {q for name, q in types.items() if "_exps.weight" in name}
    assert experts == {Q[outtype.upper()]}


@pytest.fixture(scope="module")
def trained_spread(tmp_path_factory):
    """(a dense gpt-oss checkpoint whose experts have a trained model's spread, our F32 GGUF of it): llama-quantize
    refuses the inf that the module release's largest scales make in 8-bit blocks."""
    root = tmp_path_factory.mktemp("gpt_oss_spread")
    src = _dequantized(gpt_oss_mxfp4(root / "release", codes=(119, 124), every_code=False), root / "dense")
    gc.to_gguf(open_checkpoint(src), root / "f32.gguf", "F32")
    return src, root / "f32.gguf"


@pytest.mark.parametrize("file_type", FILE_TYPES)
def test_dense_file_types_equal_llama_quantize(trained_spread, tmp_path, file_type):
    types, fallbacks = assert_like_llama_quantize(*trained_spread, tmp_path, file_type)
    exps = sorted({q.name for n, q in types.items() if "_exps.weight" in n})
    print(f"dense gpt-oss {file_type}: {len(types)} tensors equal, experts as {', '.join(exps)}, {fallbacks} fallbacks")


@pytest.mark.parametrize("file_type", ["Q4_K_M", "IQ4_XS"])
def test_dense_imatrix_equals_llama_quantize(trained_spread, tmp_path, file_type):
    src, f32 = trained_spread
    imatrix = llama_imatrix(f32, tmp_path / "imatrix.gguf")
    weights = read_imatrix(imatrix)
    assert {n for n in weights.weights if "_exps" in n} == {f"blk.{i}.ffn_{r}_exps.weight" for i in range(2) for r in ("gate", "up", "down")}
    llama_quantize(f32, tmp_path / "theirs.gguf", file_type, "--imatrix", str(imatrix))
    gc.to_gguf(open_checkpoint(src), tmp_path / "ours.gguf", file_type, imatrix=weights)
    assert_same_file(tmp_path / "ours.gguf", tmp_path / "theirs.gguf")
    # the weights changed every expert tensor whose type uses them (Q8_0, a fallback of rows of 192, does not)
    gc.to_gguf(open_checkpoint(src), tmp_path / "plain.gguf", file_type)
    plain, weighted = gf.read_gguf(tmp_path / "plain.gguf"), gf.read_gguf(tmp_path / "ours.gguf")
    experts = [(t, w) for t, w in zip(plain.tensors, weighted.tensors, strict=True) if "_exps.weight" in t.name]
    changed = {t.name for t, w in experts if plain.rows(t).tobytes() != weighted.rows(w).tobytes()}
    assert len(changed) >= 4 and changed == {t.name for t, _ in experts if t.qtype not in IGNORES_IMPORTANCE}


# Relative logit error (Frobenius norm) of llama.cpp on our GGUF against transformers on the dequantized
# release (measured 3.3e-2 F32, 3.3e-2 F16, 1.7e-2 BF16, 4.2e-2 Q8_0, with margin): the experts are the same
# values in both; what differs is the other tensors' type and llama.cpp's arithmetic (8-bit activations
# against MXFP4 and Q8_0 weights), which routing amplifies. Gate and up biases swapped measure 1.2e-1.
# From the dense (float32) checkpoint, the experts at the file's type (measured 3.5e-4 F32, 7.0e-4 F16, 4.8e-3
# BF16, 5.2e-2 Q8_0): float experts are computed as transformers does (no 8-bit activations, which MXFP4 weights
# get), so only the type's rounding shows.
TO_SOURCE = {("release", "F32"): 5e-2, ("release", "F16"): 5e-2, ("release", "BF16"): 5e-2, ("release", "Q8_0"): 7e-2,
             ("dense", "F32"): 2e-3, ("dense", "F16"): 3e-3, ("dense", "BF16"): 2e-2, ("dense", "Q8_0"): 8e-2}


@pytest.mark.parametrize("source, type_name", TO_SOURCE)
def test_llama_cpp_logits_match_transformers(tmp_path, cli, source, type_name):
    from transformers import AutoTokenizer

    from tests.clients.test_llamacpp import _llama_cpp_logits, _relative, _transformers_logits, llama_cpp

    assert llama_cpp is not None, "llama_cpp is not installed: `make test-clients` installs llama-cpp-python"
    # scales near 2**-6 give weights of a trained model's spread (the module fixture's span every code)
    src = gpt_oss_mxfp4(tmp_path / "release", codes=(119, 124), every_code=False)
    dense = _dequantized(src, tmp_path / "dense", "float32")
    out = tmp_path / "model.gguf"
    code, _, err = cli("convert", src if source == "release" else dense, out, "--to", "gguf", "--gguf-type", type_name)
    assert code == 0, err
    ids = [0, *AutoTokenizer.from_pretrained(src)(TEXT[:200])["input_ids"]]
    ours = _llama_cpp_logits(out, ids)
    error = _relative(ours, _transformers_logits(dense, ids))
    print(f"gpt-oss from the {source} {type_name}: relative logit error {error:.2e} to transformers on the dequantized "
          f"release, over {len(ids)} tokens")
    assert error < TO_SOURCE[source, type_name]
