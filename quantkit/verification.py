"""verify: the checks a CI gate runs on a checkpoint, each a small function returning a named result.

A problem in the checkpoint is a failed check (exit 1), never an exception: a truncated shard, a
missing companion, a NaN, a layer that does not match its reference.
"""

from __future__ import annotations

import math
from pathlib import Path
from xml.etree import ElementTree

import numpy as np

from quantkit import api, dtypes, methods
from quantkit.api import Check, Dequantizer, Layer, Report, check_leftovers, first_of
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import ShardReader, iter_row_chunks
from quantkit.io.source import Checkpoint, open_checkpoint, read_config, resolve
from quantkit.io.stream import Progress, TensorReads, no_progress
from quantkit.modules import is_conv1d
from quantkit.numerics import error_figures
from quantkit.plan import dequantizer_for, quantizer_for

SCALE_SUFFIXES = (".absmax", ".nested_absmax", ".SCB", ".scales")


def check_structure(path: Path) -> tuple[Check, Check, Checkpoint | None]:
    try:
        read_config(path)
    except QuantkitError as e:
        return Check("config", False, e.message), Check("structure", False, "not checked: config.json is unreadable"), None
    try:
        checkpoint = open_checkpoint(path)
    except QuantkitError as e:
        return Check("config", True, "config.json parses"), Check("structure", False, e.message), None
    detail = f"{len(checkpoint.files)} shard(s), {len(checkpoint.tensors)} tensors, headers and offsets valid"
    return Check("config", True, "config.json parses"), Check("structure", True, detail), checkpoint


def check_values(checkpoint: Checkpoint) -> Check:
    """Every float tensor finite; scales (absmax, SCB, scales) finite and >= 0. Streams all the data."""
    problems = []
    for file in checkpoint.files:
        with ShardReader(file) as reader:
            for info in (i for i in checkpoint.tensors.values() if i.file == file and i.dtype in dtypes.FLOATS):
                for start, stop in iter_row_chunks(info, 16 << 20):
                    try:
                        values = dtypes.to_float32(reader.read_rows(info, start, stop), info.dtype)
                    except QuantkitError as e:
                        return Check("values", False, e.message)
                    if not np.isfinite(values).all():
                        problems.append(f"'{info.name}' has NaN or infinite values")
                        break
                    if info.name.endswith(SCALE_SUFFIXES) and (values < 0).any():
                        problems.append(f"'{info.name}' has negative scales")
                        break
    return Check("values", not problems, first_of(problems, "all float tensors finite, scales >= 0"))


def check_undeclared(checkpoint: Checkpoint) -> Check:
    """Without a quantization_config, no tensor may look quantized: loaders would take the packed codes
    for weights (a config deleted or lost in a copy)."""
    for dequantizer in api.DEQUANTIZERS.values():
        modules = dequantizer.modules(checkpoint)
        if modules:
            names = next(iter(modules.values()))
            return Check("quantization", False, f"'{names[0]}' and {len(modules) - 1} more module(s) look quantized "
                                                f"({dequantizer.quant_method}) but config.json has no quantization_config")
    return Check("quantization", True, "not quantized")


def check_quantization(checkpoint: Checkpoint, dequantizer: Dequantizer, modules: dict[str, list[str]]) -> Check:
    problems = dequantizer.check(checkpoint, modules)
    detail = f"{len(modules)} quantized modules with all companions, consistent with quantization_config"
    return Check("quantization", not problems, first_of(problems, detail))


def check_size(checkpoint: Checkpoint, dequantizer: Dequantizer, modules: dict[str, list[str]]) -> Check:
    """Each quantized module's tensors have the bytes the quantizer's own layout predicts for its shape (for
    float companions, the number of values: real writers store scales in bf16 or float32 too)."""
    try:
        options = dequantizer.options(checkpoint)
        # The dtype a checkpoint records (bnb) or decompresses to (compressed-tensors keeps scales in it) shapes layouts.
        source_dtype = dtypes.BY_NAME.get(dequantizer.default_dtype(checkpoint, modules) or "", "F32")
    except QuantkitError as e:  # settings no quantizer takes (bits = 3), a damaged quant_state: named here too
        return Check("size", False, e.message)
    if options is None:
        return Check("size", True, f"no layout to compare: quantkit reads {dequantizer.quant_method} but does not write it")
    quantizer = quantizer_for(options.method)
    problems = []
    actual_total = predicted_total = 0
    for module, names in modules.items():
        try:
            dense = dequantizer.layout(checkpoint, module, names, "F32")[0]
            shape = dense.shape[::-1] if is_conv1d(checkpoint.config, module) else dense.shape
            predicted = quantizer.layout(module, shape, source_dtype, options)
        except QuantkitError as e:
            problems.append(e.message)
            continue
        except api.Unfit as e:
            problems.append(f"'{module}' is quantized, but {options.method} cannot hold it ({e})")
            continue
        for out in predicted:
            info = checkpoint.tensors.get(out.name)
            if info is None:
                continue  # a missing companion is the quantization check's finding
            actual_total += info.nbytes
            predicted_total += out.nbytes
            if info.dtype in dtypes.FLOATS and out.dtype in dtypes.FLOATS:  # scales: whichever float the writer chose
                if info.numel != math.prod(out.shape):
                    problems.append(f"'{out.name}': {info.numel} values on disk, {math.prod(out.shape)} predicted")
            elif info.nbytes != out.nbytes and not (out.variable and info.nbytes <= out.nbytes):
                problems.append(f"'{out.name}': {info.nbytes} bytes on disk, {out.nbytes} predicted")
    detail = f"{actual_total:,} bytes of quantized tensors, as predicted"
    return Check("size", not problems, first_of(problems, detail))


