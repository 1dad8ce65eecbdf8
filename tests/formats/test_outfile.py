"""OutputFile: the bytes land as written (direct, buffered, or not durable: written through without staging
and never fsynced), and its digest equals file_digest's."""

import fcntl
import os

import numpy as np
import pytest

from quantkit.errors import QuantkitError
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


def _source(tmp_path, size=3 * BUFFER + 777):
    data = np.random.default_rng(7).integers(0, 256, size, dtype=np.uint8).tobytes()
    (tmp_path / "src.bin").write_bytes(data)
    return tmp_path / "src.bin", data


def test_copy_lands_in_file_order(tmp_path, monkeypatch):
    """--no-sync: a range of another file (a kept tensor) goes in by copy_file_range, between ordinary writes."""
    src, data = _source(tmp_path)
    calls = []
    real = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: calls.append(a[2]) or real(*a))
    with durability(False):
        f = OutputFile(tmp_path / "f.bin")
        f.write(b"head")
        assert f.copy(src, 4097, 2 * BUFFER + 3)
        f.write(b"middle" * 1000)
        assert f.copy(src, 0, 10)
        f.close()
    assert (tmp_path / "f.bin").read_bytes() == b"head" + data[4097 : 4097 + 2 * BUFFER + 3] + b"middle" * 1000 + data[:10]
    assert calls


@pytest.mark.parametrize("durable, digest", [(True, False), (False, True)], ids=["durable", "digest"])
def test_copy_declined_where_bytes_must_pass_through(tmp_path, durable, digest):
    """Durable runs stage every byte for O_DIRECT, and a digest needs the bytes: copy() says no, writes nothing."""
    src, _ = _source(tmp_path)
    with durability(durable):
        f = OutputFile(tmp_path / "f.bin", digest=digest)
        assert not f.copy(src, 0, 100)
        f.write(b"x")
        f.close()
    assert (tmp_path / "f.bin").read_bytes() == b"x"


def test_copy_across_filesystems_reads_and_writes(tmp_path, monkeypatch):
    """copy_file_range refused (EXDEV: source on another filesystem): the same bytes by read and write."""
    src, data = _source(tmp_path)

    def refuse(*args):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    with durability(False):
        f = OutputFile(tmp_path / "f.bin")
        f.write(b"a")
        assert f.copy(src, 5, len(data) - 5)
        f.close()
    assert (tmp_path / "f.bin").read_bytes() == b"a" + data[5:]


def test_copy_of_a_source_cut_short_names_it(tmp_path):
    """A source that ends before the range (truncated under the run): an error naming the file, not a short output."""
    src, data = _source(tmp_path, 1000)
    with durability(False):
        f = OutputFile(tmp_path / "f.bin")
        assert f.copy(src, 500, 600)
        with pytest.raises(QuantkitError, match="src.bin: truncated while being read"):
            f.close()
