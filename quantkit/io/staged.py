"""Staged output: nothing half-written is ever left where a finished checkpoint should be.

A folder OUT is written into a temporary folder beside it (`.OUT.quantkit-partial-PID`), fsynced and renamed
into place only when complete; a single file OUT (a .gguf) likewise into `.OUT.quantkit-partial-PID`. The
source is only ever read: OUT may never be SRC, lie inside it, or contain it. Free space is checked against
the plan before writing. Leftovers of killed runs are found here, for verify and for the next run.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.io.outfile import file_digest
from quantkit.io.safetensors import CheckpointWriter, OutputTensor
from quantkit.io.source import Checkpoint

LEFTOVER = re.compile(r"\.quantkit-(partial|old)-\d+$")


def partial_name(out: Path) -> Path:
    """Where a run writing OUT keeps its work until it is complete."""
    return out.resolve().parent / f".{out.name}.quantkit-partial-{os.getpid()}"


def leftovers_of(out: Path) -> list[str]:
    """Names of the temporary files or folders interrupted runs left beside OUT."""
    return [p.name for p in out.resolve().parent.glob(f".{glob.escape(out.name)}.quantkit-*") if LEFTOVER.search(p.name)]


def check_output(src: Path, out: Path, force: bool) -> None:
    """Refuse to clobber: an existing non-empty OUT needs --force; OUT may never be or contain SRC."""
    src_r, out_r = src.resolve(), out.resolve()
    if src_r == out_r:
        raise QuantkitError(f"{out}: output is the source", "choose another OUT")
    if out_r.is_relative_to(src_r) and src_r.is_dir():
        raise QuantkitError(f"{out}: output is inside the source folder {src}", "choose an OUT outside SRC")
    if src_r.is_relative_to(out_r):
        raise QuantkitError(f"{out}: the source {src} is inside the output folder", "--force would delete the source")
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        if not force:
            raise QuantkitError(f"{out}: already exists", "pass --force to replace it")
        if not out.is_dir():
            raise QuantkitError(f"{out}: exists and is not a folder")


def check_free_space(out: Path, needed: int) -> None:
    parent = out.resolve().parent
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if free < needed:
        raise QuantkitError(f"{out}: needs {needed / 1e6:.1f} MB but only {free / 1e6:.1f} MB are free on {parent}")


MANIFEST = ".quantkit-manifest.json"  # in a partial folder: the run's fingerprint and its finished shards


def _running(leftover: Path) -> bool:
    """Whether the process whose pid ends a leftover's name still runs (then it is not a leftover yet)."""
    try:
        os.kill(int(leftover.name.rsplit("-", 1)[1]), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


def run_fingerprint(sources: list[Path], outputs: list[OutputTensor], settings: object) -> str:
    """What makes two runs write the same shards: the source files as they are, the plan, the settings."""
    files = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in sources]
    plan = [(o.name, o.dtype, list(o.shape)) for o in outputs]
    return hashlib.sha256(json.dumps([files, plan, repr(settings)]).encode()).hexdigest()


