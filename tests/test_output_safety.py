"""Output safety: no clobbering, SRC never touched, atomic output, clean Ctrl-C, SIGKILL leftovers that
verify flags, --resume, a full disk and a denied write rolled back. Interrupts use the real console
script in a subprocess on a checkpoint large enough to take a few seconds."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from quantkit import pipeline
from quantkit.io import staged
from tests.hostile_files import one_error_line, tiny_tensors, tree_digest, write_checkpoint

QUANTKIT = str(Path(sys.executable).with_name("quantkit"))


def refused(cli, *args, naming: str) -> None:
    code, _, stderr = cli(*args)
    assert code == 2, stderr
    assert naming in one_error_line(stderr)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*quantkit-*"))


# ---------------------------------------------------------------- --no-sync


@pytest.mark.parametrize("command", [("quantize", "--method", "fp8"), ("dequantize",), ("convert", "--to", "gguf")],
                         ids=["quantize", "dequantize", "convert"])
def test_no_sync_writes_the_same_bytes_without_fsync(ckpt, tmp_path, cli, monkeypatch, command):
    """--no-sync: the same output, written without one fsync (durable runs fsync every file and folder)."""
    verb, *flags = command
    source = ckpt
    if verb == "dequantize":
        source = tmp_path / "nf4"
        assert cli("quantize", ckpt, source, "--method", "nf4")[0] == 0
    suffix = ".gguf" if verb == "convert" else ""
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    code, _, err = cli(verb, source, tmp_path / f"durable{suffix}", *flags)
    assert code == 0, err
    assert synced
    synced.clear()
    copied: list[int] = []
    real_copy = os.copy_file_range
    monkeypatch.setattr(os, "copy_file_range", lambda *a: (copied.append(a[2]), real_copy(*a))[1])
    code, _, err = cli(verb, source, tmp_path / f"fast{suffix}", *flags, "--no-sync")
    assert code == 0, err
    assert synced == []
    if not suffix:  # kept tensors went from the source's file to the output's by copy_file_range
        assert copied
    if suffix:
        assert (tmp_path / "fast.gguf").read_bytes() == (tmp_path / "durable.gguf").read_bytes()
    else:
        weights = sorted(p.name for p in (tmp_path / "durable").glob("*.safetensors"))
        assert weights and weights == sorted(p.name for p in (tmp_path / "fast").glob("*.safetensors"))
        for name in [*weights, "config.json"]:
            assert (tmp_path / "fast" / name).read_bytes() == (tmp_path / "durable" / name).read_bytes(), name


def test_api_sync_false_is_no_sync(ckpt, tmp_path, monkeypatch):
    """quantkit.quantize(..., sync=False) writes what the default writes, without fsync; the default after it syncs."""
    import quantkit

    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    quantkit.quantize(ckpt, tmp_path / "fast", method="nf4", sync=False)
    assert synced == []
    quantkit.quantize(ckpt, tmp_path / "durable", method="nf4")
    assert synced
    assert (tmp_path / "fast" / "model.safetensors").read_bytes() == (tmp_path / "durable" / "model.safetensors").read_bytes()


# ---------------------------------------------------------------- clobbering


@pytest.mark.parametrize("command", [("quantize", "--method", "nf4"), ("convert", "--to", "gguf")], ids=["quantize", "convert"])
def test_existing_non_empty_out_needs_force(ckpt, tmp_path, cli, command):
    verb, *flags = command
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    if verb == "convert":
        out = tmp_path / "out.gguf"
        out.write_text("mine")
    refused(cli, verb, ckpt, out, *flags, naming="already exists")
    code, _, err = cli(verb, ckpt, out, *flags, "--force")
    assert code == 0, err


def test_empty_out_folder_is_fine(ckpt, tmp_path, cli):
    (tmp_path / "out").mkdir()
    code, _, err = cli("quantize", ckpt, tmp_path / "out", "--method", "nf4")
    assert code == 0, err


@pytest.mark.parametrize("out, message", [
    (".", "output is the source"),
    ("sub/out", "output is inside the source folder"),
    ("..", "the source"),
], ids=["same", "out-inside-src", "src-inside-out"])  # fmt: skip
def test_out_overlapping_src_is_refused_even_with_force(ckpt, cli, out, message):
    before = tree_digest(ckpt.parent)
    refused(cli, "quantize", ckpt, ckpt / out, "--method", "nf4", "--force", naming=message)
    refused(cli, "convert", ckpt, ckpt / out, "--to", "safetensors", "--force", naming="")
    assert tree_digest(ckpt.parent) == before


def test_src_is_never_modified(ckpt, tmp_path, cli):
    (ckpt / "generation_config.json").write_text("{}")
    before = tree_digest(ckpt)
    for args in (("quantize", ckpt, tmp_path / "q", "--method", "int8"), ("convert", ckpt, tmp_path / "m.gguf", "--to", "gguf"),
                 ("verify", ckpt), ("inspect", ckpt)):
        code, _, err = cli(*args)
        assert code == 0, err
    code, _, err = cli("dequantize", tmp_path / "q", tmp_path / "d")
    assert code == 0, err
    assert tree_digest(ckpt) == before


def test_failed_run_with_force_keeps_the_old_out(ckpt, tmp_path, cli, monkeypatch):
    out = tmp_path / "out"
    code, _, err = cli("quantize", ckpt, out, "--method", "nf4")
    assert code == 0, err
    before = tree_digest(out)

    def boom(*args):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(pipeline, "write_config", boom)  # fails while finishing, after the weights
    refused(cli, "quantize", ckpt, out, "--method", "int8", "--force", naming="Input/output error")
    assert tree_digest(out) == before and leftovers(tmp_path) == []


# ---------------------------------------------------------------- disk full, permission denied


@pytest.fixture
def tiny_disk(tmp_path):
    """A 256 KiB tmpfs (needs root); skipped where mounting is not allowed."""
    with tmpfs(tmp_path / "disk", "size=256k") as mount:
        yield mount


@contextmanager
def tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted at `mount` with `options` (needs root); the test is skipped where mounting is not allowed."""
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_free_space_is_checked_before_writing(tmp_path, tiny_disk, cli):
    big = write_checkpoint(tmp_path / "big", tiny_tensors(hidden=512))
    refused(cli, "quantize", big, tiny_disk / "out", "--method", "int8", naming="MB are free")
    assert list(tiny_disk.iterdir()) == []


