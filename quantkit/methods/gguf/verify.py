"""verify on a .gguf: leftovers, structure (offsets, sizes, alignment, names, metadata), finite values,
and with a reference checkpoint each tensor's relative error. Damage is a failed check, never an exception."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quantkit.api import Check, Layer, Report, check_leftovers, first_of
from quantkit.dtypes import to_float32
from quantkit.errors import QuantkitError
from quantkit.io.safetensors import ShardReader
from quantkit.io.source import Checkpoint, open_checkpoint, resolve
from quantkit.methods.gguf.convert import from_gguf
from quantkit.methods.gguf.types import TYPES
from quantkit.modules import shape_problems
from quantkit.numerics import relative_error


def verify_gguf(path: Path, reference: str | None = None, max_error: float | None = None) -> Report:
    """verify's GGUF branch: leftovers, structure (offsets, sizes, alignment, names, metadata), finite
    values, and with a reference checkpoint each tensor's relative error. Damage is a failed check."""
    report = Report(str(path), [check_leftovers(Path(path))])
    try:
        conv = from_gguf(Path(path))
    except QuantkitError as e:
        report.checks.append(Check("structure", False, e.message))
        return report
    report.checks.append(Check("structure", True, f"{len(conv.names)} tensors; offsets, sizes and alignment "
                                 f"({conv.file.alignment}) within the file; names for {conv.config['architectures'][0]}"))
    missing, wrong = shape_problems(conv.config, {name: t.shape for name, t in conv.names.items()})
    problems = wrong + missing
    report.checks.append(Check("metadata", not problems, first_of(problems, "tensor shapes agree with the sizes "
                                                                   "in the metadata")))
    ref = None
    if reference is not None:
        ref = open_checkpoint(resolve(reference))
    not_finite = []
    for name, values in conv.tensors():
        t = conv.names[name]
        if not np.isfinite(values).all():
            not_finite.append(f"{t.name} ({t.qtype.name}) holds NaN or inf")
        if ref is not None:
            bound = max_error if max_error is not None else TYPES[t.qtype].error_bound if t.qtype in TYPES else 0.15
            report.layers.append(_compare(name, t.qtype.name, values, ref, bound))
    report.checks.append(Check("values", not not_finite, first_of(not_finite, "every tensor dequantizes to finite values")))
    if ref is not None:
        bad = [f"'{x.name}' differs from the reference beyond its bound" for x in report.layers if not x.ok]
        worst = max((x.rel_error for x in report.layers), default=0.0)
        report.checks.append(Check("reference", not bad, first_of(
            bad, f"{len(report.layers)} tensors within bounds (worst relative error {worst:.4f})")))
    return report


def _compare(name: str, scheme: str, values: np.ndarray, ref: Checkpoint, bound: float) -> Layer:
    info = ref.tensors.get(name)
    if info is None or tuple(info.shape) != values.shape:
        return Layer(name, scheme, float("inf"), float("-inf"), bound, False)
    with ShardReader(info.file) as reader:
        expected = to_float32(reader.read(info), info.dtype)
    rel, snr = relative_error(expected, values)
    return Layer(name, scheme, rel, snr, bound, rel <= bound)