class StagedOutput:
    """A temporary folder beside OUT that becomes OUT on commit() and vanishes on any failure.

    A SIGKILL leaves the folder behind with a manifest of the shards finished so far (a digest each);
    `resume` adopts such a folder when its fingerprint matches and keeps the shards that still hash right.
    """

    def __init__(self, out: Path, fingerprint: str = "", resume: bool = False):
        self.out = out
        self.fingerprint = fingerprint
        self.finished: dict[str, str] = {}  # shard file name -> outfile.file_digest
        self._writer: CheckpointWriter | None = None
        parent = out.resolve().parent
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.tmp = partial_name(out)
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            if not (resume and self._adopt_leftover()):
                self.tmp.mkdir()
        except OSError as e:
            raise QuantkitError(f"{out}: cannot create the output folder ({e.strerror})", "check permissions") from None

    def _leftovers(self) -> list[Path]:
        found = self.out.resolve().parent.glob(f".{glob.escape(self.out.name)}.quantkit-*-*")
        return [p for p in found if p != self.tmp and not _running(p)]

    def _adopt_leftover(self) -> bool:
        for old in sorted(self._leftovers(), key=lambda p: p.stat().st_mtime, reverse=True):
            try:
                manifest = json.loads((old / MANIFEST).read_text(encoding="utf-8"))
                shards = manifest["shards"] if manifest.get("fingerprint") == self.fingerprint else None
            except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
                continue
            if not isinstance(shards, dict):
                continue
            os.rename(old, self.tmp)
            for name, digest in shards.items():
                if isinstance(name, str) and "/" not in name and (self.tmp / name).is_file() and file_digest(self.tmp / name) == digest:
                    self.finished[name] = digest
            self._write_manifest()
            return True
        return False

    def _write_manifest(self) -> None:
        staging = self.tmp / (MANIFEST + ".new")
        with open(staging, "w", encoding="utf-8") as f:
            json.dump({"fingerprint": self.fingerprint, "shards": self.finished}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, self.tmp / MANIFEST)

    def shard_done(self, name: str, digest: str) -> None:
        """Record a finished (fsynced) shard and its digest, so that a run killed later can resume after it."""
        self.finished[name] = digest
        self._write_manifest()

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            if self._writer is not None:
                self._writer.abort()  # an open shard would keep its blocks (a full disk stays full)
            shutil.rmtree(self.tmp, ignore_errors=True)

    def writer(self, outputs: list[OutputTensor], max_shard_size: int) -> CheckpointWriter:
        """The shard writer for this folder: it skips shards a resumed run holds and records finished ones."""
        self._writer = CheckpointWriter(self.tmp, outputs, max_shard_size, self.shard_done)
        self._writer.reuse(set(self.finished))
        return self._writer

    def commit(self) -> None:
        (self.tmp / MANIFEST).unlink(missing_ok=True)
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        old = None
        if self.out.exists():  # the old OUT stays in place until the new one is complete
            old = self.out.with_name(f".{self.out.name}.quantkit-old-{os.getpid()}")
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        for leftover in self._leftovers():  # of runs killed before this one: OUT is finished now
            shutil.rmtree(leftover, ignore_errors=True)


def os_error(e: OSError, out: Path) -> QuantkitError:
    return QuantkitError(f"{out}: {e.strerror or e} while writing", "check free space and permissions")


def write_staged(out: Path, outputs: list[OutputTensor], max_shard_size: int, fill: Callable[[CheckpointWriter], None],
                 finish: Callable[[Path], list[str]], fingerprint: str = "", resume: bool = False) -> tuple[list[str], list[str]]:
    """Write a checkpoint folder the safe way: `fill` streams the planned tensors through a shard writer,
    `finish` adds config and side files to the folder (returning their names), then the folder becomes OUT.
    Returns (weight files, finish's files); a disk error becomes one QuantkitError naming OUT."""
    with StagedOutput(out, fingerprint, resume) as staged:
        try:
            writer = staged.writer(outputs, max_shard_size)
            fill(writer)
            files = writer.finish()
            extra = finish(staged.tmp)
            staged.commit()
        except OSError as e:
            raise os_error(e, out) from None
    return files, extra




def check_file_output(src: Path, out: Path, force: bool) -> None:
    """A single-file OUT (a .gguf): never the source, replaced (only once complete) with --force."""
    if out.resolve() == src.resolve():
        raise QuantkitError(f"{out}: output is the source", "choose another OUT")
    if out.is_dir():
        raise QuantkitError(f"{out}: is a folder; GGUF output is a single .gguf file")
    if out.exists() and not force:
        raise QuantkitError(f"{out}: already exists", "pass --force to replace it")


def bytes_on_disk(out: Path, files: list[str]) -> int:
    return sum((out / f).stat().st_size for f in files)


def replace_json(path: Path, data: dict) -> None:
    """Rewrite a JSON file in place (key order kept), through a temporary file renamed over it."""
    temp = path.with_name(f".{path.name}.quantkit-partial-{os.getpid()}")
    try:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except OSError as e:
        temp.unlink(missing_ok=True)
        raise QuantkitError(f"{path}: cannot rewrite ({e.strerror})") from None


def write_config(folder: Path, config: dict) -> None:
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# Side files that describe a quantization; a dense output must not carry them.
QUANTIZATION_SIDE_FILES = ("quantize_config.json", "quant_config.json")


def copy_side_files(checkpoint: Checkpoint, folder: Path, dense: bool = False) -> list[str]:
    copied = []
    for rel in checkpoint.side_files():
        if dense and rel.name in QUANTIZATION_SIDE_FILES:
            continue
        target = folder / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(checkpoint.root / rel, target)
        copied.append(str(rel))
    return copied
