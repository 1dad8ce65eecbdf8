"""Plans shown before the work (`quantize --dry-run`, `convert --dry-run`, `inspect --method`, inspect's
size table): every tensor's fate and why, the files and their bytes, memory and free disk. Headers only.

The bytes come from the same layouts and shard/header encoders the run uses, so they are what the run
writes (exact, or "at most" where a method's output has a data-dependent length).
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

from quantkit import api, methods
from quantkit.errors import QuantkitError
from quantkit.io.outfile import BUFFER, DEPTH
from quantkit.io.safetensors import planned_files
from quantkit.io.source import Checkpoint, open_checkpoint, resolve
from quantkit.io.staged import check_output
from quantkit.numerics import CHUNK_ELEMENTS, COPY_CHUNK
from quantkit.plan import Plan, make_plan, plan_warnings

# The interpreter with numpy, numba and the kernels loaded, measured at 100-150 MB on every command.
BASE_MEMORY = 150 * 10**6


def quantize_preview(checkpoint: Checkpoint, plan: Plan, skip_source: str = "--skip") -> api.Preview:
    tensors = [api.PlannedTensor(e.source, e.fate, e.reason, [api.output_dict(o) for o in e.outputs]) for e in plan.entries]
    outputs = [o for e in plan.entries if e.fate != "refuse" for o in e.outputs]
    # A quantizer holds one row chunk in float32 (and its source bits) and, at most, one module's outputs.
    module_outputs = max((sum(o.nbytes for o in e.outputs) for e in plan.entries if e.fate == "quantize"), default=0)
    working = max(CHUNK_ELEMENTS * 8, 2 * COPY_CHUNK, module_outputs)
    warnings = plan_warnings(plan, skip_source)
    warnings += [f"refused: '{e.source}': {e.reason}" for e in plan.entries if e.fate == "refuse"]
    settings = {k: v for k, v in dataclasses.asdict(plan.options).items() if k != "method"}
    return api.Preview(plan.method, tensors, planned_files(outputs, plan.options.max_shard_size),
                       exact=not any(o.variable for o in outputs), working_bytes=working, warnings=warnings,
                       settings={**settings, "quantization_config": plan.quantization_config})


def as_dict(preview: api.Preview, src: str, out: Path | None, input_bytes: int) -> dict:
    """A preview as --json prints it: the plan plus totals, memory and (with OUT) free disk."""
    counts: dict[str, int] = {}
    for t in preview.tensors:
        counts[t.fate] = counts.get(t.fate, 0) + 1
    output_bytes = sum(preview.files.values())
    data = {
        "src": src,
        "target": preview.target,
        "settings": preview.settings,
        "counts": counts,
        "input_bytes": input_bytes,
        "output_bytes": output_bytes,
        "output_bytes_exact": preview.exact,
        "files": preview.files,
        "estimated_peak_memory_bytes": BASE_MEMORY + DEPTH * BUFFER + preview.working_bytes,
        "refused": [t.name for t in preview.tensors if t.fate == "refuse"],
        "warnings": list(preview.warnings),
        "tensors": [dataclasses.asdict(t) for t in preview.tensors],
    }
    if out is not None:
        parent = _existing_parent(Path(out))
        free = shutil.disk_usage(parent).free
        data.update({"out": str(out), "disk": str(parent), "free_disk_bytes": free, "fits_on_disk": free >= output_bytes})
        if free < output_bytes:
            data["warnings"].append(f"warning: {out}: needs {output_bytes / 1e6:.1f} MB but only {free / 1e6:.1f} MB are free")
    return data


def _existing_parent(out: Path) -> Path:
    parent = out.resolve().parent
    while not parent.exists():
        parent = parent.parent
    return parent


def preview_quantize(src: str, options: api.Options, out: Path | None = None, revision: str | None = None,
                     skip_source: str = "--skip", force: bool = False) -> dict:
    """`quantize SRC OUT --dry-run` / `inspect SRC --method X`: the plan, as a dict."""
    checkpoint = open_checkpoint(resolve(src, revision))
    plan = make_plan(checkpoint, options, skip_source, refusals=True)
    data = as_dict(quantize_preview(checkpoint, plan, skip_source), str(src), out, _input_bytes(checkpoint))
    if out is not None:
        _output_problem(data, lambda: check_output(checkpoint.root, Path(out), force))
    return data


def preview_convert(to: str, request: api.ConvertRequest, with_out: bool = True) -> dict:
    """`convert SRC OUT --to X --dry-run` / `inspect SRC --gguf-type T`: the plan of a converter that has one."""
    methods.load()
    if to not in api.CONVERT_PREVIEWS:
        raise QuantkitError(f"--to {to}: no plan to show before the run",
                            f"--dry-run plans {', '.join(sorted(api.CONVERT_PREVIEWS))}")
    preview = api.CONVERT_PREVIEWS[to](request)
    checkpoint = open_checkpoint(resolve(request.src, request.revision))
    data = as_dict(preview, request.src, request.out if with_out else None, _input_bytes(checkpoint))
    if with_out:
        _output_problem(data, lambda: check_output(checkpoint.root, Path(request.out), request.force, single_file=True))
    return data


def _output_problem(data: dict, check) -> None:
    try:
        check()
    except QuantkitError as e:
        data["warnings"].append(f"the run would refuse: {e.message}" + (f" ({e.hint})" if e.hint else ""))


def _input_bytes(checkpoint: Checkpoint) -> int:
    return sum(info.nbytes for info in checkpoint.tensors.values())


def flags_of(options: api.Options) -> str:
    """The quantize flags that give `options` (those that differ from the method's defaults)."""
    default = type(options)(method=options.method)
    flags = [f"--method {options.method}"]
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if f.name == "method" or value == getattr(default, f.name):
            continue
        flag = f"--{f.name.replace('_', '-')}"
        flags.append(flag if value is True else f"--no-{flag[2:]}" if value is False else f"{flag} {value}")
    return " ".join(flags)


def size_table(checkpoint: Checkpoint) -> list[dict]:
    """One row per preset of every method and convert target: its flags and the bytes it would write
    (None with the reason where the model does not fit it)."""
    methods.load()
    rows = []
    for quantizer in dict.fromkeys(api.QUANTIZERS.values()):
        for label, options in quantizer.presets().items():
            row = {"label": label, "command": f"quantize {flags_of(options)}"}
            try:
                plan = make_plan(checkpoint, options)
                outputs = [o for e in plan.entries for o in e.outputs]
                row.update(output_bytes=sum(planned_files(outputs, options.max_shard_size).values()),
                           exact=not any(o.variable for o in outputs))
            except QuantkitError as e:
                row.update(output_bytes=None, exact=False, error=e.message)
            rows.append(row)
    for target, presets in api.CONVERT_PRESETS.items():
        for label, fields in presets().items():
            request = api.ConvertRequest(str(checkpoint.root), Path(f"model-{label}.gguf"), **fields)
            row = {"label": label, "command": f"convert --to {target} " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in fields.items())}
            try:
                preview = api.CONVERT_PREVIEWS[target](request)
                row.update(output_bytes=sum(preview.files.values()), exact=preview.exact)
            except QuantkitError as e:
                row.update(output_bytes=None, exact=False, error=e.message)
            rows.append(row)
    return rows

