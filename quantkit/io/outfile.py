"""An output file written front to back from aligned staging buffers by background threads.

Where the filesystem allows it the file is opened with O_DIRECT: the disk reads our buffers itself, so
the bytes are not copied into the page cache (on a 2-core machine that copy costs as much CPU as
quantizing) and the closing fsync finds nothing left to write. Elsewhere (tmpfs, macOS) the same
buffers go through ordinary writes, with writeback started as they go.

`durability(False)` (the CLI's --no-sync) makes a run end once its bytes are in the page cache, as
safetensors, llama-quantize and llm-compressor do: ordinary writes, no writeback started, no fsync.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import mmap
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from quantkit.errors import QuantkitError

ALIGN = 4096  # O_DIRECT wants buffer address, file offset and length aligned to the logical block size
BUFFER = 8 << 20  # bytes per write
WRITERS = 3  # writes in flight: a disk answers several at once faster than one after another
DEPTH = WRITERS + 2  # staging buffers: one filling, the rest in flight or queued
THROUGH_AHEAD = 2  # durability(False): arrays handed to the writer thread and not yet in the page cache


def _start_writeback():
    """libc's sync_file_range(fd, offset, n, SYNC_FILE_RANGE_WRITE): starts writing dirty pages back
    without waiting (Linux only; elsewhere the final fsync does all the work)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols, libc's among them (ctypes.util costs 20 ms)
        call = libc.sync_file_range
        call.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    except (OSError, AttributeError):
        return lambda fd, offset, nbytes: None
    return lambda fd, offset, nbytes: call(fd, offset, nbytes, 2)  # 2 = SYNC_FILE_RANGE_WRITE


_writeback = _start_writeback()
_DIRECT = getattr(os, "O_DIRECT", 0)
_durable = True


@contextlib.contextmanager
def durability(durable: bool) -> Iterator[None]:
    """Within it, durable=True (the default everywhere else): every file and folder is on disk (fsync) before
    the output is renamed into place, so a power cut right after a run leaves the finished output or none.
    False: a run ends once its bytes are in the page cache, which the kernel writes back within ~30 s."""
    global _durable
    before, _durable = _durable, durable
    try:
        yield
    finally:
        _durable = before


