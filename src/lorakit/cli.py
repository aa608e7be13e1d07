"""The ``lorakit`` command line: each verb calls one library function, prints, and maps errors to exit codes.

Exit codes: 0 success, 1 a lorakit error (bad file, bad option value), 2 usage error (typer's own).
"""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from lorakit.errors import LorakitError
from lorakit.formats import native
from lorakit.formats.safetensors_io import sha256_file

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="LoRA adapters as data: inspect, train, convert, split and compose adapters.")
out = Console()
err = Console(stderr=True)


@app.callback()
def root() -> None:
    """LoRA adapters as data: inspect, train, convert, split and compose adapters."""


def describe(path: Path) -> dict:
    """A JSON-ready summary of an adapter file: header fields and per-module rank, alpha, params, bytes, ‖ΔW‖."""
    adapter = native.load(path)
    modules = [{"module": p, "kind": m.kind, "rank": m.rank, "alpha": m.alpha, "scale": m.scale,
                "shape": list(m.weight_shape), "params": m.numel, "bytes": m.nbytes, "dora": m.magnitude is not None,
                "delta_norm": m.delta_norm()}
               for p, m in adapter.modules.items()]
    return {"file": str(path), "format": f"{native.FORMAT} v{native.VERSION}", "sha256": sha256_file(path),
            "base_model": adapter.base_model, "targets": list(adapter.targets), "modules": modules,
            "num_modules": len(adapter), "total_rank": adapter.total_rank, "params": adapter.num_params,
            "bytes": adapter.nbytes, "dtype": str(adapter.dtype).removeprefix("torch."),
            "overrides": {k: list(t.shape) for k, t in adapter.overrides.items()}, "metadata": dict(adapter.metadata)}


@app.command()
def inspect(file: Path = typer.Argument(..., help="adapter file (.safetensors)"),
            as_json: bool = typer.Option(False, "--json", help="print machine-readable JSON")) -> None:
    """Show an adapter's modules, ranks, alphas, sizes and per-module update norms."""
    info = describe(file)
    if as_json:
        print(json.dumps(info, indent=2))
        return
    out.print(f"[bold]{info['file']}[/bold]  {info['format']}  base: {info['base_model'] or '-'}")
    table = Table("kind", "rank", "alpha", "shape", "params", "bytes", "‖ΔW‖")
    table.add_column("module", overflow="fold")
    for m in info["modules"]:
        table.add_row(m["kind"] + (" +DoRA" if m["dora"] else ""), str(m["rank"]), f"{m['alpha']:g}",
                      "×".join(map(str, m["shape"])), f"{m['params']:,}", f"{m['bytes']:,}", f"{m['delta_norm']:.4g}", m["module"])
    out.print(table)
    out.print(f"{info['num_modules']} modules, total rank {info['total_rank']}, {info['params']:,} parameters, "
              f"{info['bytes']:,} bytes, dtype {info['dtype']}")
    if info["overrides"]:
        out.print(f"full tensors: {', '.join(info['overrides'])}")


def main() -> None:
    """Entry point: run the app, turning a :class:`LorakitError` into one line on stderr and exit code 1.

    Usage errors are typer's own (exit code 2).
    """
    try:
        app()
    except LorakitError as e:
        err.print(f"[red]error:[/red] {'; '.join(line.strip(' -') for line in str(e).splitlines())}",
                  highlight=False, soft_wrap=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
