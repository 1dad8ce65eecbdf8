"""Staged output: nothing half-written is ever left where a finished checkpoint should be.

A folder OUT is written into a temporary folder beside it (`.OUT.quantkit-partial-PID`), fsynced and renamed
into place only when complete; a single file OUT (a .gguf) likewise into `.OUT.quantkit-partial-PID`. An OUT
that is a symlink is written where it points (the link stays). The source is only ever read: OUT may never be
SRC, one of its files (through a link too), lie inside it, or contain it. A run holds an advisory lock
(`.OUT.quantkit-lock`) while it writes, so a second run on the same OUT fails at once. Free space is
checked against the plan before writing. Leftovers of killed runs are found here, for verify and for the
next run.

A live run holds an flock on its temporary folder or file; the kernel drops it when the process ends, however
it ends. So a leftover is one nobody holds, whatever process its PID names now: it is adopted (--resume) or
removed by the next run that finishes OUT, and a temporary output whose writer still runs is never touched.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

from quantkit.errors import QuantkitError, raise_if_interrupted
from quantkit.io.outfile import file_digest, sync
from quantkit.io.safetensors import CheckpointWriter, OutputTensor
from quantkit.io.source import Checkpoint

LEFTOVER = re.compile(r"\.quantkit-(partial|old)-\d+$")


def output_path(out: Path) -> Path:
    """Where OUT's bytes go: the path with every symlink followed (the last one even when it dangles), so a
    link named as OUT is kept and what it points to is replaced."""
    return Path(os.path.realpath(out))


def partial_name(out: Path) -> Path:
    """Where a run writing OUT keeps its work until it is complete."""
    target = output_path(out)
    return target.parent / f".{target.name}.quantkit-partial-{os.getpid()}"


def lock_name(out: Path) -> Path:
    target = output_path(out)
    return target.parent / f".{target.name}.quantkit-lock"


def leftovers_of(out: Path) -> list[str]:
    """Names of the temporary files or folders interrupted runs left beside OUT."""
    target = output_path(out)
    return sorted(p.name for p in target.parent.glob(f".{glob.escape(target.name)}.quantkit-*") if LEFTOVER.search(p.name))


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the advisory lock beside OUT while writing it; a run that finds it held fails at once.

    The lock file is removed on release. A run that opened it just before is not fooled: after locking,
    the name must still lead to the file it locked, else it locks the new one."""
    path = lock_name(out)
    while True:
        try:
            _make_parent(path)  # OUT's parent is created (as for a folder OUT); a file there is one clear line
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise QuantkitError(f"{out}: cannot create its lock file {path.name} ({e.strerror})", "check permissions") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise QuantkitError(f"{out}: another quantkit run is writing it (lock {path})", "wait for it to finish") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def check_output(src: Path, out: Path, force: bool, single_file: bool = False) -> None:
    """Refuse to clobber or to touch the source, before any work: OUT needs a name ('.' has none); an
    existing OUT needs --force (a folder OUT may exist empty); OUT, or what it links to, may never be SRC,
    one of SRC's files, lie inside SRC or contain SRC or any file SRC links to."""
    src_r, target = src.resolve(), output_path(out)
    if target == src_r:
        raise QuantkitError(f"{out}: output is the source", "choose another OUT")
    if target.is_relative_to(src_r):
        raise QuantkitError(f"{out}: output is inside the source folder {src}", "choose an OUT outside SRC")
    if src_r.is_relative_to(target):
        raise QuantkitError(f"{out}: the source {src} is inside the output folder", "--force would delete the source")
    for file in _source_files(src):
        if file == target:
            raise QuantkitError(f"{out}: is a file of the source {src} (through a link)", "choose another OUT")
        if file.is_relative_to(target):
            raise QuantkitError(f"{out}: holds the file {file.name} that the source {src} links to", "choose another OUT")
    if out.name in ("", ".", ".."):  # renaming the finished output onto '.' would pull the folder from under the shell
        raise QuantkitError(f"{out}: OUT must name the {'file' if single_file else 'folder'} to create",
                            "give a new name, e.g. ./out")
    check_clobber(out, force, single_file)


