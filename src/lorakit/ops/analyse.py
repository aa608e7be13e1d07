"""Where an adapter puts its change: per-module and per-block norm, energy and effective rank, and a heatmap.

Energy is ‖ΔW‖²_F; effective rank is ``exp(H)`` of the normalised singular values ``pᵢ = σᵢ/Σσ``
(Roy & Vetterli 2007): 1 for a rank-1 update, r for r equal singular values. Both come from the factors alone.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from lorakit.adapter import Adapter
from lorakit.blocks import block_of, block_vocabulary, detect_family
from lorakit.errors import LorakitError
from lorakit.formats.safetensors_io import atomic_write
from lorakit.ops.lowrank import factor_svd
from lorakit.ops.split import MODULE_TYPES, module_type


@dataclass(frozen=True)
class ModuleStats:
    """Statistics of one module's update.

    Attributes:
        path, block, type: where it sits.
        rank: its LoRA rank.
        norm: ‖ΔW‖_F.
        energy_share: its share of the adapter's total ‖ΔW‖²_F.
        effective_rank: ``exp`` of the entropy of σ/Σσ.
    """

    path: str
    block: str
    type: str
    rank: int
    norm: float
    energy_share: float
    effective_rank: float


def effective_rank(s) -> float:
    """``exp(−Σ pᵢ log pᵢ)`` with ``p = σ/Σσ``; 0 for a zero update."""
    total = float(s.sum())
    if total <= 0:
        return 0.0
    p = (s / total).clamp_min(1e-300)
    return math.exp(float(-(p * p.log()).sum()))


def module_stats(adapter: Adapter, family: str | None = None) -> list[ModuleStats]:
    """Per-module statistics, in the adapter's order (blocks from ``family``, detected if possible)."""
    family = family or _family(adapter)
    rows = []
    for path, m in adapter.modules.items():
        _, s, _ = factor_svd(m)
        norm = abs(m.scale) * float((s ** 2).sum().sqrt())
        block = block_of(path, family) if family else "-"
        rows.append((path, block, module_type(path, m), m.rank, norm, effective_rank(s)))
    total = sum(r[4] ** 2 for r in rows) or 1.0
    return [ModuleStats(p, b, t, r, n, n ** 2 / total, e) for p, b, t, r, n, e in rows]


def block_stats(adapter: Adapter, family: str | None = None) -> dict[str, dict[str, float]]:
    """Block → ``{"modules", "norm", "energy_share"}``, blocks in vocabulary order."""
    out: dict[str, dict[str, float]] = {}
    for s in module_stats(adapter, family):
        row = out.setdefault(s.block, {"modules": 0, "energy": 0.0, "energy_share": 0.0})
        row["modules"] += 1
        row["energy"] += s.norm ** 2
        row["energy_share"] += s.energy_share
    for row in out.values():
        row["norm"] = math.sqrt(row.pop("energy"))
    return out


def _family(adapter: Adapter) -> str | None:
    try:
        return detect_family(adapter.paths)
    except LorakitError:
        return None


def plot_block_energy(adapter: Adapter, path: str | os.PathLike, family: str | None = None,
                      title: str | None = None) -> None:
    """Write a PNG heatmap: energy share per block (columns) and module type (rows).

    Uses a bare matplotlib ``Figure`` (no pyplot), so no global plotting state is touched.
    """
    import numpy as np
    from matplotlib.figure import Figure

    family = family or _family(adapter)
    stats = module_stats(adapter, family)
    vocab = block_vocabulary(family, adapter.paths) if family else ("-",)
    blocks = [b for b in vocab if any(s.block == b for s in stats)]
    types = [t for t in MODULE_TYPES if any(s.type == t for s in stats)]
    grid = np.zeros((len(types), len(blocks)))
    for s in stats:
        grid[types.index(s.type), blocks.index(s.block)] += s.energy_share
    fig = Figure(figsize=(max(4.0, 0.45 * len(blocks) + 2), 0.5 * len(types) + 1.8))
    ax = fig.subplots()
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_xticks(range(len(blocks)), blocks, rotation=90, fontsize=8)
    ax.set_yticks(range(len(types)), types, fontsize=8)
    ax.set_title(title or f"share of ‖ΔW‖² per block ({family or 'no family'})", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.03)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