class _ErrorSink:
    """Takes what a dequantizer writes (float32 rows, in order) and compares it on the fly with the same
    rows of the reference, so memory follows a chunk, not a tensor."""

    def __init__(self, reference: ShardReader, info):
        self.reference, self.info = reference, info
        self.row_size = max(1, math.prod(info.shape[1:]))
        self.row = 0
        self.norm = self.diff = 0.0  # sums of squares

    def write(self, name: str, chunk) -> None:
        approx = np.asarray(chunk).reshape(-1).view(np.float32).astype(np.float64)
        rows = approx.size // self.row_size
        expected = dtypes.to_float32(self.reference.read_rows(self.info, self.row, self.row + rows), self.info.dtype)
        expected = expected.reshape(-1).astype(np.float64)
        self.norm += float(expected @ expected)
        self.diff += float(((expected - approx) ** 2).sum())
        self.row += rows

    def done(self, name: str) -> None:
        pass

    def result(self) -> tuple[float, float]:
        return error_figures(math.sqrt(self.norm), math.sqrt(self.diff))


def compare_layers(checkpoint: Checkpoint, dequantizer: Dequantizer, modules: dict[str, list[str]], reference: Path,
                   max_error: float | None, progress: Progress = no_progress) -> list[Layer]:
    ref = open_checkpoint(reference)
    scheme = dequantizer.scheme(checkpoint)
    bound = max_error if max_error is not None else dequantizer.error_bound(scheme)
    layers = []
    done, total = 0, sum(checkpoint.tensors[n].nbytes for names in modules.values() for n in names)
    for module, names in modules.items():
        done += sum(checkpoint.tensors[n].nbytes for n in names)
        progress(done, total, module)
        dense = dequantizer.layout(checkpoint, module, names, "F32")[0]
        ref_info = ref.tensors.get(dense.name)
        if ref_info is None or ref_info.shape != dense.shape:
            layers.append(Layer(dense.name, scheme, math.inf, -math.inf, bound, False))
            continue
        with ShardReader(checkpoint.tensors[names[0]].file) as reader, ShardReader(ref_info.file) as ref_reader:
            sink = _ErrorSink(ref_reader, ref_info)
            dequantizer.dequantize(checkpoint, module, names, TensorReads(checkpoint, reader), "F32", sink)
        rel, snr = sink.result()
        layers.append(Layer(dense.name, scheme, rel, snr, bound, rel <= bound))
    return layers


def verify(path: Path, reference: str | None = None, max_error: float | None = None,
           progress: Progress = no_progress) -> Report:
    """Every check on the checkpoint folder or file at `path`; a problem in it is a failed check. Bad input
    (no such path, a file that is neither a checkpoint folder nor a known file format) raises."""
    if not path.exists():
        leftovers = check_leftovers(path)
        if not leftovers.ok:
            return Report(str(path), [leftovers, Check("structure", False, f"{path} does not exist: the run never finished")])
        path = resolve(str(path))  # a hub repo id (from the cache, or downloaded); else "no such file"
    methods.load()
    file_format = api.file_format_of(path)
    report = file_format.verify(path, reference, max_error, progress) if file_format else None
    if report is not None:
        return report
    if path.is_file():
        raise QuantkitError(f"{path}: a single file; verify checks a checkpoint folder (with its config.json) or a .gguf file",
                            f"pass the folder: quantkit verify {path.parent}")
    report = Report(str(path))
    report.checks.append(check_leftovers(path))
    config_check, structure_check, checkpoint = check_structure(path)
    report.checks += [config_check, structure_check]
    if checkpoint is None:
        return report
    report.checks.append(check_values(checkpoint))
    if checkpoint.quantization_config is None:
        report.checks.append(check_undeclared(checkpoint))
        return report
    try:
        dequantizer = dequantizer_for(checkpoint)
        modules = dequantizer.modules(checkpoint)
    except QuantkitError as e:
        report.checks.append(Check("quantization", False, e.message))
        return report
    report.checks.append(check_quantization(checkpoint, dequantizer, modules))
    report.checks.append(check_size(checkpoint, dequantizer, modules))
    if reference is not None and report.ok:
        report.layers = compare_layers(checkpoint, dequantizer, modules, resolve(reference), max_error, progress)
        bad = [layer.name for layer in report.layers if not layer.ok]
        worst = max((layer.rel_error for layer in report.layers), default=0.0)
        report.checks.append(Check("reference", not bad, first_of([f"'{n}' differs from the reference beyond its bound" for n in bad],
                                                                f"{len(report.layers)} layers within bounds (worst relative error {worst:.4f})")))
    return report


def write_junit(report: Report, file: Path) -> None:
    cases = [(c.name, c.ok, c.detail) for c in report.checks]
    cases += [(f"layer {x.name}", x.ok, f"relative error {x.rel_error:.5f} (bound {x.max_error}), SNR {x.snr_db:.1f} dB") for x in report.layers]
    suite = ElementTree.Element("testsuite", name=f"quantkit verify {report.path}", tests=str(len(cases)),
                                failures=str(sum(not ok for _, ok, _ in cases)))
    for name, ok, detail in cases:
        case = ElementTree.SubElement(suite, "testcase", classname="quantkit.verify", name=name)
        if not ok:
            ElementTree.SubElement(case, "failure", message=detail).text = detail
        else:
            ElementTree.SubElement(case, "system-out").text = detail
    try:
        ElementTree.ElementTree(suite).write(file, encoding="utf-8", xml_declaration=True)
    except OSError as e:
        raise QuantkitError(f"{file}: cannot write JUnit report ({e.strerror})") from None
