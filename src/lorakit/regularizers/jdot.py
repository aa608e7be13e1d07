"""Exact minibatch optimal transport and the DeepJDOT joint loss (Damodaran et al. 2018, eq. 5).

The coupling is solved exactly on the detached cost (an assignment problem when both batches have the same size,
a small linear program otherwise) and then held fixed, so gradients flow through the cost only: the alternating
scheme of DeepJDOT §3.2, one coupling per minibatch.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lorakit.regularizers.errors import RegularizerError


def _scipy_optimize():
    try:
        from scipy import optimize
    except ImportError as exc:
        raise RegularizerError("divergence 'deepjdot' needs the optional package scipy: "
                               "pip install 'lorakit[ot]'") from exc
    return optimize


def exact_coupling(cost: Tensor) -> Tensor:
    """The optimal transport plan between uniform weights on the rows and the columns of ``cost``.

    For a square cost the optimum is a permutation (Birkhoff–von Neumann), found by
    ``scipy.optimize.linear_sum_assignment``; otherwise the transport LP is solved with HiGHS.

    Args:
        cost: (n, m); read detached, as float64.

    Returns:
        (n, m) plan γ with row sums 1/n and column sums 1/m, on ``cost``'s device and dtype, no gradient.
    """
    if cost.dim() != 2 or cost.shape[0] < 1 or cost.shape[1] < 1:
        raise RegularizerError(f"cost must be a non-empty (n, m) matrix, got shape {tuple(cost.shape)}")
    c = cost.detach().to("cpu", torch.float64).numpy()
    if not np.isfinite(c).all():
        raise RegularizerError("cost matrix holds NaN or inf values; the features or logits diverged")
    optimize = _scipy_optimize()
    n, m = c.shape
    if n == m:
        rows, cols = optimize.linear_sum_assignment(c)
        plan = np.zeros_like(c)
        plan[rows, cols] = 1.0 / n
    else:
        from scipy import sparse

        # Variables γ_ij, row-major; equality constraints: row sums 1/n, column sums 1/m.
        a_rows = sparse.kron(sparse.eye(n), np.ones((1, m)))
        a_cols = sparse.kron(np.ones((1, n)), sparse.eye(m))
        b = np.concatenate([np.full(n, 1.0 / n), np.full(m, 1.0 / m)])
        res = optimize.linprog(c.ravel(), A_eq=sparse.vstack([a_rows, a_cols]).tocsr(), b_eq=b, bounds=(0, None),
                               method="highs")
        if res.status != 0:
            raise RegularizerError(f"exact OT linear program failed: {res.message}")
        plan = res.x.reshape(n, m)
    return torch.as_tensor(plan, dtype=cost.dtype, device=cost.device)


def feature_cost(source: Tensor, target: Tensor) -> Tensor:
    """(n, d), (m, d) → (n, m) squared Euclidean distances."""
    d2 = source.pow(2).sum(1, keepdim=True) + target.pow(2).sum(1).unsqueeze(0) - 2 * source @ target.T
    return d2.clamp_min(0)


def label_cost(source_labels: Tensor, target_logits: Tensor) -> Tensor:
    """(n,) class ids, (m, K) logits → (n, m) cross-entropy of target ``j``'s prediction against source label ``i``."""
    log_p = F.log_softmax(target_logits, dim=1)  # (m, K)
    return -log_p[:, source_labels].T


def deepjdot_loss(source_feats: Tensor, target_feats: Tensor, source_labels: Tensor, target_logits: Tensor,
                  *, label_weight: float = 1.0, feature_weight: float = 1.0) -> Tensor:
    """DeepJDOT's alignment term Σ_ij γ_ij (α‖g(xˢᵢ) − g(xᵗⱼ)‖² + λ_t·CE(yˢᵢ, f(g(xᵗⱼ)))) with γ exact on the batch.

    The source classification loss is not included: the training task adds it.

    Args:
        source_feats: (n, d) source features g(xˢ).
        target_feats: (m, d) target features g(xᵗ).
        source_labels: (n,) int64 source class ids.
        target_logits: (m, K) the classifier's logits on the target batch.
        label_weight: λ_t, the weight of the label cost.
        feature_weight: α, the weight of the feature cost.

    Returns:
        Scalar; with γ summing to 1, the feature part equals the exact W₂² of the batch features at the optimum.
    """
    if source_feats.dim() != 2 or target_feats.dim() != 2 or source_feats.shape[1] != target_feats.shape[1]:
        raise RegularizerError(f"deepjdot: features must be (n, d) and (m, d), got {tuple(source_feats.shape)} "
                               f"and {tuple(target_feats.shape)}")
    if source_labels.shape != (source_feats.shape[0],):
        raise RegularizerError(f"deepjdot: source_labels must be ({source_feats.shape[0]},), got "
                               f"{tuple(source_labels.shape)}")
    if target_logits.dim() != 2 or target_logits.shape[0] != target_feats.shape[0]:
        raise RegularizerError(f"deepjdot: target_logits must be ({target_feats.shape[0]}, K), got "
                               f"{tuple(target_logits.shape)}")
    cost = feature_weight * feature_cost(source_feats, target_feats) + label_weight * label_cost(
        source_labels, target_logits)
    plan = exact_coupling(cost)
    return (plan * cost).sum()
