"""Fréchet distance between two feature clouds: the squared 2-Wasserstein distance of their Gaussian fits.

For N(μ₁, Σ₁) and N(μ₂, Σ₂) (Dowson & Landau 1982; the FID of Heusel et al. 2017 is this on Inception features)

    d² = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^{1/2} Σ₂ Σ₁^{1/2})^{1/2}.

The last trace is computed from eigenvalues only: Σ₁^{1/2} comes from the eigendecomposition of the symmetric
Σ₁, and M = Σ₁^{1/2} Σ₂ Σ₁^{1/2} is symmetric positive semi-definite, so tr M^{1/2} = Σᵢ √λᵢ(M). That avoids the
general (non-symmetric) matrix square root of Σ₁Σ₂ and its complex round-off, and runs in float64 throughout.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lorakit.regularizers.errors import RegularizerError


def _psd_sqrt(cov: Tensor) -> Tensor:
    """Symmetric square root of a symmetric PSD matrix (d, d); tiny negative eigenvalues (round-off) become 0."""
    vals, vecs = torch.linalg.eigh(cov)
    return (vecs * vals.clamp_min(0).sqrt()) @ vecs.T


def gaussian_frechet(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Fréchet (squared W₂) distance between N(mu1, cov1) and N(mu2, cov2).

    Args:
        mu1: (d,) mean.
        cov1: (d, d) symmetric PSD covariance.
        mu2: (d,) mean.
        cov2: (d, d) symmetric PSD covariance.

    Returns:
        The distance, >= 0 up to round-off, as a Python float.
    """
    d = mu1.shape[-1]
    if mu1.shape != (d,) or mu2.shape != (d,) or cov1.shape != (d, d) or cov2.shape != (d, d):
        raise RegularizerError(f"gaussian_frechet: expected means (d,) and covariances (d, d), got "
                               f"{tuple(mu1.shape)}, {tuple(cov1.shape)}, {tuple(mu2.shape)}, {tuple(cov2.shape)}")
    mu1, mu2, cov1, cov2 = (t.detach().double().cpu() for t in (mu1, mu2, cov1, cov2))
    cov1, cov2 = (cov1 + cov1.T) / 2, (cov2 + cov2.T) / 2  # exact symmetry for eigh
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    value = (mu1 - mu2).pow(2).sum() + torch.trace(cov1) + torch.trace(cov2) - 2 * cross
    return float(value)


def mean_and_covariance(x: Tensor) -> tuple[Tensor, Tensor]:
    """(n, d) samples → mean (d,) and unbiased covariance (d, d), in float64."""
    if x.dim() != 2 or x.shape[0] < 2:
        raise RegularizerError(f"mean_and_covariance: expected (n >= 2, d) samples, got {tuple(x.shape)}")
    x = x.detach().double().cpu()
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def frechet_distance(x: Tensor, y: Tensor) -> float:
    """Fréchet distance between the Gaussian fits of two sample sets (the FID formula on any features).

    Args:
        x: (n, d) features of one set (e.g. generated images).
        y: (m, d) features of the other (e.g. real images); ``m`` may differ from ``n``.

    Returns:
        The distance as a Python float; 0 (up to round-off) for identical sets. Like FID it is biased upwards for
        small sets, so compare figures computed with equal set sizes.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise RegularizerError(f"frechet_distance: expected (n, d) and (m, d) features, got {tuple(x.shape)} and "
                               f"{tuple(y.shape)}")
    return gaussian_frechet(*mean_and_covariance(x), *mean_and_covariance(y))
