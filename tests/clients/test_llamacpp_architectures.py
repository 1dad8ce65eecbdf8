"""llama.cpp on GGUFs of qwen3, gemma2, gemma3 (text) and phi3 as quantkit writes them:

- llama-quantize loads our F32 GGUF of each (so llama.cpp accepts its names, shapes and metadata) and, for
  each file type, writes the tensor types and bytes `quantkit convert --gguf-type T` writes: the mixes follow
  llama.cpp's rules on each architecture (gemma's tied embeddings, phi3's fused attn_qkv counted as attn_v),
  on the test models (widths 320 / 576, whose rows do not hold 256-blocks) and on widths of 256 / 512;
- llama.cpp's own converter (convert_hf_to_gguf.py, vendored by the llama-cpp-python sdist) writes, from the
  same checkpoint, the tensors (names, shapes, types, bytes) and architecture metadata we write, and our
  GGUF -> safetensors of its file gives back the source tensors;
- llama.cpp (llama-cpp-python) on our GGUFs computes the logits transformers computes on the source, within
  each type's bound, and those of transformers on our GGUF converted back (the same weights).
Run with `make test-clients` (pytest -m clients).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.io.source import open_checkpoint
from quantkit.methods.gguf import convert as gc
from quantkit.methods.gguf import file as gf
from tests.clients import test_llamacpp as lc
from tests.clients.test_llama_quantize import assert_like_llama_quantize, assert_same_file
from tests.gguf_checkpoints import ARCH_MODELS, make_arch_checkpoint, train_sentencepiece

pytestmark = pytest.mark.clients
FAMILIES = list(ARCH_MODELS)
WIDTHS = {"w320": {}, "w256": dict(hidden=256, ffn=512)}
MIX_TYPES = ["Q2_K", "Q3_K_M", "Q4_K_S", "Q4_K_M", "Q5_K_M", "Q6_K", "IQ4_XS", "Q8_0"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(family, width) -> (source folder, its F32 GGUF by quantkit)."""
    root = tmp_path_factory.mktemp("arch")
    found = {}
    for family in FAMILIES:
        for width, changes in WIDTHS.items():
            # general.name comes from the folder; llama.cpp gives a model whose name holds "phi3" the special
            # tokens of Phi-3's vocabulary (<unk>, <|endoftext|>), failing to load without them: not ours
            src = make_arch_checkpoint(root / f"m{len(found)}-{width}", family, **changes)
            gc.to_gguf(open_checkpoint(src), root / f"{family}-{width}.gguf", "F32")
            found[family, width] = (src, root / f"{family}-{width}.gguf")
    return found


@pytest.mark.parametrize("file_type", MIX_TYPES)
@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("family", FAMILIES)
def test_file_types_equal_llama_quantize(models, tmp_path, family, width, file_type):
    types, fallbacks = assert_like_llama_quantize(*models[family, width], tmp_path, file_type)
    print(f"{family} {width} {file_type}: {len(types)} tensors equal "
          f"({', '.join(sorted({q.name for q in types.values()}))}), {fallbacks} fallbacks")


# Relative logit error bounds to the source (the test models' widths give Q4_K_M as Q5_0 / Q8_0 by fallback)
TO_SOURCE = {**lc.TO_SOURCE, "Q4_K_M": 0.45}


@pytest.mark.parametrize("type_name", ["F32", "F16", "Q8_0", "Q4_K_M"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("width", list(WIDTHS))
def test_llama_cpp_logits_match_transformers(models, tmp_path, family, type_name, width):
    from transformers import AutoTokenizer

    if lc.llama_cpp is None:
        pytest.fail("llama_cpp is not installed: `make test-clients` installs llama-cpp-python (scripts/install_clients.py)")
    src, _ = models[family, width]
    out = tmp_path / "model.gguf"
    gc.to_gguf(open_checkpoint(src), out, type_name)
    gc.gguf_to_safetensors(out, tmp_path / "same_weights")
    ids = [0, *AutoTokenizer.from_pretrained(src)(lc.TEXT)["input_ids"]]
    ours = lc._llama_cpp_logits(out, ids)
    to_source = lc._relative(ours, lc._transformers_logits(src, ids))
    to_same = lc._relative(ours, lc._transformers_logits(tmp_path / "same_weights", ids))
    print(f"{family} {width} {type_name}: relative logit error {to_source:.2e} to the source, "
          f"{to_same:.2e} to the same weights, over {len(ids)} tokens")
    assert to_source < TO_SOURCE[type_name]
    assert to_same < lc.TO_SAME_WEIGHTS


LLAMA_CPP = Path(__file__).resolve().parents[2] / ".clients" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
# metadata llama.cpp's converter writes that we leave out: phi3's sliding window 0 ("none", its default)
THEIRS_ONLY = {"phi3.attention.sliding_window": 0}


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_converter_writes_what_we_write_and_we_read_it_back(tmp_path, family):
    """Their converter needs a sentencepiece tokenizer.model for gemma2 and phi3 (and recognises no
    freshly trained BPE), so these models carry one."""
    from safetensors.torch import load_file

    script = LLAMA_CPP / "convert_hf_to_gguf.py"
    assert script.exists(), f"{script} is missing: run scripts/install_clients.py (make test-clients)"
    src = make_arch_checkpoint(tmp_path / "m", family)
    train_sentencepiece(src, 320)
    theirs, ours = tmp_path / "theirs.gguf", tmp_path / "ours.gguf"
    run = subprocess.run([sys.executable, str(script), str(src), "--outfile", str(theirs), "--outtype", "f32"],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(LLAMA_CPP / "gguf-py")})
    assert run.returncode == 0, run.stderr[-3000:]
    gc.to_gguf(open_checkpoint(src), ours, "F32")
    types = assert_same_file(ours, theirs)
    a, b = gf.read_gguf(ours).metadata, gf.read_gguf(theirs).metadata
    mine = {k: v for k, v in a.items() if k.startswith(f"{family}.")}
    theirs_meta = {k: v for k, v in b.items() if k.startswith(f"{family}.")}
    assert {k: v for k, v in theirs_meta.items() if k not in mine} == {k: v for k, v in THEIRS_ONLY.items() if k in theirs_meta}
    assert {k: v for k, v in mine.items() if k in theirs_meta} == {k: v for k, v in theirs_meta.items() if k in mine}
    gc.gguf_to_safetensors(theirs, tmp_path / "back")
    source, back = load_file(src / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert source.keys() == back.keys()
    assert all(back[name].equal(values) for name, values in source.items())
    print(f"{family}: {len(types)} tensors byte-identical to llama.cpp's converter, {len(theirs_meta)} metadata keys "
          f"of theirs ({', '.join(sorted(set(mine) - set(theirs_meta))) or 'none'} ours only); read back exactly")
