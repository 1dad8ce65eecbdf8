"""Legacy PyTorch checkpoints (`.bin`, `.pt`, `.pth`) described without running their pickle (the inert
reader); methods/torchbin converts them.

A pickle can run any code while it loads. Describing one here replays it with an unpickler that knows a
handful of names (tensor rebuilders, storage types, OrderedDict) as inert stand-ins and refuses all others,
so nothing a file asks for is ever imported or called. Conversion only begins once that pass is clean.
"""

from __future__ import annotations

import io
import math
import pickle
import pickletools
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.dtypes import itemsize
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import OutputTensor
from quantkit.io.source import read_config, read_index

TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
TORCH_SINGLE = "pytorch_model.bin"
MAX_PICKLE = 256 << 20  # a state dict's pickle holds names and shapes only; real ones are kilobytes
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.save's first pickle before the zip format (torch < 1.6)
STORAGE_DTYPES = {
    "FloatStorage": "F32", "DoubleStorage": "F64", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL",
}  # fmt: skip


# ---------------------------------------------------------------- the inert unpickler


class _Refused(Exception):
    def __init__(self, what: str):
        self.what = what


class _Unsupported(Exception):
    """A plain state dict, but holding what this reader does not convert (a dtype)."""

    def __init__(self, what: str):
        self.what = what


def _unsupported_dtype(*args: object) -> None:
    """torch's _rebuild_tensor_v3: the route of dtypes without a typed storage (float8, uint16, ...)."""
    dtype = next((a for a in args if isinstance(a, _DType)), None)
    raise _Unsupported(f"dtype {dtype.name if dtype else 'of an untyped storage'} is not supported")


@dataclass(frozen=True)
class _DType:
    name: str


@dataclass(frozen=True)
class _StorageType:
    name: str


@dataclass(frozen=True)
class _Storage:
    dtype: str
    key: str
    numel: int


@dataclass(frozen=True)
class _Tensor:
    dtype: str
    shape: tuple[int, ...]
    key: str
    extent: int  # storage elements it spans (a broadcast view, stride 0, spans fewer than it holds)


class _StateDict(dict):
    """OrderedDict's stand-in; a dict that takes the `_metadata` attribute torch pickles with it."""


def _rebuild_tensor(storage: object, offset: object, size: object, stride: object, *_: object) -> _Tensor:
    if not isinstance(storage, _Storage):
        raise _Refused("a tensor whose storage is not a plain storage")
    if not (isinstance(size, tuple) and isinstance(stride, tuple) and isinstance(offset, int) and len(size) == len(stride)
            and all(isinstance(d, int) and d >= 0 for d in size + stride) and offset >= 0):  # fmt: skip
        raise _Refused(f"a tensor with size {size!r}, stride {stride!r} and offset {offset!r}")
    extent = offset + sum((d - 1) * s for d, s in zip(size, stride)) + 1 if math.prod(size) else 0
    if extent > storage.numel:
        raise _Refused(f"a tensor of size {size} reaching past its storage of {storage.numel} elements")
    return _Tensor(storage.dtype, size, storage.key, extent)


def _rebuild_parameter(data: object, *_: object) -> object:
    return data


SAFE_GLOBALS: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): _StateDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch._utils", "_rebuild_tensor_v3"): _unsupported_dtype,
}


