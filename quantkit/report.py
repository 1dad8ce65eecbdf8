"""`inspect`: what a checkpoint is and what quantizing it would give, from config and headers only."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from quantkit.errors import QuantkitError
from quantkit.plan import QuantOptions, make_plan, num_parameters, source_bytes
from quantkit.source import Checkpoint, open_checkpoint, resolve

PLAN_METHODS = ("nf4", "fp4", "int8")


def describe_quantization(qc: dict | None) -> dict | None:
    """The method and its salient settings, from a quantization_config."""
    if qc is None:
        return None
    method = qc.get("quant_method")
    if method == "bitsandbytes":
        if qc.get("load_in_4bit") or qc.get("_load_in_4bit"):
            return {"method": qc.get("bnb_4bit_quant_type", "fp4"), "double_quant": qc.get("bnb_4bit_use_double_quant", False),
                    "compute_dtype": qc.get("bnb_4bit_compute_dtype"), "quant_storage": qc.get("bnb_4bit_quant_storage", "uint8")}  # fmt: skip
        return {"method": "int8", "threshold": qc.get("llm_int8_threshold")}
    if method in ("gptq", "awq"):
        fmt = qc.get("checkpoint_format") or qc.get("format") or qc.get("version")
        fmt = {"gptq": "v1", "gptq_v2": "v2"}.get(fmt, fmt)
        return {"method": method, "bits": qc.get("bits"), "group_size": qc.get("group_size"), "sym": qc.get("sym"),
                "format": fmt, "desc_act": qc.get("desc_act")}  # fmt: skip
    return {"method": method}


def size_plan(checkpoint: Checkpoint) -> dict[str, int] | None:
    if checkpoint.quantization_config is not None:
        return None
    sizes = {}
    for method in PLAN_METHODS:
        try:
            sizes[method] = make_plan(checkpoint, QuantOptions(method=method)).output_bytes
        except QuantkitError:
            sizes[method] = None
    return sizes


def inspect(src: str, revision: str | None = None) -> dict:
    path = resolve(src, revision)
    if path.is_file() and path.suffix == ".gguf":
        from quantkit.formats import gguf

        return gguf.inspect_file(path)
    from quantkit.formats import torchbin

    if torchbin.is_torch_checkpoint(path):
        return torchbin.inspect(path)
    checkpoint = open_checkpoint(path)
    qc = checkpoint.quantization_config
    dtypes = Counter(info.dtype for info in checkpoint.tensors.values())
    return {
        "path": str(checkpoint.root),
        "format": "safetensors",
        "architecture": checkpoint.architecture,
        "model_type": checkpoint.config.get("model_type"),
        "num_parameters": num_parameters(checkpoint),
        "bytes": source_bytes(checkpoint),
        "dtypes": dict(dtypes),
        "shards": [f.name for f in checkpoint.files],
        "quant_method": qc.get("quant_method") if qc else None,
        "quantization": describe_quantization(qc),
        "quantization_config": qc,
        "plan_bytes": size_plan(checkpoint),
        "tensors": [{"name": i.name, "dtype": i.dtype, "shape": list(i.shape)} for i in checkpoint.tensors.values()],
    }


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.1f} MB"


def print_inspect(data: dict, limit: int = 40) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    console.print(f"[bold]{data['path']}[/bold] ({data['format']})")
    console.print(f"architecture  {data.get('architecture')}   parameters {data.get('num_parameters', 0):,}   size {_mb(data.get('bytes'))}")
    if data.get("dtypes"):
        console.print("dtypes        " + ", ".join(f"{k}×{v}" for k, v in data["dtypes"].items()))
    if data.get("shards"):
        console.print(f"shards        {len(data['shards'])}: " + ", ".join(data["shards"][:4]) + (" …" if len(data["shards"]) > 4 else ""))
    q = data.get("quantization")
    console.print("quantization  " + (", ".join(f"{k}={v}" for k, v in q.items()) if q else "none"))
    if data.get("note"):
        console.print(f"note          {data['note']}", markup=False)
    if data.get("plan_bytes"):
        table = Table(title="size after quantizing", title_justify="left")
        table.add_column("method")
        table.add_column("bytes", justify="right")
        table.add_column("of source", justify="right")
        for method, size in data["plan_bytes"].items():
            ratio = f"{size / data['bytes']:.0%}" if size and data.get("bytes") else ""
            table.add_row(method, _mb(size), ratio)
        console.print(table)
    tensors = data.get("tensors", [])
    table = Table(title=f"tensors ({len(tensors)})", title_justify="left")
    for column in ("name", "dtype", "shape"):
        table.add_column(column)
    for t in tensors[:limit]:
        table.add_row(t["name"], t["dtype"], str(tuple(t["shape"])))
    if len(tensors) > limit:
        table.add_row(f"… {len(tensors) - limit} more (--json lists all)", "", "")
    console.print(table)


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"
