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