def sync(fd: int) -> None:
    """fsync, unless within durability(False)."""
    if _durable:
        os.fsync(fd)


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
    Within durability(False) the caller's arrays go to the page cache as they are (`through`): no staging
    copy; one thread writes them in order while the caller computes the next (writers never reuse a chunk).
    """

    def __init__(self, path: Path, keep: int = 0, digest: bool = False):
        if digest and keep:
            raise ValueError("a digest covers whole files only")
        self.path = path
        self.digest = ""
        self._pieces: dict[int, bytes] | None = {} if digest else None
        flags = os.O_WRONLY | os.O_CREAT | (0 if keep else os.O_TRUNC)
        self.direct = bool(_DIRECT) and _durable
        try:
            self._fd = os.open(path, flags | (_DIRECT if self.direct else 0), 0o666)  # 0644 under the usual umask, like open()
        except OSError as e:
            if e.errno != errno.EINVAL or not self.direct:
                raise
            self.direct = False
            self._fd = os.open(path, flags, 0o666)
        self.through = not _durable
        self._piece = hashlib.sha256()  # through: the digest's current piece, hashed in file order
        self._buffers = [mmap.mmap(-1, BUFFER) for _ in range(0 if self.through else DEPTH)]  # anonymous maps are page aligned
        self._views = [np.frombuffer(b, np.uint8) for b in self._buffers]
        self._current = 0
        self._fill = 0
        self._offset = keep if self.through else keep - keep % ALIGN  # file offset of the current buffer's first byte
        if keep % ALIGN and not self.through:  # start the first buffer with the partial block already on disk
            with open(path, "rb") as f:
                f.seek(self._offset)
                head = f.read(keep % ALIGN)
            self._views[0][: len(head)] = np.frombuffer(head, np.uint8)
            self._fill = len(head)
        self._io = ThreadPoolExecutor(1 if self.through else WRITERS, thread_name_prefix="quantkit-writer")
        self._pending: deque[tuple[Future, int]] = deque()  # (write, buffer index)
        self._copier: ThreadPoolExecutor | None = None  # copy(): a thread of its own, beside the writer
        self._copies: list[Future] = []

    def tell(self) -> int:
        return self._offset + self._fill

    def write(self, data) -> None:
        source = np.frombuffer(data, np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1).view(np.uint8)
        if self.through:
            self._queue(self._write_through, source, self._offset)
            self._offset += source.size
            return
        done = 0
        while done < source.size:
            take = min(source.size - done, BUFFER - self._fill)
            self._views[self._current][self._fill : self._fill + take] = source[done : done + take]
            self._fill += take
            done += take
            if self._fill == BUFFER:
                self._submit()

    def copy(self, path: Path, offset: int, nbytes: int) -> bool:
        """Append `nbytes` of `path` from byte `offset`, copied by the kernel from page cache to page cache
        (copy_file_range): within durability(False) and without a digest. Writing the same bytes from a map of
        the source costs 2-3x more: each source page is faulted in from inside the write. The copies run on a
        thread of their own, so the caller goes on computing (and the writer writing) the tensors after it,
        at their own offsets. False, with nothing done, elsewhere: the caller writes the bytes itself."""
        if not self.through or self._pieces is not None or not hasattr(os, "copy_file_range"):
            return False
        if self._copier is None:
            self._copier = ThreadPoolExecutor(1, thread_name_prefix="quantkit-copier")
        self._copies.append(self._copier.submit(self._copy_range, path, offset, nbytes, self._offset))
        self._offset += nbytes
        return True

    def _queue(self, job, *args) -> None:
        """durability(False): a write for the one writer thread, which keeps file order."""
        self._pending.append((self._io.submit(job, *args), -1))
        while len(self._pending) > THROUGH_AHEAD:
            self._pending.popleft()[0].result()

    def _copy_range(self, path: Path, offset: int, nbytes: int, at: int) -> None:
        """(On the copier thread.) Falls back to read + write where the kernel cannot copy between these two
        files (another filesystem: EXDEV)."""
        fd = os.open(path, os.O_RDONLY)
        try:
            done = 0
            while done < nbytes:
                try:
                    copied = os.copy_file_range(fd, self._fd, nbytes - done, offset + done, at + done)
                except OSError as e:
                    if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    data = os.pread(fd, min(nbytes - done, BUFFER), offset + done)
                    copied = len(data)
                    if copied:
                        self._write_through(np.frombuffer(data, np.uint8), at + done)
                if copied == 0:
                    raise QuantkitError(f"{path}: truncated while being read", "the source changed under the run")
                done += copied
        finally:
            os.close(fd)

    def _write_through(self, data: np.ndarray, offset: int) -> None:
        """(On the one writer thread, in file order; or on the copier thread, for a copy's fallback, without a digest.)"""
        view = memoryview(data)
        if self._pieces is not None:
            self._hash_in_order(view, offset)
        done = 0
        while done < len(view):
            written = os.pwrite(self._fd, view[done:], offset + done)
            if written == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += written

    def _hash_in_order(self, view: memoryview, offset: int, final: bool = False) -> None:
        """The digest's BUFFER-sized pieces from bytes that arrive in file order, the first at `offset`
        (`final`: the last, short one)."""
        end = offset + len(view)
        while len(view):
            take = min(len(view), BUFFER - offset % BUFFER)
            self._piece.update(view[:take])
            offset += take
            view = view[take:]
            if offset % BUFFER == 0:
                self._pieces[offset // BUFFER - 1] = self._piece.digest()
                self._piece = hashlib.sha256()
        if final and end % BUFFER:
            self._pieces[end // BUFFER] = self._piece.digest()

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
        if not self.direct:  # (never reached within durability(False): `through` writes need no buffers)
            _writeback(self._fd, offset, length)

    def _buffered(self) -> None:
        import fcntl

        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~_DIRECT)
        self.direct = False

    def _drain(self) -> None:
        while self._pending:
            self._pending.popleft()[0].result()
        while self._copies:
            self._copies.pop(0).result()

    def close(self, head: bytes = b"") -> int:
        """Write what is left, cut the padding, rewrite the first len(head) bytes, fsync. Returns the size."""
        size = self.tell()
        try:
            if self._fill:
                self._submit()
            self._drain()
            if self.through and self._pieces is not None:
                self._hash_in_order(memoryview(b""), size, final=True)
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
            sync(self._fd)
        finally:
            self.abort()
        return size

    def abort(self) -> None:
        """Stop: cancel queued writes, wait for the one running, close the file (the caller deletes it)."""
        for pending in [p for p, _ in self._pending] + self._copies:
            pending.cancel()
        for pool in (self._io, self._copier):
            if pool is not None:
                pool.shutdown(wait=True)
        self._pending.clear()
        self._copies.clear()
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = -1
