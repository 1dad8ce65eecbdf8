"""verify on a .gguf: leftovers, structure (offsets, sizes, alignment, names, metadata), finite values,
and with a reference checkpoint each tensor's relative error. Damage is a failed check, never an exception."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np

from quantkit.api import Check, Layer, Report, check_leftovers, first_of
from quantkit.dtypes import to_float32
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import ShardReader, TensorInfo
from quantkit.io.source import Checkpoint, open_checkpoint, resolve
from quantkit.io.stream import Progress, no_progress
from quantkit.methods.gguf import experts
from quantkit.methods.gguf.convert import CHUNK_BYTES, FromGGUF, from_gguf
from quantkit.methods.gguf.file import Part
from quantkit.methods.gguf.types import TYPES
from quantkit.numerics import error_figures


def verify_gguf(path: Path, reference: str | None = None, max_error: float | None = None,
                progress: Progress = no_progress) -> Report:
    """verify's GGUF branch: leftovers, structure (offsets, sizes, alignment, names, metadata), finite
    values, and with a reference checkpoint each tensor's relative error. Damage is a failed check.
    Tensor by tensor in row chunks: memory follows a chunk, never a whole dequantized tensor."""
    report = Report(str(path), [check_leftovers(Path(path))])
    try:
        conv = from_gguf(Path(path))
    except QuantkitError as e:
        report.checks.append(Check("structure", False, e.message))
        return report
    report.checks.append(Check("structure", True, f"{len(conv.names)} tensors; offsets, sizes and alignment "
                                 f"({conv.file.alignment}) within the file; names for {conv.config['architectures'][0]}"))
    missing, wrong = conv.shape_problems()
    problems = wrong + missing
    report.checks.append(Check("metadata", not problems, first_of(problems, "tensor shapes agree with the sizes "
                                                                   "in the metadata")))
    ref = open_checkpoint(resolve(reference)) if reference is not None else None
    made = _parts_of(conv, ref) if ref is not None else {}
    not_finite = []
    done, total = 0, sum(t.nbytes for t in conv.names.values())
    for name, t in conv.names.items():
        bound = max_error if max_error is not None else TYPES[t.qtype].error_bound if t.qtype in TYPES else 0.15
        source, part = made.get(name, (name, None))
        try:
            layer = _scan(conv, name, ref.tensors.get(source) if ref is not None else None, bound, part)
        except QuantkitError as e:  # a type gguf-py does not dequantize (Q8_K, ...) is a finding
            not_finite.append(e.message)
            continue
        if layer is None:
            not_finite.append(f"{t.name} ({t.qtype.name}) holds NaN or inf")
        elif ref is not None:
            report.layers.append(layer)
        done += t.nbytes
        progress(done, total, name)
    report.checks.append(Check("values", not not_finite, first_of(not_finite, "every tensor dequantizes to finite values")))
    if ref is not None:
        bad = [f"'{x.name}' differs from the reference beyond its bound" for x in report.layers if not x.ok]
        worst = max((x.rel_error for x in report.layers), default=0.0)
        report.checks.append(Check("reference", not bad, first_of(
            bad, f"{len(report.layers)} tensors within bounds (worst relative error {worst:.4f})")))
    return report


def _parts_of(conv: FromGGUF, ref: Checkpoint) -> dict[str, tuple[str, Part]]:
    """GGUF tensor (HF-named) -> the reference tensor the converter made it from and how (gpt-oss's split and
    turned experts, its sinks); empty for architectures without such parts or a reference that does not split."""
    try:
        return experts.split_parts({n: tuple(i.shape) for n, i in ref.tensors.items()}, conv.arch.parts)[1]
    except QuantkitError:  # shaped otherwise: each such tensor is reported missing from the reference
        return {}


def _scan(conv: FromGGUF, name: str, info: TensorInfo | None, bound: float, part: Part | None = None) -> Layer | None:
    """One tensor in stored row chunks: None when a value is not finite, else its error against `info`
    (the reference tensor, or the one `part` is taken from; a Layer with infinite error when it is missing or
    shaped otherwise)."""
    t = conv.names[name]
    scheme = t.qtype.name
    if info is not None and (part.shape(tuple(info.shape)) if part else tuple(info.shape)) != tuple(t.shape):
        info = None
        mismatch = True
    else:
        mismatch = False
    n_rows = math.prod(t.shape[:-1])
    step = max(1, CHUNK_BYTES // (4 * t.shape[-1]))
    norm = diff = 0.0
    with contextlib.ExitStack() as stack:
        reader = stack.enter_context(ShardReader(info.file)) if info is not None else None
        expected_all = None
        if reader is not None and (len(t.shape) != 2 or conv.permuted(name) or part):
            # Q/K rows move between HF and GGUF order, >2-D tensors have no shared row notion, parts are slices:
            # the reference comes whole, in its own dtype (a fraction of the float32 values), in stored order.
            whole = part.take(reader.read(info)) if part else conv.to_stored_order(name, reader.read(info))
            expected_all = whole.reshape(n_rows, t.shape[-1])
        for start in range(0, n_rows, step):
            stop = min(start + step, n_rows)
            values = conv.values(name, start, stop).reshape(stop - start, t.shape[-1])
            if not np.isfinite(values).all():
                return None
            if reader is None:
                continue
            rows = expected_all[start:stop] if expected_all is not None else reader.read_rows(info, start, stop)
            expected = to_float32(rows, info.dtype).reshape(values.shape).astype(np.float64)
            norm += float((expected * expected).sum())
            diff += float(((expected - values) ** 2).sum())
    if mismatch:
        return Layer(name, scheme, float("inf"), float("-inf"), bound, False)
    rel, snr = error_figures(math.sqrt(norm), math.sqrt(diff))
    return Layer(name, scheme, rel, snr, bound, info is not None and rel <= bound)
