"""llama.cpp as the client for mixture-of-experts GGUFs (mixtral, qwen2_moe, qwen3_moe), from bfloat16
checkpoints transformers 5 saved with one tensor per expert:

- llama.cpp's own converter (convert_hf_to_gguf.py, vendored in the llama-cpp-python sdist) writes the same
  F32 tensors and the same expert metadata as ours;
- every file type: our tensor types and bytes == what `llama-quantize` writes from our F32 GGUF, on each
  family with 4 experts and on an 8-expert, 8-layer Mixtral (llama.cpp's rules for 8 experts), with an
  importance matrix that `llama-imatrix` computed (per expert) too;
- llama.cpp loads our GGUF of each family and its logits match transformers' on the source within each
  type's bound.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from quantkit.io.source import open_checkpoint
from quantkit.methods.gguf import convert as gc
from quantkit.methods.gguf import file as gf
from quantkit.methods.gguf.imatrix import read_imatrix
from tests.clients.test_llama_quantize import (
    FILE_TYPES,
    assert_like_llama_quantize,
    assert_same_file,
    llama_imatrix,
    llama_quantize,
)
from tests.gguf_checkpoints import TEXT
from tests.moe_checkpoints import FAMILIES, make_moe_checkpoint

pytestmark = pytest.mark.clients
LLAMA_CPP = Path(__file__).resolve().parents[2] / ".clients" / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
MODELS = [*FAMILIES, "mixtral8"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """family -> (bfloat16 checkpoint, our F32 GGUF of it)."""
    root = tmp_path_factory.mktemp("moe")
    found = {}
    for name in MODELS:
        if name == "mixtral8":
            src = make_moe_checkpoint(root / name, "mixtral", seed=2, layers=8, num_local_experts=8)
        else:
            src = make_moe_checkpoint(root / name, name, seed=1)
        gc.to_gguf(open_checkpoint(src), root / f"{name}-f32.gguf", "F32")
        found[name] = (src, root / f"{name}-f32.gguf")
    return found


# llama.cpp's converter refuses a BPE pre-tokenizer it does not know (ours is freshly trained): name it gpt-2
CONVERTER = """
import sys
sys.path[:0] = [{root!r}, {root!r} + "/gguf-py"]
import convert_hf_to_gguf
from conversion import base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", *sys.argv[1:]]
convert_hf_to_gguf.main()
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_converter_writes_the_same_tensors_and_expert_metadata(models, tmp_path, family):
    src, ours = models[family]
    assert (LLAMA_CPP / "convert_hf_to_gguf.py").exists(), f"{LLAMA_CPP} is missing: run scripts/install_clients.py"
    theirs = tmp_path / "theirs.gguf"
    run = subprocess.run([sys.executable, "-c", CONVERTER.format(root=str(LLAMA_CPP)), str(src), "--outtype", "f32",
                          "--outfile", str(theirs)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert_same_file(ours, theirs)
    a, b = gf.read_gguf(ours).metadata, gf.read_gguf(theirs).metadata
    arch = a["general.architecture"]
    keys = {k for k in a.keys() | b.keys() if k.startswith(f"{arch}.") and k not in (f"{arch}.vocab_size", f"{arch}.rope.dimension_count")}
    assert any("expert" in k for k in keys)
    assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}


@pytest.mark.parametrize("file_type", FILE_TYPES)
@pytest.mark.parametrize("model", MODELS)
def test_moe_file_types_equal_llama_quantize(models, tmp_path, model, file_type):
    types, fallbacks = assert_like_llama_quantize(*models[model], tmp_path, file_type)
    exps = sorted({q.name for n, q in types.items() if "_exps" in n})
    print(f"{model} {file_type}: {len(types)} tensors equal, experts as {', '.join(exps)}, {fallbacks} fallbacks")


@pytest.mark.parametrize("model", ["qwen3_moe", "mixtral", "qwen2_moe"])  # mixtral8: Q5_K, not yet weighted
def test_moe_imatrix_q4_k_m_equals_llama_quantize(models, tmp_path, model):
    src, f32 = models[model]
    imatrix = llama_imatrix(f32, tmp_path / "imatrix.gguf")
    assert any("_exps" in name for name in read_imatrix(imatrix).weights)
    llama_quantize(f32, tmp_path / "theirs.gguf", "Q4_K_M", "--imatrix", str(imatrix))
    gc.to_gguf(open_checkpoint(src), tmp_path / "ours.gguf", "Q4_K_M", imatrix=read_imatrix(imatrix))
    assert_same_file(tmp_path / "ours.gguf", tmp_path / "theirs.gguf")


# Relative logit error (Frobenius norm) of llama.cpp on our GGUF against transformers on the bfloat16 source
# (measured, with margin): the weights' own error, which routing amplifies in these small random models (a
# weight error that changes a token's top-2 experts changes that token's output wholesale; transformers on
# our dequantized weights shows the same error) ...
TO_SOURCE = {"F32": 2e-3, "F16": 5e-3, "Q8_0": 0.1, "Q4_K_M": 0.4}
# ... and against transformers running the very weights our GGUF holds: llama.cpp's arithmetic alone
TO_SAME_WEIGHTS = 5e-2


@pytest.mark.parametrize("type_name", TO_SOURCE)
@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_logits_match_transformers(models, tmp_path, family, type_name):
    from tests.clients.test_llamacpp import _llama_cpp_logits, _relative, _transformers_logits, llama_cpp

    assert llama_cpp is not None, "llama_cpp is not installed: `make test-clients` installs llama-cpp-python"
    from transformers import AutoTokenizer

    src = models[family][0]
    out = tmp_path / "model.gguf"
    gc.to_gguf(open_checkpoint(src), out, type_name)
    gc.gguf_to_safetensors(out, tmp_path / "same_weights", dtype="float32")
    ids = [0, *AutoTokenizer.from_pretrained(src)(TEXT[:200])["input_ids"]]
    ours = _llama_cpp_logits(out, ids)
    to_source = _relative(ours, _transformers_logits(src, ids))
    to_same = _relative(ours, _transformers_logits(tmp_path / "same_weights", ids))
    print(f"{family} {type_name}: relative logit error {to_source:.2e} to the source, {to_same:.2e} to the same "
          f"weights, over {len(ids)} tokens")
    assert to_source < TO_SOURCE[type_name]
    assert to_same < TO_SAME_WEIGHTS
