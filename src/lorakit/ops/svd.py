"""SVD tools: resize an adapter's ranks from its factors, and extract an adapter from two sets of weights.

Resizing truncates each module's update to its top-k singular directions, which by Eckart–Young is the best
rank-k approximation in Frobenius (and spectral) norm; the error is ``|scale|·√(Σ_{i>k} σᵢ²)`` exactly. Singular
values come from the factors, O((in+out)·r²) per module: in float64 by QR (:func:`lorakit.ops.lowrank.factor_svd`)
for small modules, dynamic rank rules and float64 adapters; for a fixed target rank on large float32/16 modules by
the float32 Gram route (:func:`lorakit.ops.lowrank.gram_truncate`), batched over modules of equal shape, whose
singular values are exact to float32 rounding (≈1e-6·σ₁).

Extraction runs a randomized range finder (Halko et al. 2011, algorithms 4.4 and 5.1) in the weights' precision
(float32 unless they are float64), batched over modules of equal shape. An energy rule is measured against the
exact ‖ΔW‖²_F (one norm, no SVD), never against the sketch's Σσ², which misses the energy outside the sketch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from lorakit.adapter import Adapter, ModuleLora
from lorakit.errors import LorakitError
from lorakit.ops.lowrank import alpha_for_scale, energies, factor_svd, gram_truncate, module_from_svd, rank_for_energy


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
    DoRA magnitudes are kept as they are. With a fixed ``rank``, large float32/16 modules that truncate go through
    the batched float32 Gram route (see the module docstring); the others through the float64 QR route.
    """
    rule = {"rank": rank, "sv_ratio": sv_ratio, "fro": fro, "cumulative": cumulative, "max_rank": max_rank}
    choose_rank(torch.ones(1), **rule)  # check the rule once, before any work
    mods, ranks, kept, errs = {}, {}, {}, {}
    groups: dict[tuple, list[str]] = {}
    for path, m in adapter.modules.items():
        if rank is not None and _gram_eligible(m, rank):
            groups.setdefault((m.rank, m.out_features, m.A[0].numel(), m.A.dtype), []).append(path)
    for paths in groups.values():
        ms = [adapter.modules[p] for p in paths]
        results = gram_truncate([m.A.detach().flatten(1) for m in ms], [m.B.detach() for m in ms], rank)
        for path, m, res in zip(paths, ms, results):
            if res is None:  # not numerically full rank: the QR route below handles it exactly
                continue
            A, B, s2 = res
            A = A.reshape(rank, m.in_features, *m.kernel_size).to(m.A.dtype).contiguous()
            new = replace(m, A=A, B=B.to(m.B.dtype).contiguous(), alpha=alpha_for_scale(m.scale, rank, m.rslora))
            total = float(s2.sum())
            tail = max(float(s2[rank:].sum()), 0.0)
            mods[path], ranks[path] = new, (m.rank, rank)
            kept[path] = 1.0 - tail / total if total > 0 else 1.0
            errs[path] = abs(m.scale) * math.sqrt(tail)
    for path, m in adapter.modules.items():
        if path not in mods:
            new, share, err = resize_module(m, **rule)
            mods[path], ranks[path], kept[path], errs[path] = new, (m.rank, new.rank), share, err
    order = list(adapter.modules)
    return (replace(adapter, modules={p: mods[p] for p in order}),
            ResizeReport({p: ranks[p] for p in order}, {p: kept[p] for p in order}, {p: errs[p] for p in order}))


#: Updates with at least this many entries (out·in·k) use the float32 Gram route when truncating to a fixed rank;
#: below it the float64 QR route costs little and is exact to float64 rounding.
GRAM_MIN_ENTRIES = 1 << 16


def _gram_eligible(m: ModuleLora, rank: int) -> bool:
    n = m.A[0].numel()
    return (m.A.dtype != torch.float64 and rank < m.rank <= min(m.out_features, n)
            and m.out_features * n >= GRAM_MIN_ENTRIES)


def _layout_to_2d(delta: Tensor, kind: str) -> Tensor:
    """A weight difference in the base layer's layout → (out, in·k) as the LoRA sees it."""
    if kind in ("linear_t", "embedding"):
        return delta.T
    return delta.flatten(1)


