"""detect -> plan -> stream -> rewrite: quantize, dequantize and convert, dispatched through the registry.

Output goes to a temporary folder beside OUT, is fsynced, and is renamed into place only when complete
(quantkit.io.staged); the source is only ever read. One tensor at a time, in source-shard order, in row
chunks (quantkit.io.stream).
"""

from __future__ import annotations

from pathlib import Path

from quantkit import api, methods
from quantkit.dtypes import NAME_OF
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import CheckpointWriter, ShardReader, TensorInfo
from quantkit.io.source import HUB_PATTERNS, Checkpoint, open_checkpoint, resolve
from quantkit.io.staged import (
    bytes_on_disk,
    check_free_space,
    check_output,
    copy_side_files,
    run_fingerprint,
    write_config,
    write_staged,
)
from quantkit.io.stream import Entry, Progress, ShardWeight, TensorReads, copy_tensor, no_progress, ordered, stream_entries
from quantkit.io.torchpickle import TORCH_INDEX
from quantkit.plan import Plan, make_dequant_plan, make_plan, quantizer_for

Result = api.Result


def prepare_quantize(src: str, options: api.Options, revision: str | None = None) -> tuple[Checkpoint, Plan]:
    """detect + plan: everything cheap is validated here, before a weight is read."""
    checkpoint = open_checkpoint(resolve(src, revision))
    plan = make_plan(checkpoint, options)
    plan.entries = ordered(checkpoint, plan.entries)
    return checkpoint, plan


def quantize(src: str, out: Path, options: api.Options, force: bool = False, revision: str | None = None,
             progress: Progress = no_progress, resume: bool = False) -> Result:
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
        "output_bytes": bytes_on_disk(out, files),
        "side_files": side,
    }
    return Result(out, files, summary, [f"warning: --skip {glob!r} matched no linear module" for glob in plan.unmatched_skips])



def dequantize(src: str, out: Path, dtype: str | None = None, max_shard_size: int = 5 * 10**9, force: bool = False,
               revision: str | None = None, progress: Progress = no_progress, resume: bool = False) -> Result:
    """A quantized checkpoint back to dense safetensors with the original names; config loses quantization_config."""
    path = resolve(src, revision)
    methods.load()
    file_format = api.file_format_of(path)
    if file_format is not None:
        return file_format.to_dense(src, path, Path(out), dtype, force, max_shard_size, progress)
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
        "output_bytes": bytes_on_disk(out, files),
    }
    return Result(out, files, summary)


def convert(src: str, out: Path, to: str, gguf_type: str = "F16", dtype: str | None = None, force: bool = False,
            revision: str | None = None, max_shard_size: int = 5 * 10**9, progress: Progress = no_progress,
            imatrix: str | None = None) -> Result:
    """`quantkit convert`: a registered converter for `to`; `--to safetensors` is the source format's own
    dense writer (a .gguf, PyTorch .bin)."""
    methods.load()
    if to == "safetensors":
        path = resolve(src, revision, patterns=HUB_PATTERNS + ["*.bin", TORCH_INDEX])
        file_format = api.file_format_of(path)
        if file_format is None:
            raise QuantkitError(f"{src}: no PyTorch .bin/.pt weights or .gguf file to convert",
                                "--to safetensors reads PyTorch checkpoints and .gguf files")
        return file_format.to_dense(src, path, Path(out), dtype, force, max_shard_size, progress)
    if to not in api.CONVERTERS:
        raise QuantkitError(f"convert {src} --to {to}: not supported", f"choose one of safetensors, {', '.join(sorted(api.CONVERTERS))}")
    if imatrix is not None and to != "gguf":
        raise QuantkitError(f"--imatrix applies to --to gguf, not --to {to}")
    request = api.ConvertRequest(src, Path(out), gguf_type, dtype, force, revision, max_shard_size, imatrix)
    return api.CONVERTERS[to](request, progress)
