"""detect -> plan -> stream -> rewrite, shared by quantize, dequantize and convert.

Output goes to a temporary folder beside OUT, is fsynced, and is renamed into place only when complete;
the source is only ever read. One tensor at a time, in source-shard order, in row chunks.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from quantkit.dtypes import NAME_OF
from quantkit.errors import QuantkitError
from quantkit.formats.outfile import file_digest
from quantkit.formats.safetensors import CheckpointWriter, OutputTensor, ShardReader, TensorInfo, iter_row_chunks
from quantkit.plan import Entry, Plan, QuantOptions, make_dequant_plan, make_plan, quantizer_for
from quantkit.source import Checkpoint, open_checkpoint, resolve

COPY_CHUNK = 16 << 20
Progress = Callable[[int, int, str], None]  # (bytes done, bytes total, current tensor)


def _no_progress(done: int, total: int, name: str) -> None:
    pass


# ---------------------------------------------------------------- output safety


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
            self.tmp = parent / f".{out.name}.quantkit-partial-{os.getpid()}"
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


# ---------------------------------------------------------------- streaming


@dataclass
class ShardWeight:
    """A weight read in row chunks from an open shard; Conv1D weights are transposed to [out, in]."""

    reader: ShardReader
    info: TensorInfo
    transposed: bool

    @property
    def shape(self) -> tuple[int, ...]:
        return self.info.shape[::-1] if self.transposed else self.info.shape

    @property
    def dtype(self) -> str:
        return self.info.dtype

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        if self.transposed:  # Conv1D weights are small enough to turn around whole
            whole = np.ascontiguousarray(self.reader.read(self.info).T)
            for start in range(0, whole.shape[0], rows):
                yield whole[start : start + rows]
            return
        for start in range(0, self.shape[0], rows):
            yield self.reader.read_rows(self.info, start, min(self.shape[0], start + rows))


def copy_tensor(reader: ShardReader, info: TensorInfo, name: str, writer: CheckpointWriter) -> None:
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


# ---------------------------------------------------------------- quantize


@dataclass
class Result:
    out: Path
    plan_bytes: int
    files: list[str]
    summary: dict


def prepare_quantize(src: str, options: QuantOptions, revision: str | None = None) -> tuple[Checkpoint, Plan]:
    """detect + plan: everything cheap is validated here, before a weight is read."""
    checkpoint = open_checkpoint(resolve(src, revision))
    plan = make_plan(checkpoint, options)
    plan.entries = ordered(checkpoint, plan.entries)
    return checkpoint, plan


def quantize(src: str, out: Path, options: QuantOptions, force: bool = False, revision: str | None = None,
             progress: Progress = _no_progress, resume: bool = False) -> Result:
    checkpoint, plan = prepare_quantize(src, options, revision)
    check_output(checkpoint.root, out, force)
    check_free_space(out, plan.output_bytes)
    quantizer = quantizer_for(options.method)

    def handle(reader: ShardReader, entry: Entry, info: TensorInfo, writer: CheckpointWriter) -> None:
        if entry.fate == "quantize":
            quantizer.quantize(entry.module, ShardWeight(reader, info, entry.transposed), options, writer)
        elif entry.fate == "keep":
            copy_tensor(reader, info, entry.source, writer)

    def finish(folder: Path) -> list[str]:
        write_config(folder, {**checkpoint.config, "quantization_config": plan.quantization_config})
        return copy_side_files(checkpoint, folder)

    files, side = write_staged(out, plan.outputs, options.max_shard_size,
                               lambda writer: stream_entries(checkpoint, plan.entries, writer, handle, progress), finish,
                               run_fingerprint(checkpoint.files, plan.outputs, options), resume)
    counts = plan.counts()
    summary = {
        "method": options.method,
        "quantized": counts.get("quantize", 0),
        "kept": counts.get("keep", 0),
        "dropped": counts.get("drop", 0),
        "skipped_modules": plan.skipped_modules,
        "unmatched_skips": plan.unmatched_skips,
        "input_bytes": sum(checkpoint.tensors[e.source].nbytes for e in plan.entries),
        "output_bytes": sum((out / f).stat().st_size for f in files),
        "side_files": side,
    }
    return Result(out, plan.output_bytes, files, summary)


# ---------------------------------------------------------------- dequantize


class TensorReads:
    """Reads whole tensors by name from whichever shard holds them (companions may live elsewhere)."""

    def __init__(self, checkpoint: Checkpoint, current: ShardReader):
        self.checkpoint = checkpoint
        self.current = current

    def __call__(self, name: str) -> np.ndarray:
        info = self.checkpoint.tensors[name]
        if info.file == self.current.path:
            return self.current.read(info)
        with ShardReader(info.file) as other:
            return other.read(info)


def dequantize(src: str, out: Path, dtype: str | None = None, max_shard_size: int = 5 * 10**9, force: bool = False,
               revision: str | None = None, progress: Progress = _no_progress, resume: bool = False) -> Result:
    """A quantized checkpoint back to dense safetensors with the original names; config loses quantization_config."""
    path = resolve(src, revision)
    if path.is_file() and path.suffix == ".gguf":
        from quantkit import gguf_convert

        summary = gguf_convert.convert(src, out, "safetensors", dtype=dtype, force=force, revision=revision,
                                       max_shard_size=max_shard_size, progress=progress)
        return Result(out, summary.get("output_bytes", 0), summary.get("files", []), summary)
    checkpoint = open_checkpoint(path)
    plan = make_dequant_plan(checkpoint, dtype)
    dequantizer, modules, dense_dtype = plan.dequantizer, plan.modules, plan.dtype
    entries = ordered(checkpoint, plan.entries)
    outputs = [o for e in entries for o in e.outputs]
    check_output(checkpoint.root, out, force)
    check_free_space(out, sum(o.nbytes for o in outputs))

    def handle(reader: ShardReader, entry: Entry, info: TensorInfo, writer: CheckpointWriter) -> None:
        if entry.fate == "dequantize":
            names = modules[entry.module]
            dequantizer.dequantize(checkpoint, entry.module, names, TensorReads(checkpoint, reader), dense_dtype, writer)
        elif entry.fate == "keep":
            copy_tensor(reader, info, entry.source, writer)

    def finish(folder: Path) -> list[str]:
        write_config(folder, {k: v for k, v in checkpoint.config.items() if k != "quantization_config"})
        return copy_side_files(checkpoint, folder, dense=True)

    files, _ = write_staged(out, outputs, max_shard_size,
                            lambda writer: stream_entries(checkpoint, entries, writer, handle, progress), finish,
                            run_fingerprint(checkpoint.files, outputs, (dense_dtype, max_shard_size)), resume)
    summary = {
        "method": dequantizer.quant_method,
        "dtype": NAME_OF[dense_dtype],
        "dequantized": sum(e.fate == "dequantize" for e in entries),
        "kept": sum(e.fate == "keep" for e in entries),
        "output_bytes": sum((out / f).stat().st_size for f in files),
    }
    return Result(out, sum(o.nbytes for o in outputs), files, summary)
