"""Fréchet distance: zero for identical sets, the closed form for Gaussians, sample estimates near it, errors."""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.regularizers import RegularizerError, frechet_distance, gaussian_frechet, mean_and_covariance


def _random_spd(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


def test_identical_sets_are_at_distance_zero() -> None:
    x = torch.randn(500, 16, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(x, x)) < 1e-8
    assert abs(frechet_distance(x, x[torch.randperm(500)])) < 1e-8  # order does not matter


def test_commuting_covariances_match_the_closed_form() -> None:
    # diagonal covariances commute: d² = ‖μ₁ − μ₂‖² + Σ (σ₁ᵢ − σ₂ᵢ)²
    mu1, mu2 = torch.tensor([0.0, 1.0, -2.0]), torch.tensor([1.0, 1.0, 0.5])
    s1, s2 = torch.tensor([1.0, 2.0, 0.5]), torch.tensor([3.0, 0.5, 0.5])
    expected = float((mu1 - mu2).pow(2).sum() + (s1 - s2).pow(2).sum())
    assert gaussian_frechet(mu1, torch.diag(s1 ** 2), mu2, torch.diag(s2 ** 2)) == pytest.approx(expected, abs=1e-10)


def test_general_covariances_match_the_matrix_square_root_formula() -> None:
    scipy_linalg = pytest.importorskip("scipy.linalg")
    d = 6
    c1, c2 = _random_spd(d, 1), _random_spd(d, 2)  # not commuting
    mu1, mu2 = torch.arange(d, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    cross = scipy_linalg.sqrtm((c1 @ c2).numpy()).real.trace()
    expected = float((mu1 - mu2).pow(2).sum() + c1.trace() + c2.trace()) - 2 * cross
    assert gaussian_frechet(mu1, c1, mu2, c2) == pytest.approx(expected, rel=1e-9)
    assert gaussian_frechet(mu1, c1, mu2, c2) == pytest.approx(gaussian_frechet(mu2, c2, mu1, c1), rel=1e-9)


def test_samples_of_two_gaussians_approach_the_closed_form() -> None:
    g = torch.Generator().manual_seed(3)
    d, n = 4, 200_000
    c1, c2 = _random_spd(d, 4), _random_spd(d, 5)
    mu1, mu2 = torch.full((d,), 0.5, dtype=torch.float64), torch.zeros(d, dtype=torch.float64)
    x = mu1 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(c1).T
    y = mu2 + torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(c2).T
    exact = gaussian_frechet(mu1, c1, mu2, c2)
    assert frechet_distance(x, y) == pytest.approx(exact, rel=0.02)
    mu, cov = mean_and_covariance(x)
    torch.testing.assert_close(cov, c1, rtol=0.05, atol=0.05)


def test_one_dimension_is_the_squared_differences_of_means_and_spreads() -> None:
    value = gaussian_frechet(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-1.0]), torch.tensor([[1.0]]))
    assert value == pytest.approx(4.0 + 1.0)
    assert not math.isnan(value)


def test_bad_shapes_are_named() -> None:
    with pytest.raises(RegularizerError, match="frechet_distance"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(RegularizerError, match="n >= 2"):
        frechet_distance(torch.zeros(1, 3), torch.zeros(5, 3))
    with pytest.raises(RegularizerError, match="gaussian_frechet"):
        gaussian_frechet(torch.zeros(3), torch.eye(2), torch.zeros(3), torch.eye(3))
