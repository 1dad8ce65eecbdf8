"""OutputFile: the bytes land as written (direct, buffered, or not durable: written through without staging
and never fsynced), and its digest equals file_digest's."""

import fcntl
import os

import numpy as np
import pytest

from quantkit.io.outfile import BUFFER, OutputFile, durability, file_digest


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "no-sync"])
@pytest.mark.parametrize("size", [0, 1, 4095, BUFFER, 3 * BUFFER + 12345])
@pytest.mark.parametrize("head", [b"", b"HEAD-REWRITTEN"])
def test_bytes_and_digest(tmp_path, size, head, durable):
    data = np.random.default_rng(size).integers(0, 256, size + len(head), dtype=np.uint8)
    path = tmp_path / "f.bin"
    with durability(durable):
        f = OutputFile(path, digest=True)
        f.write(bytes(len(head)))  # a placeholder, rewritten at close
        # pieces that straddle the buffers, and (not durable) ones long enough to be written through
        start, steps = len(head), [1_000_003, 2 * BUFFER + 5]
        while start < data.size:
            f.write(data[start : start + steps[0]])
            start += steps[0]
            steps.reverse()
        assert f.close(head) == data.size
    expected = head + data[len(head) :].tobytes()
    assert path.read_bytes() == expected
    assert f.digest == file_digest(path)


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "no-sync"])
def test_continues_after_kept_bytes(tmp_path, durable):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 5000)  # a header someone else wrote, not block aligned
    with durability(durable):
        f = OutputFile(path, keep=5000)
        f.write(b"y" * 10)
        f.write(b"z" * (2 * BUFFER + 7))
        f.close()
    assert path.read_bytes() == b"x" * 5000 + b"y" * 10 + b"z" * (2 * BUFFER + 7)


def test_not_durable_neither_direct_nor_fsynced(tmp_path, monkeypatch):
    """durability(False) (--no-sync): plain writes, no fsync; the default comes back after the block."""
    synced = []
    monkeypatch.setattr(os, "fsync", synced.append)
    with durability(False):
        f = OutputFile(tmp_path / "f.bin")
        assert not fcntl.fcntl(f._fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0)
        f.write(b"q" * (BUFFER + 1))
        f.close()
    assert synced == []
    f = OutputFile(tmp_path / "g.bin")
    f.write(b"q")
    f.close()
    assert len(synced) == 1


def test_buffered_when_direct_io_is_refused(tmp_path, monkeypatch):
    """A filesystem that accepts O_DIRECT at open but refuses the writes: the file falls back to plain writes."""
    real_pwrite = os.pwrite

    def pwrite(fd, data, offset):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):
            raise OSError(22, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    path = tmp_path / "f.bin"
    f = OutputFile(path)
    f.write(b"z" * (2 * BUFFER + 3))
    f.close(b"ab")
    assert path.read_bytes() == b"ab" + b"z" * (2 * BUFFER + 1)