class _InertUnpickler(pickle.Unpickler):
    """Knows only SAFE_GLOBALS and torch's storage types, as stand-ins; refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in SAFE_GLOBALS:
            return SAFE_GLOBALS[(module, name)]
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return _StorageType(name)
        if module == "torch" and name.replace("_", "").isalnum() and name[:1].islower():  # a dtype: torch.uint16
            return _DType(name)
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: object) -> _Storage:
        # zip format: ('storage', type, key, location, numel); legacy adds a view description
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage" and isinstance(pid[1], _StorageType)
                and isinstance(pid[2], str) and isinstance(pid[4], int) and pid[4] >= 0):  # fmt: skip
            raise _Refused(f"a storage reference {str(pid)[:80]}")
        return _Storage(STORAGE_DTYPES.get(pid[1].name, "U8"), pid[2], pid[4])  # untyped: bytes


def _inert_load(stream: io.BytesIO, file: Path) -> object:
    """One pickle from `stream`, its structure checked by pickletools (every counted length must fit in
    what is there, so nothing large is allocated) before the inert unpickler replays it."""
    start = stream.tell()
    try:
        for _ in pickletools.genops(stream):
            pass
        stream.seek(start)
        return _InertUnpickler(stream).load()
    except _Unsupported as e:
        raise QuantkitError(f"{file}: {e.what}", "quantkit converts tensors of "
                            + ", ".join(sorted(set(STORAGE_DTYPES.values())))) from None
    except _Refused as e:
        raise QuantkitError(f"{file}: refused: its pickle asks for {e.what}, which a plain state dict never does",
                            "only state dicts of tensors are read; a pickle like this one can run any code") from None
    except Exception as e:  # hostile bytes make pickle raise nearly anything; all of it means "damaged"
        raise QuantkitError(f"{file}: not a readable PyTorch pickle ({type(e).__name__}: {str(e)[:120]})") from None


def _state_dict(obj: object, file: Path) -> dict[str, OutputTensor]:
    if not isinstance(obj, dict):
        raise QuantkitError(f"{file}: holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {}
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, _Tensor):
            raise QuantkitError(f"{file}: entry {str(name)[:80]!r} is not a tensor", "only plain state dicts are converted")
        tensors[name] = OutputTensor(name, value.dtype, value.shape)
    return tensors


def _read_zip(file: Path) -> dict[str, OutputTensor]:
    with zipfile.ZipFile(file) as archive:
        members = {info.filename: info for info in archive.infolist()}
        pickles = [n for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
        if len(pickles) != 1:
            raise QuantkitError(f"{file}: a zip, but not one torch.save wrote (no single data.pkl)")
        if members[pickles[0]].file_size > MAX_PICKLE:
            raise QuantkitError(f"{file}: its pickle is {members[pickles[0]].file_size} bytes, too large for a state dict")
        raw = archive.read(pickles[0])
        state = _inert_load(io.BytesIO(raw), file)
        tensors = _state_dict(state, file)
        prefix = pickles[0][: -len("data.pkl")]
        for name, value in state.items():
            record = members.get(f"{prefix}data/{value.key}")
            needed = value.extent * itemsize(value.dtype)
            if record is None or (needed and record.file_size < needed):
                raise QuantkitError(f"{file}: tensor '{name}' needs {needed} bytes of storage '{value.key}', which the archive lacks")
    return tensors


def _read_legacy(file: Path) -> dict[str, OutputTensor]:
    with open(file, "rb") as f:
        stream = io.BytesIO(f.read(MAX_PICKLE))
    if _inert_load(stream, file) != LEGACY_MAGIC:
        raise QuantkitError(f"{file}: not a PyTorch checkpoint (neither a torch zip nor a legacy torch pickle)")
    _inert_load(stream, file)  # protocol version
    _inert_load(stream, file)  # sys info
    return _state_dict(_inert_load(stream, file), file)


def read_state_dict_meta(file: Path) -> dict[str, OutputTensor]:
    """Names, dtypes and shapes of a torch.save'd state dict, read without running its pickle."""
    try:
        if zipfile.is_zipfile(file):
            return _read_zip(file)
        return _read_legacy(file)
    except OSError as e:
        raise QuantkitError(f"{file}: cannot read ({e.strerror})") from None
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, ValueError, NotImplementedError) as e:
        raise QuantkitError(f"{file}: damaged archive ({e})") from None


# ---------------------------------------------------------------- checkpoints


def is_torch_checkpoint(path: Path) -> bool:
    """A torch file, or a folder whose weights are torch files and not safetensors."""
    if path.is_file():
        return path.suffix in TORCH_SUFFIXES
    if not path.is_dir() or any(path.glob("*.safetensors")):
        return False
    return (path / TORCH_INDEX).is_file() or any(p.suffix in TORCH_SUFFIXES for p in path.iterdir())


@dataclass
class TorchCheckpoint:
    root: Path
    config: dict | None
    files: list[Path]
    tensors: dict[str, OutputTensor]  # as the pickles describe them
    file_of: dict[str, Path]


def torch_files(root: Path) -> list[Path]:
    if (root / TORCH_INDEX).is_file():
        return [root / name for name in dict.fromkeys(read_index(root, TORCH_INDEX).values())]
    if (root / TORCH_SINGLE).is_file():
        return [root / TORCH_SINGLE]
    found = sorted(p for p in root.iterdir() if p.suffix in TORCH_SUFFIXES and p.is_file())
    if len(found) != 1:
        raise QuantkitError(f"{root}: {len(found)} PyTorch weight files and no {TORCH_INDEX}",
                            "a sharded checkpoint needs its index to say which tensor lives where")
    return found


def open_torch_checkpoint(path: Path) -> TorchCheckpoint:
    """A torch file or folder: config.json (required beside a folder's weights), every shard described,
    the index checked against what the shards hold. No tensor data is read and no pickle is run."""
    if path.is_file():
        root, files = path.parent, [path]
        config = read_config(root) if (root / "config.json").exists() else None
        weight_map = None
    else:
        root, files, config = path, torch_files(path), read_config(path)
        weight_map = read_index(root, TORCH_INDEX) if (root / TORCH_INDEX).is_file() else None
    tensors: dict[str, OutputTensor] = {}
    file_of: dict[str, Path] = {}
    for file in files:
        for name, meta in read_state_dict_meta(file).items():
            if name in tensors:
                raise QuantkitError(f"{file}: tensor '{name}' also appears in {file_of[name].name}")
            if weight_map is not None and weight_map.get(name) != file.name:
                raise QuantkitError(f"{root / TORCH_INDEX}: tensor '{name}' in {file.name} is not listed there")
            tensors[name], file_of[name] = meta, file
    for name, shard in (weight_map or {}).items():
        if name not in tensors:
            raise QuantkitError(f"{root / TORCH_INDEX}: tensor '{name}' is not in {shard}")
    return TorchCheckpoint(root, config, files, tensors, file_of)