def check_clobber(out: Path, force: bool, single_file: bool = False) -> None:
    """An existing OUT needs --force (a folder OUT may exist empty) and must be of the kind written.
    Checked up front, and again under the lock (another run may have written OUT meanwhile)."""
    target = output_path(out)
    if single_file:
        if target.is_dir():
            raise QuantkitError(f"{out}: is a folder; GGUF output is a single .gguf file")
        if target.exists() and not force:
            raise QuantkitError(f"{out}: already exists", "pass --force to replace it")
        return
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        if not force:
            raise QuantkitError(f"{out}: already exists", "pass --force to replace it")
        if not target.is_dir():
            raise QuantkitError(f"{out}: exists and is not a folder")


def _source_files(src: Path) -> list[Path]:
    """Every file of SRC as the links in it resolve (a hub cache snapshot links into ../../blobs/)."""
    if not src.is_dir():
        return [src.resolve()]
    with contextlib.suppress(OSError, RuntimeError):
        return [p.resolve() for p in src.rglob("*")]
    return []


def check_free_space(out: Path, needed: int) -> None:
    parent = out.resolve().parent
    try:
        free = shutil.disk_usage(parent).free
    except OSError:
        return
    if free < needed:
        raise QuantkitError(f"{out}: needs {needed / 1e6:.1f} MB but only {free / 1e6:.1f} MB are free on {parent}")


MANIFEST = ".quantkit-manifest.json"  # in a partial folder: the run's fingerprint and its finished shards


def hold(path: Path) -> int:
    """Mark `path` (a temporary folder or file) as being written by this process: an flock the kernel
    releases when the process ends. Returns the descriptor to close once the run is over."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise
    return fd


def _running(leftover: Path) -> bool:
    """Whether a live run still holds `leftover` (then it is not a leftover yet). The PID in its name is
    no evidence: a killed run's PID may belong to an unrelated process by now."""
    try:
        os.close(hold(leftover))
    except BlockingIOError:
        return True
    except OSError:  # gone meanwhile, or not ours to open: leave it alone
        return True
    return False


def leftovers_beside(out: Path, keep: Path | None = None) -> list[Path]:
    """Temporary files and folders of runs writing OUT that were killed (no live process holds them)."""
    target = output_path(out)
    found = target.parent.glob(f".{glob.escape(target.name)}.quantkit-*-*")
    return [p for p in found if p != keep and LEFTOVER.search(p.name) and not _running(p)]


