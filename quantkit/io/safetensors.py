"""safetensors on disk: validated header parsing, chunked reads, and a size-bounded streaming writer.

Headers are checked against the file size before anything is allocated. Reads map row ranges of
the file (no copy), so memory follows a chunk, not a shard; a file truncated under a run is an error naming
it, not a SIGBUS (see ShardReader). The writer knows every
output tensor up front (from the plan), writes each shard's header first and the data as it is produced.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from quantkit.dtypes import STORAGE, itemsize
from quantkit.errors import InternalError, QuantkitError
from quantkit.io.outfile import OutputFile
from quantkit.native import kernels

MAX_HEADER = 100 * 1024 * 1024  # the safetensors library's own limit
# Tensors one shard may list. The largest checkpoints published hold a few thousand per shard (~150k in all,
# over many shards); a header of a million entries costs a minute and GBs of Python objects to parse.
MAX_TENSORS = 200_000
READAHEAD = 64 << 20  # source bytes asked of the disk beyond each read
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes live: file, dtype, shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a shard's header: (tensors by name, metadata). Reads no tensor data."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise QuantkitError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (length,) = struct.unpack("<Q", head)
            if length > MAX_HEADER or 8 + length > size:
                raise QuantkitError(
                    f"{path}: header length {length} exceeds the file size {size}", "the file is truncated or not safetensors"
                )
            raw = f.read(length)
    except OSError as e:
        raise QuantkitError(f"{path}: cannot read ({e.strerror})") from None
    if raw.count(b'"data_offsets"') > MAX_TENSORS:  # counted in the bytes, before parsing allocates for each
        raise QuantkitError(f"{path}: header lists more than {MAX_TENSORS} tensors", "no real checkpoint shard holds so many")
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: nested absurdly deep
        raise QuantkitError(f"{path}: header is not valid JSON") from None
    if not isinstance(header, dict):
        raise QuantkitError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise QuantkitError(f"{path}: __metadata__ must map strings to strings")
    data_start = 8 + length
    tensors = {name: _tensor_info(path, name, entry, data_start) for name, entry in header.items()}
    _check_coverage(path, tensors, data_start, size)
    return tensors, metadata


def _tensor_info(path: Path, name: str, entry: object, data_start: int) -> TensorInfo:
    where = f"{path}: tensor '{name}'"
    if not isinstance(entry, dict):
        raise QuantkitError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in STORAGE:
        raise QuantkitError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise QuantkitError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise QuantkitError(f"{where}: data_offsets {offsets!r} are invalid")
    expected = math.prod(shape) * itemsize(dtype)
    if offsets[1] - offsets[0] != expected:
        raise QuantkitError(f"{where}: {offsets[1] - offsets[0]} bytes of data but dtype {dtype} and shape {shape} need {expected}")
    return TensorInfo(name, dtype, tuple(shape), path, data_start + offsets[0], data_start + offsets[1])


def _check_coverage(path: Path, tensors: dict[str, TensorInfo], data_start: int, size: int) -> None:
    """Tensors must tile the data section exactly: no overlap, no gap, nothing past the end of the file."""
    position = data_start
    for info in sorted(tensors.values(), key=lambda t: (t.start, t.end)):
        if info.start != position:
            problem = "overlaps another tensor" if info.start < position else "leaves a gap before it"
            raise QuantkitError(f"{path}: tensor '{info.name}' {problem}")
        position = info.end
    if position > size:
        raise QuantkitError(f"{path}: truncated: the header describes {position} bytes, the file has {size}")
    if position < size:
        raise QuantkitError(f"{path}: {size - position} bytes after the last tensor that no header entry covers")


class ShardReader:
    """Reads tensors (or row ranges of them) of one file, each range through a memory map of its own.

    A map costs no copy (the page cache's pages are mapped, copy-on-write) and is unmapped when the
    last array viewing it is dropped, so memory follows the chunks in use, not the shard.

    A file that shrinks while it is read would end the process with SIGBUS at the first touch of a page
    past its new end. Each read checks the size first; for a file truncated after that, while the data is
    being used, the compiled guard (native/mapguard.c) reads zeros instead and counts the fault, and the
    next read, or close(), stops the run with an error naming the file. Without the compiled extension
    only the size checks remain.
    """

    _paths: dict[int, Path] = {}  # guard owner id -> file, for naming the file that shrank

    def __init__(self, path: Path):
        self.path = path
        try:
            self._f: BinaryIO = open(path, "rb")
        except OSError as e:
            raise QuantkitError(f"{path}: cannot open ({e.strerror})") from None
        self._faults = kernels.map_faults()[0] if kernels is not None else 0
        ShardReader._paths[id(self)] = path

    def __enter__(self) -> ShardReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._f.close()
        try:
            self._check_faults()
        finally:
            ShardReader._paths.pop(id(self), None)

    def _check_faults(self) -> None:
        if kernels is None:
            return
        count, owner = kernels.map_faults()
        if count != self._faults:
            raise QuantkitError(f"{ShardReader._paths.get(owner, self.path)}: truncated while being read",
                                "the source changed under the run; nothing was written")

    def read(self, info: TensorInfo) -> np.ndarray:
        """The whole tensor as its stored bits (BF16 as uint16)."""
        return self.read_rows(info, 0, info.shape[0] if info.shape else 1)

    def read_rows(self, info: TensorInfo, row_start: int, row_stop: int) -> np.ndarray:
        """Rows [row_start, row_stop) of a tensor (the whole tensor for a scalar), as a writable array.
        The disk is asked for the range and the READAHEAD bytes after it now, without waiting, so a cold
        file streams while the caller computes (reads go front to back)."""
        self._check_faults()
        row_shape = info.shape[1:]
        row_bytes = math.prod(row_shape) * itemsize(info.dtype)
        offset = info.start + row_start * row_bytes
        count = (row_stop - row_start) * row_bytes
        if os.fstat(self._f.fileno()).st_size < offset + count:  # a map past the end would crash (SIGBUS)
            raise QuantkitError(f"{self.path}: truncated while reading tensor '{info.name}'")
        if count == 0:
            buffer = np.empty(0, np.uint8)
        else:
            skip = offset % mmap.ALLOCATIONGRANULARITY
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(self._f.fileno(), offset, count + READAHEAD, os.POSIX_FADV_WILLNEED)
            view = mmap.mmap(self._f.fileno(), skip + count, access=mmap.ACCESS_COPY, offset=offset - skip)
            buffer = np.frombuffer(view, np.uint8, count, skip)
            if kernels is not None:
                slot = kernels.guard_map(buffer.ctypes.data - skip, skip + count, id(self))
                weakref.finalize(view, kernels.unguard_map, slot)
        array = buffer.view(STORAGE[info.dtype])
        if not info.shape:
            return array.reshape(())
        return array.reshape((row_stop - row_start,) + row_shape)


def iter_row_chunks(info: TensorInfo, max_bytes: int) -> Iterator[tuple[int, int]]:
    """Row ranges of at most ~max_bytes each (at least one row) covering the tensor."""
    rows = info.shape[0] if info.shape else 1
    row_bytes = max(1, info.nbytes // max(rows, 1))
    step = max(1, max_bytes // row_bytes)
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


# ---------------------------------------------------------------- writing


@dataclass(frozen=True)
class OutputTensor:
    """A planned output tensor. `variable`: its length is an upper bound (a JSON blob whose digits
    depend on the data); the shard header reserves room and is rewritten with the true sizes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    variable: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * itemsize(self.dtype)


def assign_shards(tensors: Iterable[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Group tensors, in order, into shards of at most max_shard_size bytes (a larger tensor gets its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_names(count: int) -> list[str]:
    if count == 1:
        return [SINGLE_NAME]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def encode_header(tensors: list[OutputTensor], sizes: dict[str, int] | None = None, reserve: int = 0) -> bytes:
    """The 8-byte length and JSON header, padded with spaces to a multiple of 8 (and to `reserve`)."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        nbytes = sizes[t.name] if sizes else t.nbytes
        shape = [nbytes] if t.variable else list(t.shape)
        header[t.name] = {"dtype": t.dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (max(reserve - len(raw), 0) + (-max(reserve, len(raw)) % 8))
    return struct.pack("<Q", len(raw)) + raw


def index_text(weight_map: dict[str, str], total_size: int) -> str:
    """model.safetensors.index.json as CheckpointWriter writes it."""
    return json.dumps({"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n"


def planned_files(tensors: list[OutputTensor], max_shard_size: int) -> dict[str, int]:
    """The files CheckpointWriter writes for `tensors` and their bytes (exact unless a tensor is variable:
    then at most), without writing anything."""
    shards = assign_shards(tensors, max_shard_size)
    names = shard_names(len(shards))
    files = {name: len(encode_header(shard)) + sum(t.nbytes for t in shard) for name, shard in zip(names, shards)}
    if len(names) > 1:
        weight_map = {t.name: name for name, shard in zip(names, shards) for t in shard}
        files[INDEX_NAME] = len(index_text(weight_map, sum(t.nbytes for t in tensors)).encode())
    return files


class CheckpointWriter:
    """Streams planned tensors into bounded shards inside `folder`, in plan order, chunk by chunk.

    `write(name, chunk)` appends bytes to the tensor that is due and `done(name)` closes it; a tensor
    must be done before the next one starts. `finish()` writes the index when sharded. `on_shard(name,
    digest)` hears of each shard but the last once it is complete and fsynced, with its outfile.file_digest
    (computed while writing); `reuse` skips shards a resumed run already holds.
    """

    def __init__(self, folder: Path, tensors: list[OutputTensor], max_shard_size: int,
                 on_shard: Callable[[str, str], None] | None = None):
        self.folder = folder
        self.shards = assign_shards(tensors, max_shard_size)
        self.names = shard_names(len(self.shards))
        self._queue = [(i, t) for i, shard in enumerate(self.shards) for t in shard]
        self._shard_of = {t.name: i for i, t in self._queue}
        self._reused: set[int] = set()
        self._on_shard = on_shard
        self._next = 0
        self._written = 0
        self._sizes: dict[str, int] = {}
        self._file: OutputFile | None = None  # writes go out on a thread, so disk I/O overlaps compute
        self._file_index = -1
        self._reserved = 0

    def _due(self, name: str) -> OutputTensor:
        if self._next >= len(self._queue):
            raise InternalError(f"write to '{name}' after every planned tensor was written")
        shard_index, due = self._queue[self._next]
        if due.name != name:
            raise InternalError(f"plan order broken: '{name}' written while '{due.name}' is due")
        if shard_index != self._file_index and shard_index not in self._reused:
            self._open_shard(shard_index)
        return due

    def reuse(self, names: set[str]) -> None:
        """Shards already complete in the folder (checked by the caller): their tensors are not written again."""
        for index, name in enumerate(self.names):
            if name in names:
                tensors, _ = read_header(self.folder / name)
                self._sizes.update({t: info.nbytes for t, info in tensors.items()})
                self._reused.add(index)

    def skip_reused(self, names: Iterable[str]) -> bool:
        """True (and those tensors count as done) when every one of `names` lies in a reused shard."""
        names = list(names)
        if not names or not all(self._shard_of[n] in self._reused for n in names):
            return False
        for name in names:
            self.done(name)
        return True

    def _open_shard(self, index: int) -> None:
        self._close_file()
        self._file = OutputFile(self.folder / self.names[index], digest=self._reports(index))
        placeholder = encode_header(self.shards[index])
        self._reserved = len(placeholder) - 8
        self._file.write(placeholder)
        self._file_index = index

    def _room(self, name: str, nbytes: int) -> OutputFile | None:
        """The open shard file that takes `nbytes` more of tensor `name` (checked against the plan), or None
        when the tensor lies in a reused shard and nothing is written."""
        due = self._due(name)
        if self._shard_of[name] in self._reused:
            return None
        if self._written + nbytes > due.nbytes:
            raise InternalError(f"'{name}': more bytes than planned ({due.nbytes})")
        if self._file is None:
            raise InternalError(f"'{name}': written with no shard open")
        return self._file

    def write(self, name: str, chunk: np.ndarray | bytes) -> None:
        nbytes = len(chunk) if isinstance(chunk, bytes) else chunk.nbytes
        file = self._room(name, nbytes)
        if file is not None:
            file.write(chunk)
            self._written += nbytes

    def copy(self, name: str, path: Path, offset: int, nbytes: int) -> bool:
        """As write() with `nbytes` of file `path` from byte `offset`, where the shard can take them without
        their passing through memory (OutputFile.copy); False, nothing written, where it cannot."""
        file = self._room(name, nbytes)
        if file is None:
            return True
        if not file.copy(path, offset, nbytes):
            return False
        self._written += nbytes
        return True

    def done(self, name: str) -> None:
        due = self._due(name)
        if self._shard_of[name] in self._reused:
            self._next += 1
            return
        if self._written != due.nbytes and not due.variable:
            raise InternalError(f"'{name}': {self._written} bytes written, {due.nbytes} planned")
        self._sizes[name] = self._written
        self._next += 1
        self._written = 0

    def _close_file(self) -> None:
        if self._file is None:
            return
        shard = self.shards[self._file_index]
        # Variable-length tensors: the true sizes are known now, and the header is rewritten in place.
        head = encode_header(shard, self._sizes, reserve=self._reserved) if any(t.variable for t in shard) else b""
        file, self._file = self._file, None
        file.close(head)
        if self._reports(self._file_index):
            self._on_shard(self.names[self._file_index], file.digest)

    def _reports(self, index: int) -> bool:
        """Whether on_shard hears of shard `index` (the last one closes right before commit)."""
        return self._on_shard is not None and index < len(self.names) - 1

    def finish(self) -> list[str]:
        """Close the last shard, write the index if there are several; returns the files written."""
        if self._next != len(self._queue):
            raise InternalError(f"'{self._queue[self._next][1].name}' was planned but never written")
        self._close_file()
        files = list(self.names)
        if len(self.names) > 1:
            weight_map = {t.name: self.names[i] for i, t in self._queue}
            (self.folder / INDEX_NAME).write_text(index_text(weight_map, sum(self._sizes.values())))
            files.append(INDEX_NAME)
        return files

    def abort(self) -> None:
        """Drop the run: stop queued writes and close the open shard (the caller deletes the folder)."""
        if self._file is not None:
            self._file.abort()
            self._file = None
