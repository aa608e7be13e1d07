"""Run records: metrics JSONL, the loss/metric plot, the resolved config and the library versions."""

from __future__ import annotations

import json
import math
import platform
import sys
from pathlib import Path
from typing import Any

import yaml

from lorakit.errors import FileFormatError
from lorakit.formats import checked
from lorakit.formats.safetensors_io import atomic_write


def versions() -> dict[str, str]:
    """Versions of Python, the platform and the libraries a run depends on."""
    import torch
    import transformers

    import lorakit

    return {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "transformers": transformers.__version__, "lorakit": lorakit.__version__}


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    """``config.yaml`` (resolved config) and ``versions.json`` in the run directory."""
    text = yaml.safe_dump(config, sort_keys=False)
    atomic_write(run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    vtext = json.dumps(versions(), indent=2) + "\n"
    atomic_write(run_dir / "versions.json", lambda tmp: Path(tmp).write_text(vtext, encoding="utf-8"))


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Records of a metrics JSONL file (empty when absent)."""
    if not path.is_file():
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise FileFormatError(path, f"metrics: not UTF-8 text ({e})") from None
    # A run's own file, but read back on resume: each line through the checked reader, one object each.
    return [checked.load(line, checked.Map(), path, f"metrics line {i + 1}")
            for i, line in enumerate(lines) if line.strip()]


def write_metrics(path: Path, records: list[dict[str, Any]]) -> None:
    """Rewrite the whole metrics file atomically. A non-finite number (the gradient norm of an fp16 step that
    overflowed) is written as ``null``: JSON has no NaN or infinity, and the reader refuses them."""
    text = "".join(json.dumps({k: None if isinstance(v, float) and not math.isfinite(v) else v
                               for k, v in r.items()}) + "\n" for r in records)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def figure(records: list[dict[str, Any]], metric: str):
    """The training plot as a matplotlib ``Figure``: training loss (left) and every eval's ``metric`` (right; for
    the diffusion task the validation ``eval_loss``) against the optimiser step."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5))
    ax1, ax2 = fig.subplots(1, 2)
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval" and metric in r]
    ax1.plot([r["step"] for r in train], [r["loss"] for r in train])
    ax1.set(xlabel="step", ylabel="training loss", title="loss")
    ax2.plot([r["step"] for r in evals], [r[metric] for r in evals], marker="o")
    ax2.set(xlabel="step", ylabel=metric, title=f"eval {metric}")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot(records: list[dict[str, Any]], metric: str, path: Path) -> None:
    """:func:`figure` as a PNG, written atomically."""
    fig = figure(records, metric)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
