"""llama.cpp as the real client (through llama-cpp-python, which builds it from source).

- our block bytes == llama.cpp's own quantize_row_*_ref for the same float32 input, all seven types;
- (llama-quantize's file types and importance matrices against ours: test_llama_quantize.py);
- llama.cpp loads our GGUFs and its logits match transformers' on the source checkpoint within each
  type's error; its tokenizer splits text as transformers' (and sentencepiece) does.

Run with `make test-clients` (pytest -m clients); needs `pip install llama-cpp-python`.
"""

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from quantkit.io.source import open_checkpoint
from quantkit.methods.gguf import convert as gc
from quantkit.methods.gguf import types as ggml
from tests.gguf_checkpoints import make_checkpoint

pytestmark = pytest.mark.clients
try:
    import llama_cpp
except ImportError:  # collected by plain `make test` too (deselected there); a clients run must fail
    llama_cpp = None


@pytest.fixture(autouse=True)
def _client_installed():
    if llama_cpp is None:
        pytest.fail("llama_cpp is not installed: `make test-clients` installs llama-cpp-python (scripts/install_clients.py)")


@pytest.fixture(scope="module")
def libggml():
    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    candidates = sorted(lib_dir.glob("libggml-base.*"))
    assert candidates, f"no libggml-base in {lib_dir}"
    return ctypes.CDLL(str(candidates[0]))


