"""detect -> plan -> stream -> rewrite: quantize, dequantize and convert, dispatched through the registry.

Output goes to a temporary folder beside OUT, is fsynced, and is renamed into place only when complete
(quantkit.io.staged); the source is only ever read. One tensor at a time, in source-shard order, in row
chunks (quantkit.io.stream).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import numpy as np

from quantkit import api, methods
from quantkit.dtypes import NAME_OF, STORAGE, itemsize, to_float32
from quantkit.errors import QuantkitError
from quantkit.io.card import write_card
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
from quantkit.io.stream import Entry, FiniteSink, Progress, TensorReads, copy_tensor, no_progress, ordered, stream_entries
from quantkit.io.torchpickle import TORCH_INDEX
from quantkit.numerics import CHUNK_ELEMENTS, COPY_CHUNK, ErrorSums
from quantkit.plan import Plan, make_dequant_plan, make_plan, plan_warnings, quantizer_for

Result = api.Result


def quantization_tags(config: dict) -> list[str]:
    """Hub tags from a quantization_config as transformers reads it: its quant_method and bit width."""
    bits = config.get("bits") or (4 if config.get("load_in_4bit") else 8 if config.get("load_in_8bit") else None)
    return [str(config.get("quant_method"))] + ([f"{bits}-bit"] if isinstance(bits, int) else [])


def open_source(src: str, revision: str | None = None) -> api.TensorSource:
    """SRC as dense tensors: a safetensors folder (dense, or quantized by any registered reader) or a file
    format that can present itself so (a .gguf)."""
    path = resolve(src, revision)
    methods.load()
    file_format = api.file_format_of(path)
    if file_format is None:
        return api.folder_source(open_checkpoint(path))
    if not hasattr(file_format, "source"):
        raise QuantkitError(f"{src}: {file_format.name} files cannot be read as a model here",
                            "convert it first: quantkit convert SRC OUT --to safetensors")
    return file_format.source(path)


def prepare_quantize(src: str, options: api.Options, revision: str | None = None, skip_source: str = "--skip",
                     refusals: bool = False) -> tuple[api.TensorSource, Plan]:
    """detect + plan: everything cheap is validated here, before a weight is read."""
    source = open_source(src, revision)
    plan = make_plan(source.checkpoint, options, skip_source, refusals)
    plan.entries = ordered(source.checkpoint, plan.entries)
    return source, plan


def quantize(src: str, out: Path, options: api.Options, force: bool = False, revision: str | None = None,
             progress: Progress = no_progress, resume: bool = False, skip_source: str = "--skip") -> Result:
    """Any source (dense, quantized, GGUF) to `options.method`. A quantized source's modules are moved without
    rounding where the target holds their integers (the quantizer's optional `transcode`), else dequantized
    in the source's arithmetic and quantized again, with the error that adds measured per tensor.
    `skip_source` is where options.skip came from (for warnings)."""
    source, plan = prepare_quantize(src, options, revision, skip_source)
    checkpoint = source.checkpoint
    check_output(checkpoint.root, out, force)
    check_free_space(out, plan.output_bytes)
    quantizer = quantizer_for(options.method)
    lossless: list[str] = []
    requantized: dict[str, ErrorSums] = {}

    def handle(entry: Entry, tensor: api.SourceTensor, writer: CheckpointWriter) -> None:
        if entry.fate == "keep":
            nbytes = math.prod(tensor.shape) * itemsize(tensor.dtype)
            if tensor.extent is None or not writer.copy(entry.source, *tensor.extent, nbytes):
                row_bytes = max(1, math.prod(tensor.shape[1:]) * itemsize(tensor.dtype))
                for chunk in tensor.chunks(max(1, COPY_CHUNK // row_bytes)):
                    writer.write(entry.source, chunk)
            writer.done(entry.source)
        elif not tensor.scheme:
            quantizer.quantize(entry.module, tensor, options, writer)
        elif transcoded(quantizer, entry.module, tensor, options, writer):
            lossless.append(entry.source)
        else:
            capture = api.CollectingSink(writer)
            quantizer.quantize(entry.module, tensor, options, capture)
            requantized[entry.source] = requantization_error(entry, tensor, capture, plan, checkpoint.config)

    def fill(writer: CheckpointWriter) -> None:
        total, done = sum(checkpoint.tensors[e.source].nbytes for e in plan.entries), 0

        def todo() -> Iterator[Entry]:
            for entry in plan.entries:
                if entry.fate != "drop" and not writer.skip_reused(o.name for o in entry.outputs):
                    yield entry

        for entry, tensor in source.stream(todo()):
            handle(entry, tensor, writer)
            done += checkpoint.tensors[entry.source].nbytes
            progress(done, total, entry.source)

    def finish(folder: Path) -> list[str]:
        write_config(folder, {**checkpoint.config, "quantization_config": plan.quantization_config})
        side = source.side_files(folder)
        # how the bytes were made (backend, device) is not part of what they are: the card leaves it out
        settings = {"method": options.method, **{k: v for k, v in asdict(options).items()
                                                 if k not in ("method", "max_shard_size", "backend", "device")}}
        card = write_card(folder, src, checkpoint.root, f"quantized to {options.method}",
                          [options.method, "quantized", *quantization_tags(plan.quantization_config)], settings,
                          carried=source.card)
        return [*(f for f in side if f != card), card]

    files, side = write_staged(out, plan.outputs, options.max_shard_size, fill, finish,
                               run_fingerprint(checkpoint.files, plan.outputs, options), resume, force)
    counts = plan.counts()
    summary = {
        "method": options.method,
        "quantized": counts.get("quantize", 0),
        "kept": counts.get("keep", 0),
        "dropped": counts.get("drop", 0),
        "skipped_modules": plan.skipped_modules,
        "unmatched_skips": plan.unmatched_skips,
        "unfit_modules": sorted(plan.unfit_modules),
        "input_bytes": sum(checkpoint.tensors[e.source].nbytes for e in plan.entries),
        "output_bytes": bytes_on_disk(out, files),
        "side_files": side,
    }
    if source.scheme:
        summary |= api.transcoding_summary(source.scheme, lossless, requantized)
    return Result(out, files, summary, plan_warnings(plan, skip_source))


def transcoded(quantizer: api.Quantizer, module: str, tensor: api.SourceTensor, options: api.Options,
               writer: CheckpointWriter) -> bool:
    """Whether the quantizer wrote the tensor's integers as they are (it has `transcode` and they fit)."""
    transcode = getattr(quantizer, "transcode", None)
    if transcode is None:
        return False
    blocks = tensor.integers()
    return blocks is not None and transcode(module, blocks, tensor.dtype, options, writer)


def requantization_error(entry: Entry, tensor: api.SourceTensor, capture: api.CollectingSink, plan: Plan,
                         config: dict) -> ErrorSums:
    """The error a re-quantized tensor gained: what was written, read back by the target's own reader,
    against the source's dequantized values (both one module in memory)."""
    reader = api.DEQUANTIZERS[plan.quantization_config["quant_method"]]
    written = {o.name: TensorInfo(o.name, o.dtype, o.shape, Path(), 0, o.nbytes) for o in entry.outputs}
    view = Checkpoint(Path(), {**config, "quantization_config": plan.quantization_config}, [], written)
    names = reader.modules(view)[entry.module]
    back = api.CollectingSink()
    reader.dequantize(view, entry.module, names, lambda name: _captured(capture, written[name]), "F32", back)
    approx = back.array(names[0] if names[0] in back.parts else next(iter(back.parts)))
    approx = approx.reshape(tensor.shape[::-1] if entry.transposed else tensor.shape)
    if entry.transposed:
        approx = approx.T
    sums = ErrorSums()
    start = 0
    for chunk in tensor.chunks(max(1, CHUNK_ELEMENTS // max(1, tensor.shape[-1]))):
        sums.add(to_float32(chunk, tensor.dtype), approx[start : start + chunk.shape[0]])
        start += chunk.shape[0]
    return sums


def _captured(capture: api.CollectingSink, info: TensorInfo) -> np.ndarray:
    """A written tensor as the reader would load it: its planned dtype and shape (a variable-length one flat)."""
    raw = np.concatenate([np.ascontiguousarray(p).reshape(-1).view(np.uint8) for p in capture.parts[info.name]])
    values = raw.view(STORAGE[info.dtype])
    return values.reshape(info.shape) if values.size == math.prod(info.shape) else values


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
            sink = FiniteSink(writer, dense_dtype, checkpoint.tensors[names[0]].file)
            dequantizer.dequantize(checkpoint, entry.module, names, TensorReads(checkpoint, reader), dense_dtype, sink)
        elif entry.fate == "keep":
            copy_tensor(reader, info, entry.source, writer)

    def finish(folder: Path) -> list[str]:
        write_config(folder, {k: v for k, v in checkpoint.config.items() if k != "quantization_config"})
        side = copy_side_files(checkpoint, folder, dense=True)
        card = write_card(folder, src, checkpoint.root, f"dequantized from {dequantizer.quant_method} to "
                          f"{NAME_OF[dense_dtype]}", ["dequantized"], {"from": dequantizer.quant_method, "dtype": NAME_OF[dense_dtype]})
        return [*(f for f in side if f != card), card]

    files, _ = write_staged(out, outputs, max_shard_size,
                            lambda writer: stream_entries(checkpoint, entries, writer, handle, progress), finish,
                            run_fingerprint(checkpoint.files, outputs, (dense_dtype, max_shard_size)), resume, force)
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
    request = api.ConvertRequest(src, Path(out), gguf_type, dtype, force, revision, max_shard_size, imatrix=imatrix,
                                 source=open_source(src, revision))
    return api.CONVERTERS[to](request, progress)