def remove_leftovers(out: Path, keep: Path | None = None) -> None:
    """Once OUT is finished, what killed runs left beside it goes (verify would flag it for good)."""
    for leftover in leftovers_beside(out, keep):
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                leftover.unlink()


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

    def __init__(self, out: Path, fingerprint: str = "", resume: bool = False, force: bool = False):
        self.out = output_path(out)
        self.fingerprint = fingerprint
        self.finished: dict[str, str] = {}  # shard file name -> outfile.file_digest
        self._writer: CheckpointWriter | None = None
        with contextlib.ExitStack() as held:
            held.enter_context(output_lock(out))
            check_clobber(out, force)
            try:
                self.tmp = partial_name(out)
                if self.tmp.exists():
                    shutil.rmtree(self.tmp)
                if not (resume and self._adopt_leftover()):
                    self.tmp.mkdir()
                self._hold = hold(self.tmp)
            except OSError as e:
                raise QuantkitError(f"{out}: cannot create the output folder ({e.strerror})", "check permissions") from None
            self._lock = held.pop_all()

    def _adopt_leftover(self) -> bool:
        for old in sorted(leftovers_beside(self.out, self.tmp), key=lambda p: p.stat().st_mtime, reverse=True):
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
            sync(f.fileno())
        os.replace(staging, self.tmp / MANIFEST)

    def shard_done(self, name: str, digest: str) -> None:
        """Record a finished (fsynced) shard and its digest, so that a run killed later can resume after it."""
        self.finished[name] = digest
        self._write_manifest()

    def __enter__(self) -> StagedOutput:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is not None:
                if self._writer is not None:
                    self._writer.abort()  # an open shard would keep its blocks (a full disk stays full)
                shutil.rmtree(self.tmp, ignore_errors=True)
        finally:
            os.close(self._hold)
            self._lock.close()

    def writer(self, outputs: list[OutputTensor], max_shard_size: int) -> CheckpointWriter:
        """The shard writer for this folder: it skips shards a resumed run holds and records finished ones."""
        self._writer = CheckpointWriter(self.tmp, outputs, max_shard_size, self.shard_done)
        self._writer.reuse(set(self.finished))
        return self._writer

    def commit(self) -> None:
        raise_if_interrupted()
        (self.tmp / MANIFEST).unlink(missing_ok=True)
        fd = os.open(self.tmp, os.O_RDONLY)
        try:
            sync(fd)
        finally:
            os.close(fd)
        old = None
        if self.out.exists():  # the old OUT stays in place until the new one is complete
            old = self.out.with_name(f".{self.out.name}.quantkit-old-{os.getpid()}")
            os.rename(self.out, old)
        os.rename(self.tmp, self.out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        remove_leftovers(self.out)


def _make_parent(out: Path) -> None:
    """OUT's folder is created as needed; a parent that is a file or cannot be written is one clear line."""
    parent = out.absolute().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise QuantkitError(f"{out}: {parent} is not a folder", "choose an OUT inside a folder") from None


class StagedFile:
    """A single-file OUT (a .gguf) written as `.OUT.quantkit-partial-PID` beside it, held while it is written,
    renamed over OUT by commit(), deleted on any failure."""

    def __init__(self, out: Path):
        self.out = output_path(out)
        self.tmp = partial_name(out)
        try:
            _make_parent(out)
            fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            os.close(fd)
            self._hold = hold(self.tmp)
        except OSError as e:
            with contextlib.suppress(OSError):
                self.tmp.unlink()
            raise QuantkitError(f"{out}: cannot create the output file ({e.strerror})", "check permissions") from None

    def __enter__(self) -> StagedFile:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            with contextlib.suppress(OSError):
                self.tmp.unlink()
        os.close(self._hold)

    def commit(self) -> None:
        raise_if_interrupted()
        os.replace(self.tmp, self.out)
        remove_leftovers(self.out)


def os_error(e: OSError, out: Path) -> QuantkitError:
    return QuantkitError(f"{out}: {e.strerror or e} while writing", "check free space and permissions")


def write_staged(out: Path, outputs: list[OutputTensor], max_shard_size: int, fill: Callable[[CheckpointWriter], None],
                 finish: Callable[[Path], list[str]], fingerprint: str = "", resume: bool = False,
                 force: bool = False) -> tuple[list[str], list[str]]:
    """Write a checkpoint folder the safe way: `fill` streams the planned tensors through a shard writer,
    `finish` adds config and side files to the folder (returning their names), then the folder becomes OUT.
    Returns (weight files, finish's files); a disk error becomes one QuantkitError naming OUT."""
    with StagedOutput(out, fingerprint, resume, force) as staged:
        try:
            writer = staged.writer(outputs, max_shard_size)
            fill(writer)
            files = writer.finish()
            extra = finish(staged.tmp)
            staged.commit()
        except OSError as e:
            raise os_error(e, out) from None
    return files, extra




def bytes_on_disk(out: Path, files: list[str]) -> int:
    return sum((out / f).stat().st_size for f in files)


def replace_json(path: Path, data: dict) -> None:
    """Rewrite a JSON file in place (key order kept), through a temporary file renamed over it."""
    temp = path.with_name(f".{path.name}.quantkit-partial-{os.getpid()}")
    try:
        with open(temp, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2) + "\n")
            f.flush()
            sync(f.fileno())
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
