"""quantkit's Python API: the commands as functions, returning what `--json` prints.

    import quantkit
    plan = quantkit.quantize("model", "model-nf4", method="nf4", double_quant=True, dry_run=True)
    result = quantkit.quantize("model", "model-nf4", method="nf4", double_quant=True)
    report = quantkit.verify("model-nf4", reference="model")
    print(result.as_dict()["output_bytes"], report.ok)

`quantize`, `dequantize` and `convert` return an `api.Result` (`.as_dict()` is their --json), or with
`dry_run=True` the plan as a dict; `verify` returns an `api.Report` (`.ok`, `.as_dict()`); `inspect` and
`formats` return dicts. Errors in the input raise `QuantkitError` (one line, naming the file or tensor);
nothing is printed. `progress(done_bytes, total_bytes, tensor)` is called as the run goes. `sync=False`
(the CLI's --no-sync) ends a run once its output is in the page cache, without fsync.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from quantkit import api, methods
from quantkit.errors import QuantkitError
from quantkit.io.outfile import durability
from quantkit.io.stream import Progress, no_progress
from quantkit.plan import parse_size


def _output(out: str | Path) -> Path:
    if str(out) == "-":
        raise QuantkitError("OUT '-': quantkit writes files, not a stream", "name an output folder or .gguf file")
    return Path(out)


def options_for(method: str | None = None, recipe: str | Path | None = None, max_shard_size: str | int | None = None,
                **settings) -> tuple[api.Options, str]:
    """A method's options from a recipe and settings (settings win; None means unset), and where `skip`
    came from ("--skip", or the recipe's path), for warnings."""
    from quantkit.plan import load_recipe, merge_options

    skip = settings.get("skip")
    if skip is not None:
        settings["skip"] = tuple([skip] if isinstance(skip, str) else skip) or None
    recipe_settings = load_recipe(Path(recipe)) if recipe else {}
    flags = {"method": method, **settings, "max_shard_size": None if max_shard_size is None else parse_size(max_shard_size)}
    options = merge_options(recipe_settings, flags, Path(recipe) if recipe else None)
    skip_source = str(recipe) if settings.get("skip") is None and "skip" in recipe_settings else "--skip"
    return options, skip_source


def quantize(src: str | Path, out: str | Path, method: str | None = None, *, recipe: str | Path | None = None,
             layout: str | None = None, dry_run: bool = False, force: bool = False, resume: bool = False, revision: str | None = None,
             max_shard_size: str | int | None = None, progress: Progress = no_progress, sync: bool = True,
             **options) -> api.Result | dict:
    """Quantize a checkpoint folder or hub repo `src` into the folder `out`.

    `method`: nf4, fp4, int8, gptq (see `formats()`); `options`: the method's settings by name
    (double_quant, blocksize, compute_dtype, quant_storage, skip, backend, device, bits, group_size, sym,
    format, optimize), over a TOML `recipe`'s. `layout="fp8"` with method fp8-block writes transformers'
    fine-grained FP8 layout instead of compressed-tensors'. With `dry_run`, nothing is written: returns the plan
    (each tensor's fate and reason, output_bytes, estimated_peak_memory_bytes, free_disk_bytes)."""
    from quantkit import pipeline, preview

    if layout not in (None, "compressed-tensors"):
        if (method, layout) != ("fp8-block", "fp8"):
            raise QuantkitError(f"--layout {layout}: only --method fp8-block has another layout, fp8")
        method = "fp8-fine"  # methods/fp8 writes it
    opts, skip_source = options_for(method, recipe, max_shard_size, **options)
    out = _output(out)
    if dry_run:
        return preview.preview_quantize(str(src), opts, out, revision, skip_source, force)
    with durability(sync):
        return pipeline.quantize(str(src), out, opts, force=force, revision=revision, progress=progress, resume=resume,
                                 skip_source=skip_source)


def dequantize(src: str | Path, out: str | Path, dtype: str | None = None, *, force: bool = False, resume: bool = False,
               revision: str | None = None, max_shard_size: str | int = "5GB", progress: Progress = no_progress,
               sync: bool = True) -> api.Result:
    """A quantized checkpoint (bitsandbytes, GPTQ, AWQ folder, or a .gguf file) back to dense safetensors in
    `out`. `dtype`: bfloat16, float16 or float32 (default: what the checkpoint records; bfloat16 for GGUF)."""
    from quantkit import pipeline

    with durability(sync):
        return pipeline.dequantize(str(src), _output(out), dtype=dtype, max_shard_size=parse_size(max_shard_size),
                                   force=force, revision=revision, progress=progress, resume=resume)


def convert(src: str | Path, out: str | Path, to: str, *, gguf_type: str = "F16", dtype: str | None = None,
            dry_run: bool = False, force: bool = False, revision: str | None = None, max_shard_size: str | int = "5GB",
            imatrix: str | Path | None = None, progress: Progress = no_progress, sync: bool = True) -> api.Result | dict:
    """Convert between formats: `to` gguf (a .gguf file, `gguf_type` llama-quantize's file types F16, Q8_0,
    Q4_K_M, ...; `imatrix` an importance matrix llama-imatrix wrote), safetensors
    (from a .gguf or PyTorch .bin; GGUF's default dtype bfloat16, `dtype="float32"` for the exact values),
    gptq-v1 / gptq-v2 (zero-point format). With `dry_run`, returns the plan instead (targets that have one)."""
    from quantkit import pipeline, preview

    out = _output(out)
    if dry_run:
        request = api.ConvertRequest(str(src), out, gguf_type, dtype, force, revision, parse_size(max_shard_size),
                                     imatrix=str(imatrix) if imatrix else None)
        return preview.preview_convert(to, request)
    with durability(sync):
        return pipeline.convert(str(src), out, to, gguf_type=gguf_type, dtype=dtype, force=force, revision=revision,
                                max_shard_size=parse_size(max_shard_size), progress=progress,
                                imatrix=str(imatrix) if imatrix else None)


def verify(path: str | Path, reference: str | Path | None = None, max_error: float | None = None,
           progress: Progress = no_progress, *, fix: bool = False, logit_text: str | None = None,
           logit_tokens: int | None = None, max_kl: float | None = None) -> api.Report:
    """Check a checkpoint folder or .gguf file: structure, shapes, tokenizer, quantization companions, values,
    sizes, and with `reference` (the dense source) every layer's relative error against its bound; with
    `logit_tokens` also the KL divergence of next-token distributions over a text (`logit_text`, default a
    built-in one), `max_kl` failing it above that mean. `fix` repairs what metadata alone can. `report.ok` is
    the verdict."""
    from quantkit import verification

    return verification.verify(Path(path), None if reference is None else str(reference), max_error, progress, fix=fix,
                               logit_text=logit_text, logit_tokens=logit_tokens, max_kl=max_kl)


def inspect(src: str | Path, method: str | None = None, *, gguf_type: str | None = None, revision: str | None = None,
            recipe: str | Path | None = None, **options) -> dict:
    """What a checkpoint (folder, hub id, .gguf) is, from headers only, with the size table of every method
    and GGUF type; with `method` (or `gguf_type`) instead the plan of that run (as `quantize(dry_run=True)`)."""
    from quantkit import inspection, preview

    if gguf_type is not None:
        return preview.preview_convert("gguf", api.ConvertRequest(str(src), Path("model.gguf"), gguf_type, revision=revision),
                                       with_out=False)
    if method is not None or recipe is not None:
        opts, skip_source = options_for(method, recipe, **options)
        return preview.preview_quantize(str(src), opts, None, revision, skip_source)
    return inspection.inspect(str(src), revision)


def formats() -> dict:
    """What reads and writes what, from the registries: quantize methods (their settings and defaults),
    the quant_methods read back, file formats, convert targets (GGUF types, architectures)."""
    methods.load()
    quantizers = {}
    for method, quantizer in api.QUANTIZERS.items():
        defaults = {f.name: f.default for f in dataclasses.fields(quantizer.options(method=method))
                    if f.name not in ("method", "skip", "max_shard_size")}
        quantizers[method] = {"writes": "safetensors folder", "settings": defaults,
                              "presets": [label for label, o in quantizer.presets().items() if o.method == method]}
    targets = {"safetensors": {"reads": sorted(api.FILE_FORMATS), "writes": "safetensors folder"}}
    for target in api.CONVERTERS:
        targets[target] = api.CONVERT_DESCRIPTIONS[target]() if target in api.CONVERT_DESCRIPTIONS else {}
    return {
        "quantize": quantizers,
        "dequantize": {"quant_methods": sorted(api.DEQUANTIZERS), "file_formats": sorted(api.FILE_FORMATS)},
        "convert": targets,
        "inputs": ["safetensors folder (any architecture: linear layers found by name and shape)", "hub repo id",
                   *sorted(api.FILE_FORMATS)],
    }
