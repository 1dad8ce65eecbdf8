"""llama.cpp on GGUFs of qwen3, gemma2, gemma3 (text) and phi3 as quantkit writes them:

- llama-quantize loads our F32 GGUF of each (so llama.cpp accepts its names, shapes and metadata) and, for
  each file type, writes the tensor types and bytes `quantkit convert --gguf-type T` writes: the mixes follow
  llama.cpp's rules on each architecture (gemma's tied embeddings, phi3's fused attn_qkv counted as attn_v),
  on the test models (widths 320 / 576, whose rows do not hold 256-blocks) and on widths of 256 / 512;
- llama.cpp (llama-cpp-python) on our GGUFs computes the logits transformers computes on the source, within
  each type's bound, and those of transformers on our GGUF converted back (the same weights).
Run with `make test-clients` (pytest -m clients).
"""

from __future__ import annotations

import pytest

from quantkit.io.source import open_checkpoint
from quantkit.methods.gguf import convert as gc
from tests.clients import test_llamacpp as lc
from tests.clients.test_llama_quantize import assert_same_file, llama_quantize
from tests.gguf_checkpoints import ARCH_MODELS, make_arch_checkpoint

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
            src = make_arch_checkpoint(root / f"{family}-{width}", family, **changes)
            gc.to_gguf(open_checkpoint(src), root / f"{family}-{width}.gguf", "F32")
            found[family, width] = (src, root / f"{family}-{width}.gguf")
    return found


@pytest.mark.parametrize("file_type", MIX_TYPES)
@pytest.mark.parametrize("width", list(WIDTHS))
@pytest.mark.parametrize("family", FAMILIES)
def test_file_types_equal_llama_quantize(models, tmp_path, family, width, file_type):
    src, f32 = models[family, width]
    log = llama_quantize(f32, tmp_path / "theirs.gguf", file_type)
    report = gc.to_gguf(open_checkpoint(src), tmp_path / "ours.gguf", file_type)
    types = assert_same_file(tmp_path / "ours.gguf", tmp_path / "theirs.gguf")
    assert len(report.fallbacks) == log.count("falling back to")
    print(f"{family} {width} {file_type}: {len(types)} tensors equal "
          f"({', '.join(sorted({q.name for q in types.values()}))}), {len(report.fallbacks)} fallbacks")


# Relative logit error bounds to the source (the test models' widths give Q4_K_M as Q5_0 / Q8_0 by fallback)
TO_SOURCE = {**lc.TO_SOURCE, "Q4_K_M": 0.3}


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
