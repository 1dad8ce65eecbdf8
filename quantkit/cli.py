"""The command line: parse flags, call one library function, print (rich for people, --json for scripts).

Data goes to stdout, chatter and progress to stderr. A QuantkitError becomes one line and exit code 2;
Ctrl-C exits 130 after the library has removed its temporary files. The library (numpy, gguf-py) and rich
are imported inside each command, so that `--help` and shell completion start in a fraction of a second.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from quantkit.errors import QuantkitError

app = typer.Typer(
    name="quantkit",
    help="Convert LLM checkpoints between full precision and quantized formats.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout, nothing else.")]
ForceFlag = Annotated[bool, typer.Option("--force", help="Replace an existing OUT (only once the new one is complete).")]
ShardSize = Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB, 2GiB.")]
Revision = Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit) for a hub SRC.")]
Resume = Annotated[bool, typer.Option("--resume", help="Reuse the finished shards of an interrupted run (checked by their sha256 digests).")]

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str) -> int:
    match = _SIZE.match(text)
    if not match:
        raise QuantkitError(f"--max-shard-size {text!r}: not a size", "write it like 5GB, 500MB or 2GiB")
    value = float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()]
    if value < 1:
        raise QuantkitError(f"--max-shard-size {text!r}: must be positive")
    return int(value)


def err(message: str) -> None:
    """One plain line on stderr (no markup, no wrapping: paths and tensor names print as they are)."""
    print(message, file=sys.stderr, flush=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """Our errors as one line and exit 2; Ctrl-C as exit 130. Anything else is a bug and keeps its traceback."""
    try:
        yield
    except QuantkitError as e:
        err(f"error: {e}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        err("interrupted: temporary output removed")
        raise typer.Exit(130) from None


@contextmanager
def progress_bar(enabled: bool, label: str) -> Iterator:
    """A rich progress bar by bytes on a terminal; a silent callback otherwise."""
    if not enabled or not sys.stderr.isatty():
        yield lambda done, total, name: None
        return
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[tensor]}", style="dim"))  # fmt: skip
    with Progress(*columns, transient=True, console=_stderr_console()) as bar:
        task = bar.add_task(label, total=None, tensor="")

        def update(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, tensor=name[-48:])

        yield update


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


def emit_json(data: object) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def emit_result(result, json_out: bool, line: str) -> None:
    """A pipeline result: its summary as JSON on stdout, or its warnings and one line on stderr."""
    if json_out:
        emit_json(result.as_dict())
        return
    for warning in result.warnings:
        err(warning)
    err(f"wrote {result.out}: {line}")


@app.command()
def inspect(
    src: Annotated[str, typer.Argument(help="Checkpoint folder, hub repo id, or a .gguf file.")],
    json_out: JsonFlag = False,
    revision: Revision = None,
) -> None:
    """Show architecture, tensors, detected quantization and the size plan, from headers only."""
    from quantkit import inspect as describe

    with user_errors():
        data = describe.inspect(src, revision)
        if json_out:
            emit_json(data)
        else:
            from quantkit.render import print_inspect

            print_inspect(data)


@app.command()
def quantize(
    src: Annotated[str, typer.Argument(help="Checkpoint folder or hub repo id.")],
    out: Annotated[Path, typer.Argument(help="Output folder (created; must not exist unless --force).")],
    method: Annotated[Optional[str], typer.Option("--method", help="nf4, fp4, int8 or gptq.")] = None,
    double_quant: Annotated[Optional[bool], typer.Option("--double-quant/--no-double-quant", help="4-bit: quantize the absmax too.")] = None,
    blocksize: Annotated[Optional[int], typer.Option("--blocksize", help="4-bit block size (bitsandbytes loaders assume 64).")] = None,
    compute_dtype: Annotated[Optional[str], typer.Option("--compute-dtype", help="4-bit compute dtype recorded for loaders.")] = None,
    quant_storage: Annotated[Optional[str], typer.Option("--quant-storage", help="4-bit storage dtype (uint8, or bfloat16 for FSDP-QLoRA).")] = None,
    skip: Annotated[Optional[list[str]], typer.Option("--skip", help="Glob of module names to keep dense (repeatable).")] = None,
    recipe: Annotated[Optional[Path], typer.Option("--recipe", help="TOML recipe; flags override it.")] = None,
    backend: Annotated[Optional[str], typer.Option("--backend", help="bitsandbytes: auto, c, torch or numpy; gptq: auto, numba or numpy (all give the same bytes).")] = None,
    device: Annotated[Optional[str], typer.Option("--device", help="cpu or cuda.")] = None,
    bits: Annotated[Optional[int], typer.Option("--bits", help="gptq: 2, 4 or 8.")] = None,
    group_size: Annotated[Optional[int], typer.Option("--group-size", help="gptq: columns per group, -1 for one group per row.")] = None,
    sym: Annotated[Optional[bool], typer.Option("--sym/--asym", help="gptq: symmetric or asymmetric zero points.")] = None,
    format: Annotated[Optional[str], typer.Option("--format", help="gptq: v1 or v2 zero points.")] = None,
    optimize: Annotated[Optional[bool], typer.Option("--optimize", help="gptq: search clipping ranges to lower weight MSE.")] = None,
    max_shard_size: ShardSize = "5GB",
    force: ForceFlag = False,
    resume: Resume = False,
    json_out: JsonFlag = False,
    revision: Revision = None,
) -> None:
    """Quantize a checkpoint (bitsandbytes NF4/FP4/int8, or group-wise GPTQ)."""
    from quantkit import pipeline
    from quantkit.plan import load_recipe, merge_options

    with user_errors():
        flags = dict(method=method, double_quant=double_quant, blocksize=blocksize, compute_dtype=compute_dtype,
                     quant_storage=quant_storage, skip=tuple(skip) if skip else None, backend=backend, device=device,
                     bits=bits, group_size=group_size, sym=sym, format=format, optimize=optimize,
                     max_shard_size=parse_size(max_shard_size))  # fmt: skip
        options = merge_options(load_recipe(recipe) if recipe else {}, flags, recipe)
        with progress_bar(not json_out, f"quantize {options.method}") as progress:
            result = pipeline.quantize(src, out, options, force=force, revision=revision, progress=progress, resume=resume)
        s = result.summary
        emit_result(result, json_out, f"{s['quantized']} tensors quantized to {options.method}, {s['kept']} kept, "
                    f"{s['output_bytes'] / 1e6:.1f} MB in {len(result.files)} file(s)")


@app.command()
def dequantize(
    src: Annotated[str, typer.Argument(help="Quantized checkpoint folder (bitsandbytes, GPTQ, AWQ), hub repo id, or .gguf file.")],
    out: Annotated[Path, typer.Argument(help="Output folder for dense safetensors.")],
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="bfloat16, float16 or float32 (default: the dtype the checkpoint records).")] = None,
    max_shard_size: ShardSize = "5GB",
    force: ForceFlag = False,
    resume: Resume = False,
    json_out: JsonFlag = False,
    revision: Revision = None,
) -> None:
    """Turn a quantized checkpoint back into dense safetensors (e.g. to fine-tune it)."""
    from quantkit import pipeline

    with user_errors():
        with progress_bar(not json_out, "dequantize") as progress:
            result = pipeline.dequantize(src, out, dtype=dtype, max_shard_size=parse_size(max_shard_size), force=force,
                                         revision=revision, progress=progress, resume=resume)
        s = result.summary
        emit_result(result, json_out, f"{s.get('dequantized', s.get('tensors', 0))} tensors dequantized"
                                          f"{' to ' + s['dtype'] if s.get('dtype') else ''}, {s['output_bytes'] / 1e6:.1f} MB")


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="Checkpoint folder, hub repo id, or a .gguf file.")],
    out: Annotated[Path, typer.Argument(help="A .gguf file for --to gguf, else a folder.")],
    to: Annotated[str, typer.Option("--to", help="gguf, safetensors, gptq-v1 or gptq-v2.")],
    gguf_type: Annotated[str, typer.Option("--gguf-type", help="F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K or Q6_K.")] = "F16",
    dtype: Annotated[Optional[str], typer.Option("--dtype", help="safetensors output: float32, float16 or bfloat16.")] = None,
    max_shard_size: ShardSize = "5GB",
    force: ForceFlag = False,
    json_out: JsonFlag = False,
    revision: Revision = None,
) -> None:
    """Convert between formats: safetensors -> GGUF, GGUF or PyTorch .bin -> safetensors, GPTQ v1 <-> v2 zero points."""
    from quantkit import pipeline

    with user_errors():
        with progress_bar(not json_out, f"convert to {to}") as progress:
            result = pipeline.convert(src, out, to, gguf_type=gguf_type, dtype=dtype, force=force, revision=revision,
                                      max_shard_size=parse_size(max_shard_size), progress=progress)
        s = result.summary
        emit_result(result, json_out, f"{s['tensors']} tensors, {s['output_bytes'] / 1e6:.1f} MB")


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="Checkpoint folder or .gguf file to check.")],
    reference: Annotated[Optional[str], typer.Option("--reference", help="Dense source to compare each layer with.")] = None,
    max_error: Annotated[Optional[float], typer.Option("--max-error", help="Largest relative weight error per layer (default per scheme).")] = None,
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Also write a JUnit XML report here.")] = None,
    logits: Annotated[bool, typer.Option("--logits", help="Run both checkpoints on a text and compare next-token distributions (needs --reference; pip install 'quantkit[logits]').")] = False,
    text: Annotated[Optional[Path], typer.Option("--text", help="--logits: a UTF-8 text file to run (default: a built-in English text).")] = None,
    tokens: Annotated[int, typer.Option("--tokens", min=2, help="--logits: how many tokens of the text to run.")] = 256,
    max_kl: Annotated[Optional[float], typer.Option("--max-kl", help="--logits: fail when the mean KL divergence (nats) is above this.")] = None,
    fix: Annotated[bool, typer.Option("--fix", help="Repair in place what metadata alone can repair (a GPTQ checkpoint_format that contradicts its zero points), and say what changed.")] = False,
    json_out: JsonFlag = False,
) -> None:
    """Check a checkpoint: structure, shapes, tokenizer, quantization companions, values, size, layers against
    a reference and (--logits) what the model now predicts. Exit 0 when all pass, 1 when a problem is found."""
    from quantkit import verify as checks

    with user_errors():
        if (text or max_kl is not None) and not logits:
            raise QuantkitError("--text and --max-kl apply to --logits")
        logit_text = read_text(text) if text else None
        report = checks.verify(path, reference, max_error, fix=fix, logit_text=logit_text,
                               logit_tokens=tokens if logits else None, max_kl=max_kl)
        for line in report.fixed:
            err(f"fixed {path}: {line}")
        if junit:
            checks.write_junit(report, junit)
        if json_out:
            emit_json(report.as_dict())
        else:
            from quantkit.render import print_report

            print_report(report)
    raise typer.Exit(0 if report.ok else 1)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise QuantkitError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise QuantkitError(f"{path}: not UTF-8 text") from None


def main() -> None:
    app()


if __name__ == "__main__":
    main()
