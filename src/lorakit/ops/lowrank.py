"""The singular value decomposition of a LoRA update from its factors alone, and the factors of a piece of it.

For ``ΔW = s·B·A`` with ``B``: (out, r) and ``A``: (r, n) (n = in·kernel), QR-factorise ``B = Q_B R_B``
and ``Aᵀ = Q_A R_A``; then ``B·A = Q_B (R_B R_Aᵀ) Q_Aᵀ`` and the SVD of the small core ``R_B R_Aᵀ = U' S V'ᵀ`` gives
``B·A = (Q_B U') S (Q_A V')ᵀ``. The cost is O((out + n)·r²); ``B·A`` itself (out × n) is never formed.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import Tensor

from lorakit.adapter import ModuleLora


def alpha_for_scale(scale: float, rank: int, rslora: bool = False) -> float:
    """The alpha that gives ``scale`` at ``rank``: ``scale·r`` (or ``scale·√r`` with rsLoRA)."""
    return scale * math.sqrt(rank) if rslora else scale * rank


def factor_svd(m: ModuleLora) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD of the unscaled product ``B·A`` of one module, in float64, from its factors.

    Returns:
        ``U``: (out, q), ``S``: (q,) descending, ``Vh``: (q, in·k) with ``B·A.flatten(1) = U·diag(S)·Vh`` and
        q = min(r, out, in·k). The module's update is ``m.scale · U·diag(S)·Vh``.
    """
    a = m.A.detach().flatten(1).double()  # (r, n)
    b = m.B.detach().double()  # (out, r)
    qb, rb = torch.linalg.qr(b)  # (out, k1), (k1, r)
    qa, ra = torch.linalg.qr(a.T)  # (n, k2), (k2, r)
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)  # core (k1, k2)
    return qb @ u, s, vh @ qa.T


def module_from_svd(m: ModuleLora, u: Tensor, s: Tensor, vh: Tensor, scale: float | None = None) -> ModuleLora:
    """The module with update ``scale · U·diag(S)·Vh`` (default scale: ``m.scale``), factors split as ``√S``.

    Args:
        m: template for kind, rslora, dtype, kernel shape and DoRA magnitude.
        u: (out, k), s: (k,), vh: (k, in·k) in any float dtype.
        scale: the update's scale; alpha is set so the new module has it at rank k.
    """
    k = int(s.shape[0])
    root = s.clamp_min(0).sqrt()
    B = (u * root).to(m.B.dtype)
    A = (root[:, None] * vh).reshape(k, m.in_features, *m.kernel_size).to(m.A.dtype)
    alpha = alpha_for_scale(m.scale if scale is None else scale, k, m.rslora)
    return replace(m, A=A.contiguous(), B=B.contiguous(), alpha=alpha)


def energies(s: Tensor) -> Tensor:
    """Cumulative share of ``Σσ²`` held by the first 1, 2, … singular values, shape (q,); all ones if ``S = 0``."""
    e = s.double() ** 2
    total = e.sum()
    if total <= 0:
        return torch.ones_like(e)
    return e.cumsum(0) / total


def rank_for_energy(s: Tensor, share: float) -> int:
    """The least k whose first k singular values hold at least ``share`` of ``Σσ²`` (at least 1)."""
    cum = energies(s)
    k = int((cum < share - 1e-12).sum()) + 1
    return max(1, min(k, int(s.shape[0])))


def gram_truncate(As: list[Tensor], Bs: list[Tensor], k: int) -> list[tuple[Tensor, Tensor, Tensor] | None]:
    """Best rank-k factors of ``B·A`` for a batch of equal-shape modules, from r×r Gram matrices (float32 route).

    With ``Ga = A·Aᵀ = La·Laᵀ`` (Cholesky) the rows of ``Qaᵀ = La⁻¹·A`` are orthonormal and ``B·A = (B·La)·Qaᵀ``;
    the eigen-decomposition ``(B·La)ᵀ(B·La) = Laᵀ·(Bᵀ·B)·La = W·Σ²·Wᵀ`` then gives ``B·A = U·Σ·(Qa·W)ᵀ`` with
    ``U = B·La·W·Σ⁻¹``. The top-k part has factors

        B' = B · (La·W_k·Σ_k^{-1/2})        A' = (Σ_k^{1/2}·W_kᵀ·La⁻¹) · A

    so the only passes over the long axes are the two Grams and the two products with r×k transforms. The Grams
    are formed in float32 (the O((out + n)·r²) work); the r×r algebra runs in float64, batched over the modules.

    Args:
        As: per module A: (r, n), all the same shape and dtype.
        Bs: per module B: (out, r).
        k: target rank, ``k < r ≤ min(out, n)``.

    Returns:
        Per module ``(A': (k, n), B': (out, k), σ²: (r,) float64 descending)`` in float32, with
        ``B'·A' ≈ (B·A)_k``; or ``None`` for a module whose A is not numerically of full row rank or whose k-th
        singular value vanishes (the caller should use the exact :func:`factor_svd` route for it).
    """
    a = torch.stack(As).float()  # (m, r, n)
    b = torch.stack(Bs).float()  # (m, out, r)
    ga = (a @ a.mT).double()
    gb = (b.mT @ b).double()
    la, info = torch.linalg.cholesky_ex(ga)  # (m, r, r) lower
    ev, w = torch.linalg.eigh(la.mT @ gb @ la)  # ascending
    ev, w = ev.flip(-1), w.flip(-1)
    s2 = ev.clamp_min(0)
    wk, sk = w[..., :k], s2[..., :k].sqrt()  # (m, r, k), (m, k)
    ok = (info == 0) & (sk[..., -1] > 1e-6 * sk[..., 0])
    sk = torch.where(ok[:, None], sk, torch.ones_like(sk))  # keep the failed modules' transforms finite
    t_b = (la @ wk) * sk.rsqrt()[:, None, :]  # (m, r, k)
    t_a = torch.linalg.solve_triangular(la.mT, wk, upper=True).mT * sk.sqrt()[:, :, None]  # (m, k, r)
    new_b = b @ t_b.float()
    new_a = t_a.float() @ a
    return [(new_a[i], new_b[i], s2[i]) if ok[i] else None for i in range(len(As))]
