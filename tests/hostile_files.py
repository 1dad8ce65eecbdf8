"""Small checkpoints built with numpy alone (no transformers), and the means to damage them, for the
hostile-input and output-safety tests."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "tie_word_embeddings": False, "hidden_size": 64,
          "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
          "vocab_size": 32, "rms_norm_eps": 1e-5, "max_position_embeddings": 64}


def tiny_tensors(layers: int = 2, hidden: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tensors = {"model.embed_tokens.weight": rng.standard_normal((32, hidden), dtype=np.float32)}
    for i in range(layers):
        for leaf in ("up_proj", "down_proj"):
            tensors[f"model.layers.{i}.mlp.{leaf}.weight"] = rng.standard_normal((hidden, hidden), dtype=np.float32)
    tensors["lm_head.weight"] = rng.standard_normal((32, hidden), dtype=np.float32)
    return tensors


def write_checkpoint(folder: Path, tensors: dict[str, np.ndarray], shards: int = 1, config: dict = CONFIG) -> Path:
    """A safetensors checkpoint folder: config.json, one shard or `shards` shards and their index."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    names = list(tensors)
    if shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
        return folder
    weight_map = {}
    for i in range(shards):
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: tensors[n] for n in names[i::shards]}
        save_file(part, str(folder / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def raw_shard(path: Path, header: dict | bytes, data: bytes = b"", length: int | None = None) -> Path:
    """A shard written byte by byte: any header (forged length too), any data after it."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def tree_digest(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes (and mtime), to show a run left it untouched."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(cli, *args, naming: str) -> str:
    """Run the CLI; it must fail with exit 2 and one error line containing `naming`; returns the line."""
    code, _, stderr = cli(*args)
    assert code == 2, stderr
    line = one_error_line(stderr)
    assert naming in line, line
    return line


def one_error_line(stderr: str) -> str:
    """The CLI's single `error: ...` line; fails on a traceback or anything else on stderr."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1 and lines[0].startswith(("error:", "interrupted:")), stderr
    return lines[0]