@pytest.mark.parametrize("flags", [(), ("--no-sync",)], ids=["durable", "no-sync"])
def test_disk_full_while_writing_is_rolled_back(tmp_path, tiny_disk, cli, monkeypatch, flags):
    """--no-sync: the writer thread's and the kept tensors' copier thread's ENOSPC (the copy across
    filesystems falls back to read + write) reach the run as the same one-line error."""
    big = write_checkpoint(tmp_path / "big", tiny_tensors(hidden=512))
    monkeypatch.setattr(pipeline, "check_free_space", lambda out, needed: None)  # reach the real ENOSPC
    refused(cli, "quantize", big, tiny_disk / "out", "--method", "int8", *flags, naming="No space left on device")
    assert list(tiny_disk.iterdir()) == []


def test_permission_denied_is_rolled_back(ckpt, tmp_path, cli, monkeypatch):
    real_open = os.open

    def denied(path, flags, *args, **kwargs):
        if str(path).endswith(".safetensors") and flags & os.O_WRONLY:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)  # root ignores file modes; deny the shard write
    refused(cli, "quantize", ckpt, tmp_path / "out", "--method", "nf4", naming="Permission denied")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


# ---------------------------------------------------------------- interrupts (real process, real signals)


def start_quantize(src: Path, out: Path, *extra: str) -> subprocess.Popen:
    args = [QUANTKIT, "quantize", str(src), str(out), "--method", "nf4", "--backend", "numpy", "--max-shard-size", "5MB", *extra]
    return subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"finished before the signal: {proc.communicate()}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def finished_shards(folder: Path) -> dict:
    for partial in folder.glob(".out.quantkit-partial-*"):
        try:
            return json.loads((partial / staged.MANIFEST).read_text())["shards"]
        except (OSError, ValueError):
            return {}
    return {}