def extract_module(base: Tensor, tuned: Tensor, kind: str, *, rank: int | None = None,
                   energy: float | None = None, max_rank: int = 128, oversample: int = 16, niter: int = 1,
                   seed: int = 0) -> tuple[ModuleLora, float]:
    """A LoRA module approximating ``tuned − base`` by randomized SVD (Halko et al. 2011).

    Args:
        base, tuned: the weights in the layer's own layout.
        kind: layer kind (``linear``, ``linear_t``, ``conv1d``, ``conv2d``, ``embedding``).
        rank: target rank; or ``energy``: smallest rank whose update holds this share of the exact ‖ΔW‖²_F, in
            (0, 1] (up to ``max_rank``; where even ``max_rank`` directions cannot hold it, ``max_rank`` and the
            share they hold). The ranks come from the sketch's singular values, which are lower bounds of the true
            ones, so the share is always met; where the sketch's leading ``max_rank`` directions fall short of it
            and the sketch's residual does not rule it out, the module's exact SVD decides instead.
        oversample, niter: randomized SVD accuracy knobs (extra sketch columns, power iterations). The defaults
            reach within 0.1% of the Eckart–Young error on trained-adapter-like spectra (``bench/perf.py``); raise
            ``niter`` for flat spectra.
        seed: seed of the random projection (deterministic results; the global RNG is not touched).

    Returns:
        (module with alpha = rank, i.e. scale 1; share of ‖ΔW‖²_F it captures).
    """
    _check_pair(base, tuned, rank, energy)
    d = _layout_to_2d(tuned.to(_work_dtype(base, tuned)) - base.to(_work_dtype(base, tuned)), kind)
    return _extract_batch([d], base.shape, tuned.dtype, kind, rank=rank, energy=energy, max_rank=max_rank,
                          oversample=oversample, niter=niter, seed=seed)[0]


def _check_pair(base: Tensor, tuned: Tensor, rank: int | None, energy: float | None) -> None:
    if base.shape != tuned.shape:
        raise LorakitError(f"base weight {tuple(base.shape)} and tuned weight {tuple(tuned.shape)} differ in shape")
    if (rank is None) == (energy is None):
        raise LorakitError("extract needs exactly one of rank or energy")
    if energy is not None and not 0 < energy <= 1:  # also refuses NaN
        raise LorakitError(f"extract: energy must lie in (0, 1], got {energy}")


def _work_dtype(base: Tensor, tuned: Tensor) -> torch.dtype:
    """float64 if either weight is, else float32 (half-precision weights are widened)."""
    return torch.float64 if torch.float64 in (base.dtype, tuned.dtype) else torch.float32


