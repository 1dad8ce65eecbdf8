"""Streaming a checkpoint: one shard open at a time, in source order, each tensor in row chunks.

An `Entry` is one input tensor's fate in a run (keep, drop, quantize, dequantize, ...) with the outputs it
gives; `stream_entries` visits entries shard by shard and hands each to the run's handler. Partner tensors
that live in another shard (absmax beside its weight) are read through `TensorReads`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from quantkit.dtypes import all_finite
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import CheckpointWriter, OutputTensor, ShardReader, TensorInfo, iter_row_chunks
from quantkit.io.source import Checkpoint
from quantkit.numerics import COPY_CHUNK

Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, current tensor)


def no_progress(done: int, total: int, name: str) -> None:
    pass


@dataclass(frozen=True)
class Entry:
    """One input tensor's fate: keep (copied as is), drop, quantize as part of `module`, ..."""

    source: str
    fate: str
    module: str = ""
    outputs: tuple[OutputTensor, ...] = ()
    transposed: bool = False
    reason: str = ""


@dataclass
class ShardWeight:
    """A weight read in row chunks from an open shard; Conv1D weights are transposed to [out, in].
    A partner weight (another module's) that lives in another shard opens that shard while it is read."""

    reader: ShardReader
    info: TensorInfo
    transposed: bool
    checkpoint: Checkpoint | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape[::-1] if self.transposed else self.info.shape

    @property
    def dtype(self) -> str:
        return self.info.dtype

    def partner(self, module: str) -> ShardWeight | None:
        info = self.checkpoint.tensors.get(f"{module}.weight") if self.checkpoint else None
        return None if info is None else ShardWeight(self.reader, info, False, self.checkpoint)

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        if self.info.file != self.reader.path:
            with ShardReader(self.info.file) as own:
                yield from replace(self, reader=own).chunks(rows)
            return
        if self.transposed:  # Conv1D weights are small enough to turn around whole
            whole = np.ascontiguousarray(self.reader.read(self.info).T)
            for start in range(0, whole.shape[0], rows):
                yield whole[start : start + rows]
            return
        for start in range(0, self.shape[0], rows):
            yield self.reader.read_rows(self.info, start, min(self.shape[0], start + rows))


def copy_tensor(reader: ShardReader, info: TensorInfo, name: str, writer: CheckpointWriter) -> None:
    if not writer.copy(name, info.file, info.start, info.nbytes):
        for start, stop in iter_row_chunks(info, COPY_CHUNK):
            writer.write(name, reader.read_rows(info, start, stop))
    writer.done(name)


Handle = Callable[[ShardReader, Entry, TensorInfo, CheckpointWriter], None]


def stream_entries(checkpoint: Checkpoint, entries: list[Entry], writer: CheckpointWriter, handle: Handle,
                   progress: Progress) -> None:
    """Visit entries in source order, one shard open at a time, and let `handle` write each one."""
    total = sum(checkpoint.tensors[e.source].nbytes for e in entries)
    done = 0
    for file in checkpoint.files:
        todo = [e for e in entries if checkpoint.tensors[e.source].file == file]
        if not todo:
            continue
        with ShardReader(file) as reader:
            for entry in todo:
                info = checkpoint.tensors[entry.source]
                if not writer.skip_reused(o.name for o in entry.outputs):
                    handle(reader, entry, info, writer)
                done += info.nbytes
                progress(done, total, entry.source)


def ordered(checkpoint: Checkpoint, entries: list[Entry]) -> list[Entry]:
    """Entries in the order their data lies on disk: shard by shard, offset by offset."""
    file_order = {f: i for i, f in enumerate(checkpoint.files)}
    key = lambda e: (file_order[checkpoint.tensors[e.source].file], checkpoint.tensors[e.source].start)  # noqa: E731
    return sorted(entries, key=key)


class TensorReads:
    """Reads whole tensors by name from whichever shard holds them (companions may live elsewhere)."""

    def __init__(self, checkpoint: Checkpoint, current: ShardReader):
        self.checkpoint = checkpoint
        self.current = current

    def __call__(self, name: str) -> np.ndarray:
        shape = self.checkpoint.tensors[name].shape
        return self.rows(name, 0, shape[0] if shape else 1)  # as ShardReader.read

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) of one tensor (along its first axis)."""
        info = self.checkpoint.tensors[name]
        if info.file == self.current.path:
            return self.current.read_rows(info, start, stop)
        with ShardReader(info.file) as other:
            return other.read_rows(info, start, stop)


class FiniteSink:
    """Passes dequantized chunks on to the writer, refusing NaN or infinity: from quantized data they only
    come from damage (a scale or offset that is NaN), and a dense checkpoint of NaN weights is no output."""

    def __init__(self, sink: CheckpointWriter, dtype: str, source: Path):
        self.sink, self.dtype, self.source = sink, dtype, source

    def write(self, name: str, chunk) -> None:
        if not isinstance(chunk, bytes) and not all_finite(chunk, self.dtype):
            raise QuantkitError(f"{self.source}: dequantizing '{name}' gives NaN or infinite values",
                                "the checkpoint is damaged: quantkit verify names what")
        self.sink.write(name, chunk)

    def done(self, name: str) -> None:
        self.sink.done(name)