def llama_cpp_quantize(lib, x: np.ndarray, qtype: Q) -> np.ndarray:
    """llama.cpp's scalar reference quantizer, the one llama-quantize runs without an importance matrix."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    block, size = GGML_QUANT_SIZES[qtype]
    out = np.zeros(x.size // block * size, dtype=np.uint8)
    fn = getattr(lib, f"quantize_row_{qtype.name.lower().replace('_k', '_K')}_ref")
    fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
    return out.reshape(-1, size)


def hard_blocks(n_rows: int, seed: int = 0) -> np.ndarray:
    """Rows of 256 meant to hit the corner cases: scales over 30 decades, heavy tails, one-signed
    blocks, few distinct values (ties), sparse blocks, zeros and constants."""
    rng = np.random.default_rng(seed)
    kinds = [
        lambda s: rng.standard_normal(s),
        lambda s: rng.standard_normal(s) * np.exp(rng.uniform(-25, 10, (s[0], 1))),
        lambda s: rng.standard_t(1.3, s),
        lambda s: np.abs(rng.standard_normal(s)) + rng.uniform(0, 3, (s[0], 1)),
        lambda s: -np.abs(rng.standard_normal(s)),
        lambda s: rng.integers(-4, 5, s) * 0.125,
        lambda s: rng.standard_normal(s) * (rng.random(s) < 0.03),
        lambda s: np.zeros(s),
        lambda s: np.full(s, rng.standard_normal()),
    ]
    per = n_rows // len(kinds)
    return np.concatenate([k((per, 256)) for k in kinds]).astype(np.float32)


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q4_K, Q.Q6_K])
def test_block_bytes_equal_llama_cpp(libggml, qtype):
    x = hard_blocks(9 * 2000)
    theirs = llama_cpp_quantize(libggml, x, qtype)
    ours = ggml.quantize(x, qtype).reshape(theirs.shape)
    differing = (ours != theirs).any(axis=1)
    print(f"{qtype.name}: {len(theirs) - differing.sum()}/{len(theirs)} blocks byte-identical to llama.cpp")
    if qtype in (Q.Q4_K, Q.Q6_K):
        assert not differing.any()
        assert ggml.TYPES[qtype].reference(x).reshape(theirs.shape).tobytes() == theirs.tobytes()
        return
    # The legacy types follow gguf-py, which differs from llama.cpp in one place only: the sign of a
    # zero float16 scale or min where the block holds -0.0 (numpy's min/argmax pick another zero
    # than C's first-wins loop). Both decode to the same values.
    assert ours.tobytes() == gguf.quants.quantize(x, qtype).reshape(theirs.shape).tobytes()
    header = 4 if qtype in (Q.Q4_1, Q.Q5_1) else 2
    assert not (ours[:, header:] != theirs[:, header:]).any()
    ours_zero = (ours[:, :header].view(np.uint16) & 0x7FFF) == 0
    assert (ours_zero | (ours[:, :header] == theirs[:, :header]).reshape(-1, header // 2, 2).all(axis=2))[differing].all()
    assert np.array_equal(gguf.quants.dequantize(ours, qtype), gguf.quants.dequantize(theirs, qtype))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ck")
    models = {f: make_checkpoint(root / f, f, seed=3) for f in ("llama", "mistral", "qwen2")}
    models["llama-tied"] = make_checkpoint(root / "tied", "llama", seed=3, tied=True)  # no output.weight
    models["llama-bias"] = make_checkpoint(root / "bias", "llama", seed=3, attention_bias=True)  # permuted biases
    return models


TEXT = "How vexingly quick daft zebras jump! In 1969, they're here: def main(argv)"
# Relative logit error (Frobenius norm) of llama.cpp on our GGUF against transformers on the source:
# the type's own error, amplified by these small random models (measured, with margin). F32 is not
# exact because llama.cpp keeps its KV cache in float16.
TO_SOURCE = {"F32": 2e-3, "F16": 5e-3, "BF16": 2e-2, "Q8_0": 5e-2, "Q6_K": 0.12, "Q5_0": 0.25, "Q5_1": 0.25,
             "Q4_K": 0.4, "Q4_0": 0.45, "Q4_1": 0.45}
# ... and against transformers running the very weights our GGUF holds (dequantized by gguf-py): what
# is left is llama.cpp's arithmetic (float16 KV cache, 8-bit activations for quantized matmuls).
TO_SAME_WEIGHTS = 5e-2


def _transformers_logits(src: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _llama_cpp_logits(path: Path, ids: list[int]) -> np.ndarray:
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=128, n_threads=2, verbose=False)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def _relative(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("family, type_name", [
    ("llama", "F32"), ("llama", "F16"), ("llama", "BF16"), ("llama", "Q8_0"), ("llama", "Q4_0"), ("llama", "Q4_1"),
    ("llama", "Q5_0"), ("llama", "Q5_1"), ("llama", "Q4_K"), ("llama", "Q6_K"),
    ("mistral", "Q8_0"), ("qwen2", "F32"), ("qwen2", "Q8_0"), ("qwen2", "Q4_K"), ("llama-tied", "Q8_0"),
    ("llama-bias", "F32"), ("llama-bias", "Q6_K"),
])  # fmt: skip
def test_llama_cpp_logits_match_transformers(checkpoints, tmp_path, family, type_name):
    from transformers import AutoTokenizer

    src = checkpoints[family]
    out = tmp_path / "model.gguf"
    gc.to_gguf(open_checkpoint(src), out, type_name)
    gc.gguf_to_safetensors(out, tmp_path / "same_weights")
    ids = [0, *AutoTokenizer.from_pretrained(src)(TEXT)["input_ids"]]
    ours = _llama_cpp_logits(out, ids)
    to_source = _relative(ours, _transformers_logits(src, ids))
    to_same = _relative(ours, _transformers_logits(tmp_path / "same_weights", ids))
    print(f"{family} {type_name}: relative logit error {to_source:.2e} to the source, "
          f"{to_same:.2e} to the same weights, over {len(ids)} tokens")
    assert to_source < TO_SOURCE[type_name]
    assert to_same < TO_SAME_WEIGHTS


def test_llama_cpp_tokenizes_like_transformers(checkpoints, tmp_path):
    from transformers import AutoTokenizer

    out = tmp_path / "model.gguf"
    gc.to_gguf(open_checkpoint(checkpoints["llama"]), out, Q.Q8_0)
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    try:
        ours = llm.tokenize(TEXT.encode(), add_bos=False, special=False)
        assert llm.token_bos() == 0 and llm.token_eos() == 1
    finally:
        llm.close()
    assert ours == AutoTokenizer.from_pretrained(checkpoints["llama"])(TEXT)["input_ids"]


def test_llama_cpp_reads_our_sentencepiece_vocab(tmp_path):
    import sentencepiece

    from tests.gguf_checkpoints import train_sentencepiece

    src = make_checkpoint(tmp_path / "spm", "llama", hidden=64, ffn=128, vocab=320)
    train_sentencepiece(src, 320)
    out = tmp_path / "model.gguf"
    gc.to_gguf(open_checkpoint(src), out, Q.F16)
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    try:
        ours = llm.tokenize(TEXT.encode(), add_bos=False, special=False)
        assert (llm.token_bos(), llm.token_eos()) == (1, 2)
    finally:
        llm.close()
    assert ours == sentencepiece.SentencePieceProcessor(model_file=str(src / "tokenizer.model")).encode(TEXT)


@pytest.mark.parametrize("ftype", ["MOSTLY_Q2_K", "MOSTLY_Q3_K_M", "MOSTLY_Q4_K_M", "MOSTLY_Q5_K_M", "MOSTLY_IQ4_NL"])
def test_gguf_files_llama_quantize_writes_come_back_as_the_same_model(checkpoints, tmp_path, ftype):
    """GGUF -> safetensors on llama.cpp's own mixes (Q2_K ... Q6_K, IQ4_NL): transformers on our dense
    output computes what llama.cpp computes on the GGUF."""
    from transformers import AutoTokenizer

    from quantkit.methods.gguf import file as gf

    src = checkpoints["llama"]
    f32, quantized = tmp_path / "f32.gguf", tmp_path / "q.gguf"
    gc.to_gguf(open_checkpoint(src), f32, Q.F32)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(gguf.LlamaFileType, ftype))
    params.nthread = 2
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(quantized).encode(), ctypes.byref(params)) == 0
    types = {t.qtype.name for t in gf.read_gguf(quantized).tensors}
    gc.gguf_to_safetensors(quantized, tmp_path / "dense")
    ids = [0, *AutoTokenizer.from_pretrained(tmp_path / "dense")(TEXT)["input_ids"]]
    rel = _relative(_llama_cpp_logits(quantized, ids), _transformers_logits(tmp_path / "dense", ids))
    print(f"{ftype} ({', '.join(sorted(types))}): relative logit error {rel:.2e} between llama.cpp and "
          "transformers on our dense output")
    assert rel < TO_SAME_WEIGHTS


def test_llama_cpp_splits_like_transformers_with_llama3_pre_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    from tests.gguf_checkpoints import use_llama3_pre_tokenizer

    src = make_checkpoint(tmp_path / "src", "llama", hidden=64, ffn=128)
    use_llama3_pre_tokenizer(src)
    out = tmp_path / "model.gguf"
    gc.to_gguf(open_checkpoint(src), out, Q.F16)
    text = TEXT + " 12345 I'd\n\n  x"
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    try:
        ours = llm.tokenize(text.encode(), add_bos=False, special=False)
    finally:
        llm.close()
    assert ours == AutoTokenizer.from_pretrained(src)(text)["input_ids"]
