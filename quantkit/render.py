"""What people see: rich tables for inspect and verify. Only the CLI calls this; scripts get --json."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _mb(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 1e6:,.1f} MB"


def print_inspect(data: dict, limit: int = 40) -> None:
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
    if data.get("plans"):
        table = Table(title="size of each output (quantkit inspect SRC --method M for the plan)", title_justify="left")
        for column, justify in (("output", "left"), ("bytes", "right"), ("of source", "right"), ("command", "left")):
            table.add_column(column, justify=justify)
        for row in data["plans"]:
            size = row["output_bytes"]
            ratio = f"{size / data['bytes']:.0%}" if size and data.get("bytes") else ""
            shown = (_mb(size) if row["exact"] else f"≤ {_mb(size)}") if size is not None else "n/a"
            table.add_row(row["label"], shown, ratio, row["command"] if size is not None else row.get("error", ""))
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



def print_preview(data: dict, limit: int = 400) -> None:
    """A plan: every tensor's fate and why, then the totals."""
    console = Console(highlight=False)
    table = Table(title=f"plan: {data['src']} -> {data['target']}", title_justify="left")
    for column in ("tensor", "fate", "reason", "output", "bytes"):
        table.add_column(column, overflow="fold", justify="right" if column == "bytes" else "left")
    for t in data["tensors"][:limit]:
        outputs = ", ".join(f"{o['dtype']}{tuple(o['shape'])}" for o in t["outputs"][:1]) + (" …" if len(t["outputs"]) > 1 else "")
        style = {"refuse": "red", "keep": "yellow", "drop": "dim"}.get(t["fate"], "")
        table.add_row(t["name"], f"[{style}]{t['fate']}[/{style}]" if style else t["fate"], t["reason"], outputs,
                      f"{sum(o['nbytes'] for o in t['outputs']):,}")
    if len(data["tensors"]) > limit:
        table.add_row(f"… {len(data['tensors']) - limit} more (--json lists all)", "", "", "", "")
    console.print(table)
    counts = ", ".join(f"{n} {fate}" for fate, n in data["counts"].items())
    exact = "" if data["output_bytes_exact"] else "at most "
    console.print(f"tensors       {counts}")
    console.print(f"output        {exact}{data['output_bytes']:,} bytes ({_mb(data['output_bytes'])}) in {len(data['files'])} file(s); "
                  f"source {_mb(data['input_bytes'])}", markup=False)
    console.print(f"peak memory   about {_mb(data['estimated_peak_memory_bytes'])} (estimate)", markup=False)
    if "free_disk_bytes" in data:
        console.print(f"free disk     {_mb(data['free_disk_bytes'])} on {data['disk']}", markup=False)
    for warning in data["warnings"]:
        console.print(warning, markup=False, style="yellow")


def print_report(report, verbose: bool = False, worst: int = 5) -> None:
    """The checks, then layers: all with `verbose`, else the failures and the few with the largest error."""
    console = Console(highlight=False)
    table = Table(title=f"verify {report.path}", title_justify="left")
    for column in ("check", "result", "detail"):
        table.add_column(column, overflow="fold")
    for c in report.checks:
        table.add_row(c.name, "[green]pass[/green]" if c.ok else "[red]FAIL[/red]", c.detail)
    console.print(table)
    if report.layers:
        failed = [x for x in report.layers if not x.ok]
        ranked = sorted(report.layers, key=lambda x: x.rel_error / x.max_error if x.max_error else x.rel_error, reverse=True)
        shown = report.layers if verbose else failed + [x for x in ranked if x.ok][:worst]
        title = ("layers vs reference" if verbose else
                 f"layers vs reference: {len(failed)} failed, the {min(worst, len(report.layers) - len(failed))} nearest "
                 f"their bound of {len(report.layers)} (--verbose for all)")
        layers = Table(title=title, title_justify="left")
        for column in ("layer", "scheme", "rel. error", "bound", "SNR dB", "result"):
            layers.add_column(column, overflow="fold")
        for x in shown:
            layers.add_row(x.name, x.scheme, f"{x.rel_error:.5f}", f"{x.max_error:g}", f"{x.snr_db:.1f}",
                           "pass" if x.ok else "[red]FAIL[/red]")
        console.print(layers)
    if report.logits:
        kl = report.logits["kl"]
        figures = Table(title=f"logits vs {report.logits['reference']} ({report.logits['tokens']} tokens)", title_justify="left")
        for column in ("KL mean", "KL median", "KL p99", "KL max", "top-1 agreement", "perplexity ref.", "perplexity"):
            figures.add_column(column, justify="right")
        ppl = report.logits["perplexity"]
        figures.add_row(*(f"{kl[k]:.4g}" for k in ("mean", "median", "p99", "max")), f"{report.logits['top1_agreement']:.1%}",
                        f"{ppl['reference']:.4g}", f"{ppl['checkpoint']:.4g}")
        console.print(figures)
    console.print("[bold green]OK[/bold green]" if report.ok else "[bold red]PROBLEMS FOUND[/bold red]")


def print_formats(data: dict) -> None:
    console = Console(highlight=False)
    table = Table(title="quantize SRC OUT --method M (safetensors folder -> safetensors folder)", title_justify="left")
    for column in ("method", "settings [default]", "in inspect's table"):
        table.add_column(column, overflow="fold")
    for method, info in data["quantize"].items():
        table.add_row(method, ", ".join(f"{k}={v}" for k, v in info["settings"].items()), ", ".join(info["presets"]))
    console.print(table)
    console.print("dequantize reads  " + ", ".join(data["dequantize"]["quant_methods"]) + " folders and "
                  + ", ".join(data["dequantize"]["file_formats"]) + " files", markup=False)
    table = Table(title="convert SRC OUT --to T", title_justify="left")
    for column in ("to", "what"):
        table.add_column(column, overflow="fold")
    for target, info in data["convert"].items():
        table.add_row(target, "; ".join(f"{k}: {', '.join(v) if isinstance(v, list) else v}" for k, v in info.items()))
    console.print(table)
    console.print("inputs            " + "; ".join(data["inputs"]), markup=False)
