"""Serving formats as sources of GGUF: fine-grained FP8 and compressed-tensors (FP8, FP8 blocks, INT4, MXFP4)
checkpoints convert --to gguf through the same streamed dequantizer, so the GGUF holds exactly what
quantizing the source's dequantized (float32) values gives, tensor for tensor and byte for byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from quantkit.methods.gguf.file import read_gguf
from tests.test_transcode import bf16_llama

SOURCES = {  # name -> quantize options (the llama is 160 wide: fp8-block's ragged edges, int4 in groups of 32)
    "fp8-fine": ["--method", "fp8-block", "--layout", "fp8"],
    "ct-fp8": ["--method", "fp8"],
    "ct-w4a16": ["--method", "w4a16", "--group-size", "32"],
    "ct-mxfp4": ["--method", "mxfp4a16"],
    "ct-nvfp4": ["--method", "nvfp4a16"],
}


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return bf16_llama(tmp_path_factory.mktemp("serve-gguf") / "llama")


@pytest.fixture(scope="module")
def sources(llama, tmp_path_factory) -> dict[str, Path]:
    from typer.testing import CliRunner

    from quantkit.cli import app

    root = tmp_path_factory.mktemp("serve-sources")
    for name, options in SOURCES.items():
        result = CliRunner().invoke(app, ["quantize", str(llama), str(root / name), *options])
        assert result.exit_code == 0, result.output
    return {name: root / name for name in SOURCES}


def gguf_tensors(path: Path) -> dict[str, tuple[int, bytes]]:
    gguf = read_gguf(path)
    return {t.name: (int(t.qtype), gguf.rows(t).tobytes()) for t in gguf.tensors}


@pytest.mark.parametrize("gguf_type", ["F32", "Q8_0"])
@pytest.mark.parametrize("source", list(SOURCES))
def test_gguf_of_a_serving_checkpoint_is_its_dequantized_values_quantized(llama, sources, tmp_path, cli, source, gguf_type):
    src = sources[source]
    code, _, err = cli("convert", src, tmp_path / "direct.gguf", "--to", "gguf", "--gguf-type", gguf_type)
    assert code == 0, err
    assert "re-quantized" in err or gguf_type == "F32"
    code, _, err = cli("dequantize", src, tmp_path / "dense", "--dtype", "float32")
    assert code == 0, err
    code, _, err = cli("convert", tmp_path / "dense", tmp_path / "via-dense.gguf", "--to", "gguf", "--gguf-type", gguf_type)
    assert code == 0, err
    direct, via_dense = gguf_tensors(tmp_path / "direct.gguf"), gguf_tensors(tmp_path / "via-dense.gguf")
    assert direct.keys() == via_dense.keys() and len(direct) > 10
    assert sum(n.endswith(("attn_q.weight", "ffn_down.weight")) for n in direct) == 4  # two layers' projections are there
    for name in direct:
        assert direct[name] == via_dense[name], name
    # and those are the quantized values, not the bf16 original's
    code, _, err = cli("convert", llama, tmp_path / "original.gguf", "--to", "gguf", "--gguf-type", gguf_type)
    assert code == 0, err
    original = gguf_tensors(tmp_path / "original.gguf")
    assert original.keys() == direct.keys()
    assert all(direct[n] != original[n] for n in direct if n.endswith("attn_q.weight"))
