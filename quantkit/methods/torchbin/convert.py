"""Legacy PyTorch checkpoints (`.bin`, `.pt`, `.pth`): described through the inert pickle reader
(quantkit.io.torchpickle), converted to safetensors through `torch.load(weights_only=True)`."""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

from quantkit.api import Result
from quantkit.dtypes import BY_NAME, FLOATS, itemsize
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import OutputTensor
from quantkit.io.source import HUB_PATTERNS, Checkpoint, architectures, resolve
from quantkit.io.staged import bytes_on_disk, check_free_space, check_output, copy_side_files, write_config, write_staged
from quantkit.io.stream import Progress
from quantkit.io.torchpickle import TORCH_INDEX, is_torch_checkpoint, open_torch_checkpoint
from quantkit.numerics import COPY_CHUNK


def inspect(path: Path) -> dict:
    """What `inspect` shows for a torch checkpoint, from its pickles replayed inertly."""
    ckpt = open_torch_checkpoint(path)
    config = ckpt.config or {}
    archs = architectures(config)
    dtypes: dict[str, int] = {}
    for meta in ckpt.tensors.values():
        dtypes[meta.dtype] = dtypes.get(meta.dtype, 0) + 1
    return {
        "path": str(path),
        "format": "pytorch (pickle)",
        "architecture": archs[0] if archs else config.get("model_type"),
        "model_type": config.get("model_type"),
        "num_parameters": sum(math.prod(m.shape) for m in ckpt.tensors.values() if m.dtype in FLOATS),
        "bytes": sum(m.nbytes for m in ckpt.tensors.values()),
        "dtypes": dtypes,
        "shards": [f.name for f in ckpt.files],
        "quantization": None,
        "note": "a pickle checkpoint, read without running it; convert it first: quantkit convert SRC OUT --to safetensors",
        "tensors": [{"name": m.name, "dtype": m.dtype, "shape": list(m.shape)} for m in ckpt.tensors.values()],
    }


# ---------------------------------------------------------------- conversion


def _torch_load(file: Path) -> dict:
    """torch.load with weights_only (its own refusal of code is the second line of defence) and mmap for
    the zip format, so tensors are read from the page cache as they are copied."""
    try:
        import torch
    except ImportError:
        raise QuantkitError(f"{file}: reading PyTorch weights needs torch", "pip install 'quantkit[torch]'") from None
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as e:  # torch raises many types for a damaged file; none of them is our bug
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise QuantkitError(f"{file}: torch.load(weights_only=True) refused it ({first})") from None


def _row_chunks(tensor, dtype: str, max_bytes: int):
    """The tensor's bytes as `dtype` (a safetensors name; floats are cast), in row chunks of ~max_bytes."""
    import torch

    rows = tensor.shape[0] if tensor.dim() else 1
    whole = tensor.reshape(rows, math.prod(tensor.shape[1:]))
    target = getattr(torch, {v: k for k, v in BY_NAME.items()}[dtype]) if dtype in FLOATS else tensor.dtype
    step = max(1, max_bytes // max(1, whole.shape[1] * itemsize(dtype)))
    for start in range(0, rows, step):
        part = whole[start : start + step].to(target).contiguous()
        yield part.reshape(-1).view(torch.uint8).numpy()


def convert(src: str, out: Path, dtype: str | None = None, force: bool = False, revision: str | None = None,
            max_shard_size: int = 5 * 10**9, progress: Progress | None = None) -> Result:
    """`quantkit convert SRC OUT --to safetensors` for a torch checkpoint: described and checked inertly,
    then loaded shard by shard with weights_only and written as safetensors beside config and side files."""
    path = resolve(src, revision, patterns=HUB_PATTERNS + ["*.bin", TORCH_INDEX])
    if not is_torch_checkpoint(path):
        raise QuantkitError(f"{src}: no PyTorch .bin/.pt weights to convert",
                            "--to safetensors reads PyTorch checkpoints and .gguf files")
    if dtype is not None and dtype not in BY_NAME:
        raise QuantkitError(f"--dtype {dtype}: choose one of {', '.join(BY_NAME)}")
    ckpt = open_torch_checkpoint(path)
    out_dtype = {n: (BY_NAME[dtype] if dtype and m.dtype in FLOATS else m.dtype) for n, m in ckpt.tensors.items()}
    outputs = [OutputTensor(n, out_dtype[n], m.shape) for n, m in ckpt.tensors.items()]
    check_output(path, out, force)
    check_free_space(out, sum(o.nbytes for o in outputs))
    total = sum(m.nbytes for m in ckpt.tensors.values())
    def fill(writer) -> None:
        done = 0
        for file in ckpt.files:
            state = _torch_load(file)
            for name, meta in ((n, m) for n, m in ckpt.tensors.items() if ckpt.file_of[n] == file):
                tensor = state.get(name)
                if tensor is None or tuple(tensor.shape) != meta.shape or tensor.element_size() != itemsize(meta.dtype):
                    raise QuantkitError(f"{file}: tensor '{name}' reads back differently from what its pickle describes")
                for chunk in _row_chunks(tensor, out_dtype[name], COPY_CHUNK):
                    writer.write(name, chunk)
                writer.done(name)
                done += meta.nbytes
                if progress:
                    progress(done, total, name)
            del state

    def finish(folder: Path) -> list[str]:
        if ckpt.config is not None:
            write_config(folder, ckpt.config)
        return copy_side_files(Checkpoint(ckpt.root, ckpt.config or {}, []), folder) if path.is_dir() else []

    files, side = write_staged(out, outputs, max_shard_size, fill, finish, force=force)
    return Result(out, files, {"to": "safetensors", "dtype": dtype, "tensors": len(outputs),
                               "output_bytes": bytes_on_disk(out, files), "side_files": side,
                               "fallbacks": [], "warnings": []})
