"""An output file written front to back from aligned staging buffers by background threads.

Where the filesystem allows it the file is opened with O_DIRECT: the disk reads our buffers itself, so
the bytes are not copied into the page cache (on a 2-core machine that copy costs as much CPU as
quantizing) and the closing fsync finds nothing left to write. Elsewhere (tmpfs, macOS) the same
buffers go through ordinary writes, with writeback started as they go.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

ALIGN = 4096  # O_DIRECT wants buffer address, file offset and length aligned to the logical block size
BUFFER = 8 << 20  # bytes per write
WRITERS = 3  # writes in flight: a disk answers several at once faster than one after another
DEPTH = WRITERS + 2  # staging buffers: one filling, the rest in flight or queued


def _start_writeback():
    """libc's sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE): starts writing dirty pages back
    without waiting (Linux only; elsewhere the final fsync does all the work)."""
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        call = libc.sync_file_range
        call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    except (OSError, AttributeError):
        return lambda fd, offset, nbytes: None
    return lambda fd, offset, nbytes: call(fd, offset, nbytes, 2)  # 2 = SYNC_FILE_RANGE_WRITE


_writeback = _start_writeback()
_DIRECT = getattr(os, "O_DIRECT", 0)


def _combine(pieces: list[bytes]) -> str:
    return hashlib.sha256(b"".join(pieces)).hexdigest()


def file_digest(path: Path) -> str:
    """A file's digest as OutputFile computes it while writing: the sha256 of the sha256s of its
    BUFFER-sized pieces (pieces hash on several threads and need no second read of the file)."""
    pieces = []
    with open(path, "rb") as f:
        while piece := f.read(BUFFER):
            pieces.append(hashlib.sha256(piece).digest())
    return _combine(pieces)


class OutputFile:
    """Append-only writes into `path` (created, or continued after its first `keep` bytes), then
    `close()`: the tail, the true length, an optional rewrite of the file's head, fsync.

    `write` copies the data into a staging buffer and returns; full buffers are written by threads
    (pwrite at their own offsets, so in any order). Their errors surface at a later `write` or at `close`.
    With `digest`, the threads also hash what they write, and close() sets `self.digest` (file_digest's).
    """

    def __init__(self, path: Path, keep: int = 0, digest: bool = False):
        if digest and keep:
            raise ValueError("a digest covers whole files only")
        self.path = path
        self.digest = ""
        self._pieces: dict[int, bytes] | None = {} if digest else None
        flags = os.O_WRONLY | os.O_CREAT | (0 if keep else os.O_TRUNC)
        self.direct = bool(_DIRECT)
        try:
            self._fd = os.open(path, flags | _DIRECT, 0o666)  # 0644 under the usual umask, like open()
        except OSError as e:
            if e.errno != errno.EINVAL or not self.direct:
                raise
            self.direct = False
            self._fd = os.open(path, flags, 0o666)
        self._buffers = [mmap.mmap(-1, BUFFER) for _ in range(DEPTH)]  # anonymous maps are page aligned
        self._views = [np.frombuffer(b, np.uint8) for b in self._buffers]
        self._current = 0
        self._fill = 0
        self._offset = keep - keep % ALIGN  # file offset of the current buffer's first byte
        if keep % ALIGN:  # start the first buffer with the partial block already on disk
            with open(path, "rb") as f:
                f.seek(self._offset)
                head = f.read(keep % ALIGN)
            self._views[0][: len(head)] = np.frombuffer(head, np.uint8)
            self._fill = len(head)
        self._io = ThreadPoolExecutor(WRITERS, thread_name_prefix="quantkit-writer")
        self._pending: deque[tuple[Future, int]] = deque()  # (write, buffer index)

    def tell(self) -> int:
        return self._offset + self._fill

    def write(self, data) -> None:
        source = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
        done = 0
        while done < source.size:
            take = min(source.size - done, BUFFER - self._fill)
            self._views[self._current][self._fill : self._fill + take] = source[done : done + take]
            self._fill += take
            done += take
            if self._fill == BUFFER:
                self._submit()

    def _submit(self) -> None:
        """Hand the current buffer to the writer threads and move on to a free one."""
        index, length, offset = self._current, self._fill, self._offset
        self._pending.append((self._io.submit(self._pwrite, index, length, offset), index))
        self._offset += length
        self._fill = 0
        self._current = (index + 1) % DEPTH
        while self._pending and (len(self._pending) >= DEPTH or self._pending[0][1] == self._current):
            self._pending.popleft()[0].result()

    def _pwrite(self, index: int, length: int, offset: int) -> None:
        view = memoryview(self._buffers[index])
        if self._pieces is not None:
            self._pieces[offset // BUFFER] = hashlib.sha256(view[:length]).digest()
        padded = -length % ALIGN if self.direct else 0  # only the last buffer can be short
        if padded:
            view[length : length + padded] = bytes(padded)
        done, total = 0, length + padded
        while done < total:
            try:
                written = os.pwrite(self._fd, view[done:total], offset + done)
            except OSError as e:
                if e.errno != errno.EINVAL or not self.direct:
                    raise
                self._buffered()  # this filesystem refuses direct I/O after all
                total = length
                continue
            if written == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += written
        if not self.direct:
            _writeback(self._fd, offset, length)

    def _buffered(self) -> None:
        import fcntl

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_DIRECT)
        self.direct = False

    def _drain(self) -> None:
        while self._pending:
            self._pending.popleft()[0].result()

    def close(self, head: bytes = b"") -> int:
        """Write what is left, cut the padding, rewrite the first len(head) bytes, fsync. Returns the size."""
        size = self.tell()
        try:
            if self._fill:
                self._submit()
            self._drain()
            os.ftruncate(self._fd, size)
            if head:
                if self.direct:
                    self._buffered()
                os.pwrite(self._fd, head, 0)
            if self._pieces is not None:
                if head:  # the first piece changed: hash it again as it is now
                    with open(self.path, "rb") as f:
                        self._pieces[0] = hashlib.sha256(f.read(BUFFER)).digest()
                self.digest = _combine([self._pieces[i] for i in range(len(self._pieces))])
            os.fsync(self._fd)
        finally:
            self.abort()
        return size

    def abort(self) -> None:
        """Stop: cancel queued writes, wait for the one running, close the file (the caller deletes it)."""
        for pending, _ in self._pending:
            pending.cancel()
        self._io.shutdown(wait=True)
        self._pending.clear()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
