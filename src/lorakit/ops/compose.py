"""Compose several adapters (or parts of them) with weights into one; pure functions.

Methods:

* ``concat`` — exact. A module in one adapter only is kept with its weight in alpha (factors bit-identical).
  A module in several adapters is concatenated along rank: ``ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ = s [B₁ … Bₙ] [c₁A₁; …; cₙAₙ]``
  with ``cᵢ = wᵢ sᵢ / s``; when every ``wᵢ sᵢ`` is equal, ``cᵢ = 1`` and only alpha changes.
* ``svd`` — ``concat``, then modules above ``rank`` are truncated to it (best rank-k, retained energy reported).
* ``ties`` — TIES-merging (Yadav et al. 2023): trim each update to its top ``density`` entries by magnitude, elect a
  sign per entry from the weighted sum, average the agreeing entries; then the best rank-``rank`` factors.
* ``dare`` — DARE (Yu et al. 2024): drop entries with probability ``1 − density``, rescale the rest by
  ``1/density``, sum with weights; then the best rank-``rank`` factors.

Summing the A and B factors separately (which computes ``(ΣB)(ΣA)``, not ``ΣBA``) is never offered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lorakit.adapter import Adapter, ModuleLora
from lorakit.errors import LorakitError
from lorakit.ops.lowrank import alpha_for_scale
from lorakit.ops.svd import extract_module, resize_module

METHODS = ("concat", "svd", "ties", "dare")


@dataclass(frozen=True)
class ComposeReport:
    """What :func:`compose` did per module.

    Attributes:
        sources: module → indices of the adapters that contributed it.
        retained_energy: module → share of the combined update's energy kept (1.0 for exact results).
    """

    sources: dict[str, list[int]]
    retained_energy: dict[str, float]


def concat_modules(pieces: Sequence[ModuleLora], weights: Sequence[float]) -> ModuleLora:
    """One module whose update is ``Σ wᵢ·ΔWᵢ`` exactly, by concatenation along rank (see the module docstring).

    Raises:
        LorakitError: the pieces differ in kind or shape, or one carries a DoRA magnitude.
    """
    first = pieces[0]
    problems = [f"piece {i}: {m.kind} {m.weight_shape} vs {first.kind} {first.weight_shape}"
                for i, m in enumerate(pieces) if (m.kind, m.weight_shape) != (first.kind, first.weight_shape)]
    if any(m.magnitude is not None for m in pieces):
        problems.append("DoRA modules cannot be concatenated (their magnitudes do not add)")
    if problems:
        raise LorakitError("cannot concatenate modules: " + "; ".join(problems))
    eff = [float(w) * m.scale for m, w in zip(pieces, weights, strict=True)]
    rslora = all(m.rslora for m in pieces)
    target = eff[0] if all(e == eff[0] for e in eff) else max(abs(e) for e in eff)
    if target == 0:
        target = 1.0
    dtype = pieces[0].A.dtype
    for m in pieces[1:]:
        dtype = torch.promote_types(dtype, m.A.dtype)
    a_parts = [(m.A if e == target else m.A * (e / target)).to(dtype) for m, e in zip(pieces, eff, strict=True)]
    A = torch.cat(a_parts, dim=0)
    B = torch.cat([m.B.to(dtype) for m in pieces], dim=1)
    return replace(first, A=A, B=B, alpha=alpha_for_scale(target, int(A.shape[0]), rslora), rslora=rslora)


def _merged_delta(pieces: Sequence[ModuleLora], weights: Sequence[float], method: str, density: float,
                  gen: torch.Generator) -> Tensor:
    """TIES or DARE combination of the pieces' updates, in the base layout, float64."""
    deltas = [m.lowrank_delta().double() for m in pieces]
    if method == "dare":
        out = torch.zeros_like(deltas[0])
        for d, w in zip(deltas, weights, strict=True):
            keep = torch.rand(d.shape, generator=gen, dtype=torch.float64) < density
            out += w * torch.where(keep, d / density, torch.zeros_like(d))
        return out
    trimmed = []
    for d, w in zip(deltas, weights, strict=True):
        k = max(1, round(density * d.numel()))
        thresh = d.abs().flatten().kthvalue(d.numel() - k + 1).values
        trimmed.append(w * torch.where(d.abs() >= thresh, d, torch.zeros_like(d)))
    stack = torch.stack(trimmed)
    sign = torch.sign(stack.sum(0))
    agree = (torch.sign(stack) == sign) & (stack != 0)
    count = agree.sum(0).clamp_min(1)
    return torch.where(agree, stack, torch.zeros_like(stack)).sum(0) / count


