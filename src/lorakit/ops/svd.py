"""SVD tools: resize an adapter's ranks from its factors, and extract an adapter from two sets of weights.

Resizing truncates each module's update to its top-k singular directions, which by Eckart–Young is the best
rank-k approximation in Frobenius (and spectral) norm; the error is ``|scale|·√(Σ_{i>k} σᵢ²)`` exactly. Singular
values come from the factors (:func:`lorakit.ops.lowrank.factor_svd`), O((in+out)·r²) per module.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lorakit.adapter import Adapter, ModuleLora
from lorakit.errors import LorakitError
from lorakit.ops.lowrank import energies, factor_svd, module_from_svd, rank_for_energy


@dataclass(frozen=True)
class ResizeReport:
    """What :func:`resize` kept and lost, per module.

    Attributes:
        ranks: module → (old rank, new rank).
        retained_energy: module → share of ‖ΔW‖²_F kept.
        error: module → ‖ΔW − ΔW_k‖_F (the Eckart–Young optimum).
    """

    ranks: Mapping[str, tuple[int, int]]
    retained_energy: Mapping[str, float]
    error: Mapping[str, float]


def choose_rank(s: Tensor, rank: int | None = None, sv_ratio: float | None = None, fro: float | None = None,
                cumulative: float | None = None, max_rank: int | None = None) -> int:
    """How many singular values to keep, by exactly one rule.

    Args:
        s: singular values, descending.
        rank: a fixed rank.
        sv_ratio: keep σᵢ ≥ σ₁ / sv_ratio.
        fro: keep the fewest directions holding this share of the Frobenius norm (√ of the energy share).
        cumulative: keep the fewest directions whose Σσ reaches this share of the total Σσ.
        max_rank: cap for the dynamic rules.
    """
    given = [x is not None for x in (rank, sv_ratio, fro, cumulative)]
    if sum(given) != 1:
        raise LorakitError("choose exactly one of rank, sv_ratio, fro, cumulative")
    q = int(s.shape[0])
    if rank is not None:
        if rank < 1:
            raise LorakitError(f"rank must be ≥ 1, got {rank}")
        return min(rank, q)
    if sv_ratio is not None:
        if sv_ratio < 1:
            raise LorakitError(f"sv_ratio must be ≥ 1, got {sv_ratio}")
        k = int((s >= s[0] / sv_ratio).sum()) if q else 0
    elif fro is not None:
        if not 0 < fro <= 1:
            raise LorakitError(f"fro must lie in (0, 1], got {fro}")
        k = rank_for_energy(s, fro ** 2)
    else:
        if not 0 < cumulative <= 1:  # type: ignore[operator]
            raise LorakitError(f"cumulative must lie in (0, 1], got {cumulative}")
        total = float(s.sum())
        k = int((s.cumsum(0) / total < cumulative - 1e-12).sum()) + 1 if total > 0 else 1  # type: ignore[operator]
    k = max(1, min(k, q))
    return min(k, max_rank) if max_rank else k


def resize_module(m: ModuleLora, **rule) -> tuple[ModuleLora, float, float]:
    """One module truncated to the rank ``rule`` chooses (see :func:`choose_rank`); keeps the module's scale.

    Returns:
        (new module, retained energy share, Frobenius error of the update).
    """
    u, s, vh = factor_svd(m)
    k = choose_rank(s, **rule)
    cum = energies(s)
    err = abs(m.scale) * float((s[k:] ** 2).sum().sqrt())
    return module_from_svd(m, u[:, :k], s[:k], vh[:k]), float(cum[k - 1]), err


def resize(adapter: Adapter, *, rank: int | None = None, sv_ratio: float | None = None, fro: float | None = None,
           cumulative: float | None = None, max_rank: int | None = None) -> tuple[Adapter, ResizeReport]:
    """Every module truncated to a fixed rank or a dynamically chosen one; a new adapter and what was lost.

    Modules already at or below the target rank are re-orthogonalised too (their update is unchanged to rounding).
    DoRA magnitudes are kept as they are.
    """
    rule = {"rank": rank, "sv_ratio": sv_ratio, "fro": fro, "cumulative": cumulative, "max_rank": max_rank}
    mods, ranks, kept, errs = {}, {}, {}, {}
    for path, m in adapter.modules.items():
        new, share, err = resize_module(m, **rule)
        mods[path], ranks[path], kept[path], errs[path] = new, (m.rank, new.rank), share, err
    return replace(adapter, modules=mods), ResizeReport(ranks, kept, errs)


def _layout_to_2d(delta: Tensor, kind: str) -> Tensor:
    """A weight difference in the base layer's layout → (out, in·k) as the LoRA sees it."""
    if kind in ("linear_t", "embedding"):
        return delta.T
    return delta.flatten(1)


