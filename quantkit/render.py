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



def print_report(report) -> None:
    table = Table(title=f"verify {report.path}", title_justify="left")
    for column in ("check", "result", "detail"):
        table.add_column(column)
    for c in report.checks:
        table.add_row(c.name, "[green]pass[/green]" if c.ok else "[red]FAIL[/red]", c.detail)
    console = Console()
    console.print(table)
    if report.layers:
        layers = Table(title="layers vs reference", title_justify="left")
        for column in ("layer", "scheme", "rel. error", "SNR dB", "result"):
            layers.add_column(column)
        for x in report.layers:
            layers.add_row(x.name, x.scheme, f"{x.rel_error:.5f}", f"{x.snr_db:.1f}", "pass" if x.ok else "[red]FAIL[/red]")
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
