"""The command line: parse flags, call one library function, print (rich for people, --json for scripts).

Data goes to stdout, chatter and progress to stderr. A QuantkitError becomes one line and exit code 2;
Ctrl-C (SIGINT) exits 130 and SIGTERM (timeout, docker stop, CI cancellation) 143, one line each, after
the library has removed its temporary files. The library (numpy, gguf-py) and rich
are imported inside each command, so that `--help` and shell completion start in a fraction of a second.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from typer.core import TyperGroup

from quantkit import errors
from quantkit.errors import QuantkitError


class OneLineErrors(TyperGroup):
    """Usage errors (an unknown option, a value outside an option's choices) as one line and exit 2, like
    every other bad input, instead of click's usage panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except click.exceptions.NoArgsIsHelpError:
            return super().main(args, prog_name, complete_var, True, **extra)  # prints the help
        except click.UsageError as e:
            hint = f" (see quantkit {e.ctx.info_name} -h)" if e.ctx is not None and e.ctx.parent is not None else " (see quantkit -h)"
            err(f"error: {e.format_message()}{hint}")
            sys.exit(2)
        except click.Abort:
            err("interrupted")
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    name="quantkit",
    help="Convert LLM checkpoints between full precision and quantized formats.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


class RegistryChoice(click.Choice):
    """A click.Choice whose choices come from quantkit's registries, loaded only when a command's help or
    its value needs them (so `quantkit --help` and completing command names import nothing heavy)."""

    def __init__(self, load: Callable[[], list[str]], case_sensitive: bool = True):
        self._load = load
        self.case_sensitive = case_sensitive

    @property
    def choices(self) -> tuple[str, ...]:
        return tuple(self._load())


def _methods() -> list[str]:
    from quantkit import api, methods

    methods.load()
    return sorted(api.QUANTIZERS)


def _targets() -> list[str]:
    from quantkit import api, methods

    methods.load()
    return ["safetensors", *sorted(api.CONVERTERS)]


def _gguf_types() -> list[str]:
    from quantkit import api, methods

    methods.load()
    names = [fields["gguf_type"] for fields in api.CONVERT_PRESETS["gguf"]().values()]
    return names + api.CONVERT_DESCRIPTIONS["gguf"]().get("aliases", [])  # Q4_K for Q4_K_M, as llama-quantize


DTYPES = click.Choice(["bfloat16", "float16", "float32"])
JsonFlag = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout, nothing else.")]
ForceFlag = Annotated[bool, typer.Option("--force", help="Replace an existing OUT (only once the new one is complete).")]
ShardSize = Annotated[str, typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB, 2GiB.")]
QuantizeShardSize = Annotated[Optional[str], typer.Option("--max-shard-size", help="Largest output shard, e.g. 5GB, 500MB, 2GiB (over a recipe's max_shard_size). \\[default: 5GB]")]
Revision = Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit) for a hub SRC.")]
Resume = Annotated[bool, typer.Option("--resume", help="Reuse the finished shards of an interrupted run (checked by their sha256 digests).")]
NoSync = Annotated[bool, typer.Option("--no-sync", help="End once the output is in the page cache, without waiting for the disk (no fsync), as most tools do; a power cut in the next ~30 s may cost the output.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Write nothing: show every tensor's fate and why, output bytes, memory and free disk.")]

# The method settings quantize and inspect share. None means "not given": the recipe's value, else the
# method's default (in brackets; `quantkit formats` lists them from the options classes).
Method = Annotated[Optional[str], typer.Option("--method", click_type=RegistryChoice(_methods), help="Quantization method: bitsandbytes nf4/fp4/int8, gptq, compressed-tensors fp8/fp8-block/w4a16/w4a16-asym/w8a16/nvfp4a16/mxfp4a16 (quantkit formats lists them).")]
DoubleQuant = Annotated[Optional[bool], typer.Option("--double-quant/--no-double-quant", help="4-bit: quantize the absmax too. \\[default: no]")]
Blocksize = Annotated[Optional[int], typer.Option("--blocksize", help="4-bit block size (bitsandbytes loaders assume 64). \\[default: 64]")]
ComputeDtype = Annotated[Optional[str], typer.Option("--compute-dtype", click_type=DTYPES, help="4-bit compute dtype recorded for loaders. \\[default: float32]")]
QuantStorage = Annotated[Optional[str], typer.Option("--quant-storage", click_type=click.Choice(["uint8", "bfloat16", "float16", "float32"]), help="4-bit storage dtype (bfloat16 for FSDP-QLoRA). \\[default: uint8]")]
Skip = Annotated[Optional[list[str]], typer.Option("--skip", help="Glob of module names to keep dense (repeatable; replaces a recipe's list).")]
Recipe = Annotated[Optional[Path], typer.Option("--recipe", help="TOML recipe (see configs/); flags override it.")]
Backend = Annotated[Optional[str], typer.Option("--backend", click_type=click.Choice(["auto", "c", "torch", "numpy", "numba"]), help="bitsandbytes: auto, c, torch or numpy; gptq: auto, numba or numpy (all give the same bytes). \\[default: auto]")]
Device = Annotated[Optional[str], typer.Option("--device", click_type=click.Choice(["cpu", "cuda"]), help="bitsandbytes: where to quantize. \\[default: cpu]")]
Bits = Annotated[Optional[str], typer.Option("--bits", click_type=click.Choice(["2", "4", "8"]), help="gptq: bits per weight. \\[default: 4]")]
GroupSize = Annotated[Optional[int], typer.Option("--group-size", help="gptq: columns per group, -1 for one group per row. \\[default: 128]")]
Sym = Annotated[Optional[bool], typer.Option("--sym/--asym", help="gptq: symmetric or asymmetric zero points. \\[default: sym]")]
Format = Annotated[Optional[str], typer.Option("--format", click_type=click.Choice(["v1", "v2"]), help="gptq: zero-point format. \\[default: v1 for --sym, v2 for --asym]")]
Layout = Annotated[Optional[str], typer.Option("--layout", click_type=click.Choice(["compressed-tensors", "fp8"]), help="fp8-block: compressed-tensors (vLLM) or fp8 (transformers' fine-grained FP8). \\[default: compressed-tensors]")]
Optimize = Annotated[Optional[bool], typer.Option("--optimize", help="gptq: search clipping ranges to lower weight MSE. \\[default: off]")]
GGUFType = Annotated[str, typer.Option("--gguf-type", click_type=RegistryChoice(_gguf_types, case_sensitive=False), help="--to gguf: llama-quantize's file type (Q4_K_M, Q8_0, ...; Q4_K, Q5_K, Q3_K are the _M mixes).")]


def method_settings(double_quant, blocksize, compute_dtype, quant_storage, skip, backend, device, bits, group_size, sym,
                    format, optimize) -> dict:
    return dict(double_quant=double_quant, blocksize=blocksize, compute_dtype=compute_dtype, quant_storage=quant_storage,
                skip=tuple(skip) if skip else None, backend=backend, device=device, bits=None if bits is None else int(bits),
                group_size=group_size, sym=sym, format=format, optimize=optimize)


def _version(value: bool) -> None:
    if value:
        from quantkit import __version__

        print(f"quantkit {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    """Convert LLM checkpoints between full precision and quantized formats."""


def err(message: str) -> None:
    """One plain line on stderr (no markup, no wrapping: paths and tensor names print as they are)."""
    print(message, file=sys.stderr, flush=True)


SIGNAL_NAMES = {signal.SIGINT: "", signal.SIGTERM: "SIGTERM, "}


def stop(signum: int) -> typer.Exit:
    err(f"interrupted: {SIGNAL_NAMES.get(signum, f'signal {signum}, ')}temporary output removed")
    return typer.Exit(128 + signum)


@contextmanager
def user_errors() -> Iterator[None]:
    """Our errors as one line and exit 2; SIGINT / SIGTERM as exit 130 / 143. Anything else is a bug and
    keeps its traceback, unless a signal came first: then it is what the interrupted code made of it (a
    compiler wraps what it catches)."""
    try:
        yield
    except QuantkitError as e:
        if errors.interrupted():
            raise stop(errors.interrupted()) from None
        err(f"error: {e}")
        raise typer.Exit(2) from None
    except KeyboardInterrupt as e:
        raise stop(getattr(e, "signum", signal.SIGINT)) from None
    except Exception:
        if errors.interrupted():
            raise stop(errors.interrupted()) from None
        raise
    if errors.interrupted():  # swallowed on the way, yet the command got to its end: it still did not finish
        raise stop(errors.interrupted())


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


def print_plan(data: dict, json_out: bool, verbose: bool = True) -> None:
    if json_out:
        emit_json(data)
        return
    from quantkit.render import print_preview

    print_preview(data)


def transcoded(summary: dict) -> str:
    """For a quantized source: how many tensors moved without rounding, and the worst error of the others."""
    if "lossless" not in summary:
        return ""
    rows = summary["requantized"]
    line = f"; from {summary['from']}: {len(summary['lossless'])} tensors lossless, {len(rows)} re-quantized"
    if rows:
        worst = max(rows, key=lambda r: r["rel_error"])
        line += f" (worst relative error {worst['rel_error']:.2e}, SNR {worst['snr_db']:.1f} dB, {worst['tensor']})"
    return line


@app.command()
def inspect(
    src: Annotated[str, typer.Argument(help="Checkpoint folder, hub repo id, or a .gguf file.")],
    method: Method = None,
    gguf_type: Annotated[Optional[str], typer.Option("--gguf-type", click_type=RegistryChoice(_gguf_types, case_sensitive=False), help="Show the plan of convert --to gguf with this type.")] = None,
    double_quant: DoubleQuant = None, blocksize: Blocksize = None, compute_dtype: ComputeDtype = None,
    quant_storage: QuantStorage = None, skip: Skip = None, recipe: Recipe = None, backend: Backend = None,
    device: Device = None, bits: Bits = None, group_size: GroupSize = None, sym: Sym = None, format: Format = None,
    optimize: Optimize = None,
    json_out: JsonFlag = False,
    revision: Revision = None,
) -> None:
    """Show architecture, tensors, detected quantization and the size of every method and GGUF type, from
    headers only. With --method (or --gguf-type): that run's plan, tensor by tensor."""
    import quantkit.commands as qk

    with user_errors():
        settings = method_settings(double_quant, blocksize, compute_dtype, quant_storage, skip, backend, device, bits,
                                   group_size, sym, format, optimize)
        data = qk.inspect(src, method, gguf_type=gguf_type, revision=revision, recipe=recipe, **settings)
        if method is not None or gguf_type is not None or recipe is not None:
            print_plan(data, json_out)
        elif json_out:
            emit_json(data)
        else:
            from quantkit.render import print_inspect

            print_inspect(data)


@app.command()
def quantize(
    src: Annotated[str, typer.Argument(help="Checkpoint folder (dense or quantized), hub repo id, or a .gguf file.")],
    out: Annotated[Path, typer.Argument(help="Output folder (created; must not exist unless --force).")],
    method: Method = None,
    double_quant: DoubleQuant = None, blocksize: Blocksize = None, compute_dtype: ComputeDtype = None,
    quant_storage: QuantStorage = None, skip: Skip = None, recipe: Recipe = None, backend: Backend = None,
    device: Device = None, bits: Bits = None, group_size: GroupSize = None, sym: Sym = None, format: Format = None,
    optimize: Optimize = None, layout: Layout = None,
    max_shard_size: QuantizeShardSize = None,
    dry_run: DryRun = False,
    force: ForceFlag = False,
    resume: Resume = False,
    no_sync: NoSync = False,
    json_out: JsonFlag = False,
    revision: Revision = None,
) -> None:
    """Quantize a checkpoint (bitsandbytes NF4/FP4/int8, or group-wise GPTQ); --dry-run shows the plan; a quantized source is transcoded."""
    import quantkit.commands as qk

    with user_errors():
        settings = method_settings(double_quant, blocksize, compute_dtype, quant_storage, skip, backend, device, bits,
                                   group_size, sym, format, optimize)
        if dry_run:
            data = qk.quantize(src, out, method, recipe=recipe, dry_run=True, layout=layout, force=force, revision=revision,
                               max_shard_size=max_shard_size, **settings)
            print_plan(data, json_out)
            raise typer.Exit(2 if data["refused"] else 0)
        with progress_bar(not json_out, "quantize") as progress:
            result = qk.quantize(src, out, method, recipe=recipe, layout=layout, force=force, resume=resume, revision=revision,
                                 max_shard_size=max_shard_size, progress=progress, sync=not no_sync, **settings)
        s = result.summary
        emit_result(result, json_out, f"{s['quantized']} tensors quantized to {s['method']}, {s['kept']} kept, "
                    f"{s['output_bytes'] / 1e6:.1f} MB in {len(result.files)} file(s){transcoded(s)}")


@app.command()
def dequantize(
    src: Annotated[str, typer.Argument(help="Quantized checkpoint folder (bitsandbytes, GPTQ, AWQ), hub repo id, or .gguf file.")],
    out: Annotated[Path, typer.Argument(help="Output folder for dense safetensors.")],
    dtype: Annotated[Optional[str], typer.Option("--dtype", click_type=DTYPES, help="Dense dtype. \\[default: the dtype the checkpoint records; bfloat16 for a .gguf (float32 for its exact values)]")] = None,
    max_shard_size: ShardSize = "5GB",
    force: ForceFlag = False,
    resume: Resume = False,
    no_sync: NoSync = False,
    json_out: JsonFlag = False,
    revision: Revision = None,
) -> None:
    """Turn a quantized checkpoint back into dense safetensors (e.g. to fine-tune it)."""
    import quantkit.commands as qk

    with user_errors():
        with progress_bar(not json_out, "dequantize") as progress:
            result = qk.dequantize(src, out, dtype, max_shard_size=max_shard_size, force=force, revision=revision,
                                   progress=progress, resume=resume, sync=not no_sync)
        s = result.summary
        emit_result(result, json_out, f"{s.get('dequantized', s.get('tensors', 0))} tensors dequantized"
                                          f"{' to ' + s['dtype'] if s.get('dtype') else ''}, {s['output_bytes'] / 1e6:.1f} MB")


@app.command()
def convert(
    src: Annotated[str, typer.Argument(help="Checkpoint folder, hub repo id, or a .gguf file.")],
    out: Annotated[Path, typer.Argument(help="A .gguf file for --to gguf, else a folder.")],
    to: Annotated[str, typer.Option("--to", click_type=RegistryChoice(_targets), help="Target format.")],
    gguf_type: GGUFType = "F16",
    dtype: Annotated[Optional[str], typer.Option("--dtype", click_type=DTYPES, help="--to safetensors: dense dtype. \\[default: bfloat16 from a .gguf (float32 for its exact values); the checkpoint's own from .bin]")] = None,
    imatrix: Annotated[Optional[Path], typer.Option("--imatrix", help="--to gguf: an importance matrix llama-imatrix wrote (.gguf or legacy .dat).")] = None,
    max_shard_size: ShardSize = "5GB",
    dry_run: DryRun = False,
    force: ForceFlag = False,
    no_sync: NoSync = False,
    json_out: JsonFlag = False,
    revision: Revision = None,
) -> None:
    """Convert between formats: safetensors -> GGUF, GGUF or PyTorch .bin -> safetensors, GPTQ v1 <-> v2 zero points."""
    import quantkit.commands as qk

    with user_errors():
        if dry_run:
            print_plan(qk.convert(src, out, to, gguf_type=gguf_type, dtype=dtype, dry_run=True, force=force,
                                  revision=revision, max_shard_size=max_shard_size), json_out)
            return
        with progress_bar(not json_out, f"convert to {to}") as progress:
            result = qk.convert(src, out, to, gguf_type=gguf_type, dtype=dtype, force=force, revision=revision,
                                max_shard_size=max_shard_size, progress=progress,
                                imatrix=str(imatrix) if imatrix else None, sync=not no_sync)
        s = result.summary
        emit_result(result, json_out, f"{s['tensors']} tensors, {s['output_bytes'] / 1e6:.1f} MB{transcoded(s)}")


@app.command()
def verify(
    path: Annotated[Path, typer.Argument(help="Checkpoint folder or .gguf file to check.")],
    reference: Annotated[Optional[str], typer.Option("--reference", help="Dense source to compare each layer with.")] = None,
    max_error: Annotated[Optional[float], typer.Option("--max-error", help="Largest relative weight error per layer. \\[default: per scheme]")] = None,
    junit: Annotated[Optional[Path], typer.Option("--junit", help="Also write a JUnit XML report here.")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="List every layer, not only the worst and the failures.")] = False,
    logits: Annotated[bool, typer.Option("--logits", help="Run both checkpoints on a text and compare next-token distributions (needs --reference; pip install 'quantkit[logits]').")] = False,
    text: Annotated[Optional[Path], typer.Option("--text", help="--logits: a UTF-8 text file to run (default: a built-in English text).")] = None,
    tokens: Annotated[int, typer.Option("--tokens", min=2, help="--logits: how many tokens of the text to run.")] = 256,
    max_kl: Annotated[Optional[float], typer.Option("--max-kl", help="--logits: fail when the mean KL divergence (nats) is above this.")] = None,
    fix: Annotated[bool, typer.Option("--fix", help="Repair in place what metadata alone can repair (a GPTQ checkpoint_format that contradicts its zero points), and say what changed.")] = False,
    json_out: JsonFlag = False,
) -> None:
    """Check a checkpoint: structure, shapes, tokenizer, quantization companions, values, size, layers against
    a reference and (--logits) what the model now predicts. Exit 0 when all pass, 1 when a problem is found."""
    import quantkit.commands as qk

    with user_errors():
        if (text or max_kl is not None) and not logits:
            raise QuantkitError("--text and --max-kl apply to --logits")
        logit_text = read_text(text) if text else None
        with progress_bar(not json_out, "verify") as progress:
            report = qk.verify(path, reference, max_error, progress=progress, fix=fix, logit_text=logit_text,
                               logit_tokens=tokens if logits else None, max_kl=max_kl)
        for line in report.fixed:
            err(f"fixed {path}: {line}")
        if junit:
            from quantkit.verification import write_junit

            write_junit(report, junit)
        if json_out:
            emit_json(report.as_dict())
        else:
            from quantkit.render import print_report

            print_report(report, verbose)
    raise typer.Exit(0 if report.ok else 1)


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as e:
        raise QuantkitError(f"{path}: cannot read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise QuantkitError(f"{path}: not UTF-8 text") from None


@app.command()
def formats(json_out: JsonFlag = False) -> None:
    """List what quantkit reads and writes: methods and their defaults, quant_methods it reads back, file
    formats, convert targets, GGUF types and architectures."""
    import quantkit.commands as qk

    with user_errors():
        data = qk.formats()
        if json_out:
            emit_json(data)
        else:
            from quantkit.render import print_formats

            print_formats(data)


def _on_signal(signum: int, frame: object) -> None:
    errors.interrupt(signum)


def _unraisable(hook):
    """An interrupt raised inside a finalizer or callback cannot propagate and Python would print it as
    "Exception ignored": say nothing and deliver the signal again a moment later, from another thread, so
    that it lands in code that can stop (not in this hook). Committing the output checks for it anyway."""

    def again(signum: int) -> None:
        time.sleep(0.05)
        _thread.interrupt_main(signum)

    def unraisable(info) -> None:
        if isinstance(info.exc_value, errors.Interrupted):
            threading.Thread(target=again, args=(info.exc_value.signum,), daemon=True).start()
            return
        hook(info)

    return unraisable


def _reuse_freed_memory() -> None:
    """glibc returns every freed block above 128 KB-32 MB to the kernel and gets it back zero-filled at the
    next allocation: for the chunk-sized arrays a run allocates over and over, page faults and clearing were a
    sixth of a transcode's CPU. Blocks up to 256 MB are kept for reuse instead (peak RSS: +10 MB measured)."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(-3, 256 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):  # not glibc
        pass


def main() -> None:
    # numpy's BLAS would start a thread per core that spins between calls; quantkit's kernels run their own
    # threads and ask BLAS for nothing heavier than a vector's dot product
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    _reuse_freed_memory()
    for signum in SIGNAL_NAMES:
        signal.signal(signum, _on_signal)
    sys.unraisablehook = _unraisable(sys.unraisablehook)
    try:
        app()
        code = 0
    except SystemExit as e:  # how click ends every command
        code = e.code
    _exit(code)


def _exit(code: object) -> None:
    """End the process without tearing the interpreter down: freeing every module's objects one by one
    took ~0.1 s after each command had finished and said so (0.04 s for numpy alone). By then every file
    is closed and every thread joined; what is left to do is flushing the output streams."""
    if code is not None and not isinstance(code, int):  # sys.exit("message"): said on stderr, exit 1
        print(code, file=sys.stderr)
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a reader that went away (| head): nothing more to say
            stream.flush()
    os._exit(code or 0)


if __name__ == "__main__":
    main()