def extract_module(base: Tensor, tuned: Tensor, kind: str, *, rank: int | None = None,
                   energy: float | None = None, max_rank: int = 128, oversample: int = 8, niter: int = 4,
                   seed: int = 0) -> tuple[ModuleLora, float]:
    """A LoRA module approximating ``tuned − base`` by randomized SVD (Halko et al. 2011, ``torch.svd_lowrank``).

    Args:
        base, tuned: the weights in the layer's own layout.
        kind: layer kind (``linear``, ``linear_t``, ``conv1d``, ``conv2d``, ``embedding``).
        rank: target rank; or ``energy``: smallest rank holding this share of ‖ΔW‖²_F (up to ``max_rank``).
        oversample, niter: randomized SVD accuracy knobs.
        seed: seed of the random projection (deterministic results).

    Returns:
        (module with alpha = rank, i.e. scale 1; share of ‖ΔW‖²_F it captures).
    """
    if base.shape != tuned.shape:
        raise LorakitError(f"base weight {tuple(base.shape)} and tuned weight {tuple(tuned.shape)} differ in shape")
    if (rank is None) == (energy is None):
        raise LorakitError("extract needs exactly one of rank or energy")
    d = _layout_to_2d(tuned.double() - base.double(), kind)  # (out, n)
    total = float((d ** 2).sum())
    cap = min(d.shape)
    want = min(rank if rank is not None else max_rank, cap)
    q = min(want + oversample, cap)
    with torch.random.fork_rng(devices=[]):  # a seeded projection without touching the caller's RNG
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(d, q=q, niter=niter)
    k = want if rank is not None else min(want, rank_for_energy(s, energy) if total > 0 else 1)
    k = max(1, k)
    kept = float((s[:k] ** 2).sum()) / total if total > 0 else 1.0
    kernel = tuple(int(k) for k in base.shape[2:]) if kind in ("conv1d", "conv2d") else ()
    n_in = d.shape[1] // math.prod(kernel)
    template = ModuleLora(A=torch.zeros(k, n_in, *kernel, dtype=tuned.dtype),
                          B=torch.zeros(d.shape[0], k, dtype=tuned.dtype), alpha=float(k), kind=kind)
    return module_from_svd(template, u[:, :k], s[:k], v[:, :k].T, scale=1.0), min(kept, 1.0)


def extract(base: Mapping[str, Tensor], tuned: Mapping[str, Tensor], kinds: Mapping[str, str], *,
            rank: int | None = None, energy: float | None = None, max_rank: int = 128, min_diff: float = 0.0,
            base_model: str | None = None) -> tuple[Adapter, dict[str, float]]:
    """An adapter from a base and a fine-tuned state dict: one module per changed weight in ``kinds``.

    Args:
        base, tuned: state dicts (``<module>.weight`` keys).
        kinds: module path → layer kind, for the modules to consider (e.g. from :func:`module_kinds`).
        rank, energy, max_rank: see :func:`extract_module`.
        min_diff: skip modules whose ‖ΔW‖_max is at most this.

    Returns:
        (adapter, module → share of ‖ΔW‖²_F captured).

    Raises:
        LorakitError: a module's weight is missing from either state dict, or nothing changed.
    """
    mods, kept, missing = {}, {}, []
    for path, kind in kinds.items():
        key = f"{path}.weight"
        if key not in base or key not in tuned:
            missing.append(key)
            continue
        if float((tuned[key].double() - base[key].double()).abs().max()) <= min_diff:
            continue
        mods[path], kept[path] = extract_module(base[key], tuned[key], kind, rank=rank, energy=energy,
                                                max_rank=max_rank)
    if missing:
        raise LorakitError(f"weights missing from the base or tuned state dict: {missing[:5]}")
    if not mods:
        raise LorakitError("no weight differs between the base and the tuned model")
    return Adapter(mods, base_model=base_model), kept


def module_kinds(model: torch.nn.Module) -> dict[str, str]:
    """Module path → layer kind for every module of ``model`` that can carry a LoRA."""
    from lorakit.layers import base_kind

    return {p: k for p, m in model.named_modules() if p and (k := base_kind(m)) is not None}


def kinds_from_shapes(state: Mapping[str, Tensor]) -> dict[str, str]:
    """Module path → kind guessed from weight shapes alone: 2-D ``linear``, 3-D ``conv1d``, 4-D ``conv2d``.

    Embeddings and GPT-2's transposed ``Conv1D`` cannot be told apart from linear layers by shape; use
    :func:`module_kinds` on the model for those.
    """
    guess = {2: "linear", 3: "conv1d", 4: "conv2d"}
    return {k[: -len(".weight")]: guess[t.ndim] for k, t in state.items()
            if k.endswith(".weight") and t.ndim in guess and t.is_floating_point()}