def test_ctrl_c_exits_130_and_removes_temporary_files(big_ckpt, tmp_path):
    proc = start_quantize(big_ckpt, tmp_path / "out")
    wait_for(lambda: any(tmp_path.glob(".out.quantkit-partial-*/model-*")), proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert one_error_line(stderr) == "interrupted: temporary output removed"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("rerun", ["--force", "--resume"])
def test_after_sigkill_nothing_passes_for_finished_and_a_rerun_succeeds(big_ckpt, tmp_path, cli, rerun):
    out = tmp_path / "out"
    proc = start_quantize(big_ckpt, out)
    wait_for(lambda: len(finished_shards(tmp_path)) >= 2, proc)
    proc.kill()
    proc.wait()
    done = finished_shards(tmp_path)
    partial = next(tmp_path.glob(".out.quantkit-partial-*"))
    assert not out.exists()
    code, stdout, _ = cli("verify", out, "--json")
    assert code == 1 and not json.loads(stdout)["ok"]
    code, stdout, _ = cli("verify", partial, "--json")
    assert code == 1 and json.loads(stdout)["checks"][0] == {
        "name": "leftovers", "ok": False, "detail": f"{partial.name} is the temporary folder of an interrupted run"}

    kept, damaged = sorted(done)[:2]
    inode = (partial / kept).stat().st_ino
    with open(partial / damaged, "r+b") as f:  # a finished shard that no longer hashes right is redone
        f.seek(-1, os.SEEK_END)
        f.write(b"\xff")
    code, _, err = cli("quantize", big_ckpt, out, "--method", "nf4", "--backend", "numpy", "--max-shard-size", "5MB", rerun)
    assert code == 0, err
    assert leftovers(tmp_path) == []
    assert ((out / kept).stat().st_ino == inode) == (rerun == "--resume")
    code, _, err = cli("quantize", big_ckpt, tmp_path / "fresh", "--method", "nf4", "--max-shard-size", "5MB")
    assert code == 0, err
    assert tree_digest_bytes(out) == tree_digest_bytes(tmp_path / "fresh")
    code, _, _ = cli("verify", out)
    assert code == 0


def tree_digest_bytes(folder: Path) -> dict[str, bytes]:
    return {name: data for name, (data, _) in tree_digest(folder).items()}


def test_resume_ignores_a_leftover_of_different_settings(ckpt, tmp_path, cli):
    stale = tmp_path / ".out.quantkit-partial-999999999"
    stale.mkdir()
    (stale / staged.MANIFEST).write_text(json.dumps({"fingerprint": "other", "shards": {"model.safetensors": "0"}}))
    (stale / "model.safetensors").write_bytes(b"junk")
    code, _, err = cli("quantize", ckpt, tmp_path / "out", "--method", "nf4", "--resume")
    assert code == 0, err
    assert leftovers(tmp_path) == [] and (tmp_path / "out" / "model.safetensors").stat().st_size > 4


class Killed(BaseException):
    """Stands in for SIGKILL in-process: nothing catches it and nothing is cleaned up."""


def test_dequantize_resume(tmp_path, cli, monkeypatch):
    rng = np.random.default_rng(2)
    tensors = {f"model.layers.{i}.mlp.up_proj.weight": rng.standard_normal((256, 256), dtype=np.float32) for i in range(4)}
    code, _, err = cli("quantize", write_checkpoint(tmp_path / "src", tensors), tmp_path / "q", "--method", "int8")
    assert code == 0, err
    record = staged.StagedOutput.shard_done

    def killed_after_first_shard(self, name, digest):
        record(self, name, digest)
        raise Killed

    with monkeypatch.context() as m:
        m.setattr(staged.StagedOutput, "shard_done", killed_after_first_shard)
        # a killed run cleans nothing up: the kernel drops its locks
        m.setattr(staged.StagedOutput, "__exit__", lambda self, *exc: os.close(self._hold) or self._lock.close())
        with pytest.raises(Killed):
            pipeline.dequantize(str(tmp_path / "q"), tmp_path / "out", max_shard_size=300_000)
    partial = next(tmp_path.glob(".out.quantkit-partial-*"))
    partial = partial.rename(tmp_path / ".out.quantkit-partial-999999999")  # as if its process were gone
    (first,) = json.loads((partial / staged.MANIFEST).read_text())["shards"]
    inode = (partial / first).stat().st_ino
    code, _, err = cli("dequantize", tmp_path / "q", tmp_path / "out", "--max-shard-size", "300KB", "--resume")
    assert code == 0, err
    assert (tmp_path / "out" / first).stat().st_ino == inode and leftovers(tmp_path) == []
    code, _, err = cli("dequantize", tmp_path / "q", tmp_path / "fresh", "--max-shard-size", "300KB")
    assert tree_digest_bytes(tmp_path / "out") == tree_digest_bytes(tmp_path / "fresh")