def randomized_svd(d: Tensor, q: int, niter: int, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Leading q singular triplets of a stack of matrices by a randomized range finder with power iterations.

    Halko, Martinsson & Tropp (2011), algorithm 4.4 (subspace iteration, re-orthonormalised after every product
    so the float32 sketch does not collapse onto the top direction) and algorithm 5.1 (SVD of the small
    projection). One Gaussian test matrix serves the whole stack, so each product is one batched GEMM.

    Args:
        d: (m, out, n).
        q: sketch width, at most min(out, n).
        niter: power iterations.
        generator: source of the test matrix.

    Returns:
        ``U``: (m, out, q), ``S``: (m, q) descending, ``Vh``: (m, q, n).
    """
    omega = torch.randn(d.shape[-1], q, generator=generator, dtype=d.dtype, device=d.device)
    Q = torch.linalg.qr(d @ omega).Q  # (m, out, q)
    for _ in range(niter):
        # (Qᵀ·D)ᵀ rather than Dᵀ·Q: the long axis stays contiguous in both operands (much faster on CPU).
        Z = torch.linalg.qr((Q.mT @ d).mT).Q  # (m, n, q)
        Q = torch.linalg.qr(d @ Z).Q
    # SVD of the (q, n) projection Qᵀ·D through its QR, (Qᵀ·D)ᵀ = Q₂·R: only the q×q factor R goes to the SVD.
    Q2, R = torch.linalg.qr((Q.mT @ d).mT)  # (m, n, q), (m, q, q)
    u, s, vh = torch.linalg.svd(R.mT)  # Qᵀ·D = Rᵀ·Q₂ᵀ = u·diag(s)·(vh·Q₂ᵀ)
    return Q @ u, s, vh @ Q2.mT


def _extract_batch(ds: list[Tensor], weight_shape: torch.Size, dtype: torch.dtype, kind: str, *,
                   rank: int | None, energy: float | None, max_rank: int, oversample: int, niter: int,
                   seed: int) -> list[tuple[ModuleLora, float]]:
    """:func:`extract_module` for several differences of one shape and kind, ``ds``: each (out, n)."""
    d = torch.stack(ds)  # (m, out, n)
    totals = torch.linalg.vector_norm(d.flatten(1), dim=1).double().square().tolist()  # no float64 copy of d
    cap = min(d.shape[1:])
    want = min(rank if rank is not None else max_rank, cap)
    q = min(want + oversample, cap)
    gen = torch.Generator(device=d.device).manual_seed(seed)
    U, S, Vh = randomized_svd(d, q, niter, gen)
    kernel = tuple(int(k) for k in weight_shape[2:]) if kind in ("conv1d", "conv2d") else ()
    n_in = d.shape[2] // math.prod(kernel)
    out = []
    for i, total in enumerate(totals):
        u, s, vh = U[i], S[i], Vh[i]
        if rank is not None:
            k = want
        elif total <= 0:  # nothing to hold: one (zero) direction
            k = 1
        else:
            k = _rank_for_share(s, energy * total, want, d.dtype)
            if k is None and q < cap and _may_reach(s, total, energy * total, want, d.dtype):
                # The sketch's leading directions underestimate σ (flat spectrum, few power iterations): the
                # exact spectrum says whether `want` directions or fewer can hold the share.
                u, s, vh = torch.linalg.svd(d[i], full_matrices=False)
                k = _rank_for_share(s, energy * total, want, d.dtype)
            k = want if k is None else k
        kept = float(s[:k].double().square().sum()) / total if total > 0 else 1.0
        template = ModuleLora(A=torch.zeros(k, n_in, *kernel, dtype=dtype),
                              B=torch.zeros(d.shape[1], k, dtype=dtype), alpha=float(k), kind=kind)
        out.append((module_from_svd(template, u[:, :k], s[:k], vh[:k], scale=1.0), min(kept, 1.0)))
    return out


def _share_tol(dtype: torch.dtype) -> float:
    """Slack on an energy target for the rounding of Σσ² in the work precision (relative to ‖ΔW‖²_F)."""
    return 16 * torch.finfo(dtype).eps


def _rank_for_share(s: Tensor, target: float, limit: int, dtype: torch.dtype) -> int | None:
    """The least k ≤ ``limit`` with Σ_{i<k} σᵢ² ≥ ``target``, or ``None`` when the first ``limit`` fall short.

    Args:
        s: (q,) singular values, descending.
        target: energy to reach, share × the exact ‖ΔW‖²_F.
        limit: largest rank allowed.
        dtype: precision ``s`` was computed in (sets the rounding slack).
    """
    cum = s[:limit].double().square().cumsum(0)
    total = float(cum[-1]) if cum.numel() else 0.0
    reached = cum >= target - _share_tol(dtype) * max(target, total)
    return int(reached.to(torch.int8).argmax()) + 1 if bool(reached.any()) else None


def _may_reach(s: Tensor, total: float, target: float, limit: int, dtype: torch.dtype) -> bool:
    """Whether some rank-``limit`` matrix could still hold ``target`` of ``ΔW``'s energy, given its sketch.

    With ``ΔW = QQᵀΔW + E`` (Q the sketch's range, σ̂ the sketch's singular values), ``ΔWᵀΔW`` is the sum of two
    PSD matrices with eigenvalues σ̂² and those of ``EᵀE``, so by Ky Fan's inequality the best rank-k share is at
    most ``Σ_{i<k} σ̂ᵢ² + ‖E‖²_F``, where ``‖E‖²_F = ‖ΔW‖²_F − Σ σ̂ᵢ²``. Below the target, no exact SVD is needed.
    """
    e2 = s.double().square()
    residual = max(total - float(e2.sum()), 0.0)
    return float(e2[:limit].sum()) + residual >= target - _share_tol(dtype) * total


def extract(base: Mapping[str, Tensor], tuned: Mapping[str, Tensor], kinds: Mapping[str, str], *,
            rank: int | None = None, energy: float | None = None, max_rank: int = 128, min_diff: float = 0.0,
            oversample: int = 16, niter: int = 1, base_model: str | None = None) -> tuple[Adapter, dict[str, float]]:
    """An adapter from a base and a fine-tuned state dict: one module per changed weight in ``kinds``.

    Modules whose differences have the same shape, kind and dtype are extracted together (batched GEMMs).

    Args:
        base, tuned: state dicts (``<module>.weight`` keys).
        kinds: module path → layer kind, for the modules to consider (e.g. from :func:`module_kinds`).
        rank, energy, max_rank, oversample, niter: see :func:`extract_module`.
        min_diff: skip modules whose ‖ΔW‖_max is at most this.

    Returns:
        (adapter, module → share of ‖ΔW‖²_F captured).

    Raises:
        LorakitError: a module's weight is missing from either state dict, or nothing changed.
    """
    groups: dict[tuple, list[tuple[str, Tensor]]] = {}
    missing = []
    for path, kind in kinds.items():
        key = f"{path}.weight"
        if key not in base or key not in tuned:
            missing.append(key)
            continue
        b, t = base[key], tuned[key]
        _check_pair(b, t, rank, energy)
        work = _work_dtype(b, t)
        d = _layout_to_2d(t.to(work) - b.to(work), kind)
        if float(d.abs().max()) <= min_diff:
            continue
        groups.setdefault((tuple(b.shape), kind, t.dtype, work), []).append((path, d))
    if missing:
        raise LorakitError(f"weights missing from the base or tuned state dict: {missing[:5]}")
    if not groups:
        raise LorakitError("no weight differs between the base and the tuned model")
    found: dict[str, tuple[ModuleLora, float]] = {}
    for (shape, kind, dtype, _), items in groups.items():
        results = _extract_batch([d for _, d in items], torch.Size(shape), dtype, kind, rank=rank, energy=energy,
                                 max_rank=max_rank, oversample=oversample, niter=niter, seed=0)
        found.update(zip((p for p, _ in items), results))
    order = [p for p in kinds if p in found]
    return (Adapter({p: found[p][0] for p in order}, base_model=base_model),
            {p: found[p][1] for p in order})


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