def compose(adapters: Sequence[Adapter], weights: Sequence[float] | None = None, *, method: str = "concat",
            rank: int | None = None, density: float = 0.5, seed: int = 0) -> tuple[Adapter, ComposeReport]:
    """Combine ``adapters`` with ``weights`` (default all 1) by ``method`` (see the module docstring).

    Args:
        rank: target rank for ``svd`` (required) and for ``ties``/``dare`` (default: the summed ranks).
        density: share of entries kept by ``ties`` / ``dare``.
        seed: DARE's drop mask seed.

    Returns:
        (composed adapter, report). Overrides are united; the same key in two adapters must hold equal tensors.
    """
    if method not in METHODS:
        raise LorakitError(f"unknown compose method {method!r} (known: {', '.join(METHODS)})")
    if not adapters:
        raise LorakitError("compose needs at least one adapter")
    weights = [1.0] * len(adapters) if weights is None else [float(w) for w in weights]
    if len(weights) != len(adapters):
        raise LorakitError(f"{len(adapters)} adapters but {len(weights)} weights")
    if method == "svd" and rank is None:
        raise LorakitError("compose method 'svd' needs a target rank")
    if method in ("ties", "dare") and not 0 < density <= 1:
        raise LorakitError(f"density must lie in (0, 1], got {density}")
    sources: dict[str, list[int]] = {}
    for i, a in enumerate(adapters):
        for p in a.modules:
            sources.setdefault(p, []).append(i)
    gen = torch.Generator().manual_seed(seed)
    mods, kept = {}, {}
    for path, idx in sources.items():
        pieces = [adapters[i].modules[path] for i in idx]
        ws = [weights[i] for i in idx]
        if len(idx) == 1:
            m = pieces[0]
            mods[path] = m if ws[0] == 1.0 else m.with_alpha(m.alpha * ws[0])
        elif method in ("concat", "svd"):
            mods[path] = concat_modules(pieces, ws)
        else:
            if any(m.magnitude is not None for m in pieces):
                raise LorakitError(f"{path}: {method} merging is not defined for DoRA modules")
            delta = _merged_delta(pieces, ws, method, density, gen)
            r = rank or sum(m.rank for m in pieces)
            m, share = extract_module(torch.zeros_like(delta), delta, pieces[0].kind, rank=r, seed=seed)
            mods[path], kept[path] = m.to(pieces[0].A.dtype), share
        if method == "svd" and mods[path].rank > rank:  # type: ignore[operator]
            mods[path], kept[path], _ = resize_module(mods[path], rank=rank)
        kept.setdefault(path, 1.0)
    overrides: dict[str, Tensor] = {}
    for a in adapters:
        for k, t in a.overrides.items():
            if k in overrides and not (overrides[k].shape == t.shape and torch.equal(overrides[k], t)):
                raise LorakitError(f"override {k!r} differs between the adapters; compose cannot choose one")
            overrides.setdefault(k, t)
    bases = {a.base_model for a in adapters}
    metadata: dict[str, str] = {}
    for a in adapters:
        metadata.update(a.metadata)
    targets = tuple(dict.fromkeys(t for a in adapters for t in a.targets))
    out = Adapter(mods, overrides, base_model=bases.pop() if len(bases) == 1 else None, targets=targets,
                  metadata=metadata)
    return out, ComposeReport(sources, kept)
