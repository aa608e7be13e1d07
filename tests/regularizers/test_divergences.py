"""Sliced Wasserstein, Sinkhorn (GeomLoss) and MMD on small point clouds with fixed seeds."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lorakit.regularizers import (
    RegularizerError,
    mmd,
    random_directions,
    sinkhorn,
    sliced_wasserstein,
)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _cloud(n: int, d: int, seed: int) -> torch.Tensor:
    return torch.randn(n, d, generator=_gen(seed))


def _exact_w2_sq(x: torch.Tensor, y: torch.Tensor) -> float:
    """W₂² between equal uniform clouds: the best assignment (scipy), checked independently of lorakit."""
    from scipy.optimize import linear_sum_assignment

    c = torch.cdist(x.double(), y.double()).pow(2).numpy()
    r, k = linear_sum_assignment(c)
    return float(c[r, k].mean())


# ---- sliced Wasserstein

def test_sw_identical_is_zero_and_grows_with_shift():
    x = _cloud(64, 8, 0)
    assert sliced_wasserstein(x, x.clone(), generator=_gen(1)).item() == pytest.approx(0.0, abs=1e-10)
    values = [sliced_wasserstein(x, x + s, num_projections=256, generator=_gen(1)).item() for s in (0.5, 1.0, 2.0)]
    assert values[0] < values[1] < values[2]


def test_sw_translation_is_norm_squared_over_d_with_all_axes():
    # With directions ±e_i (an orthonormal basis) a translation t gives exactly ‖t‖²/d.
    x, d = _cloud(32, 5, 0), 5
    t = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    got = sliced_wasserstein(x, x + t, directions=torch.eye(d))
    assert got.item() == pytest.approx(t.pow(2).sum().item() / d, rel=1e-5)


def test_sw_expectation_matches_translation_scale():
    x = _cloud(128, 16, 0)
    t = torch.full((16,), 0.5)
    got = sliced_wasserstein(x, x + t, num_projections=4000, generator=_gen(3)).item()
    assert got == pytest.approx(t.pow(2).sum().item() / 16, rel=0.1)


def test_sw_unequal_sizes_via_quantiles():
    x = _cloud(40, 4, 0)
    # Each sample repeated 3 times is the same empirical measure.
    y = x.repeat_interleave(3, dim=0)
    same = sliced_wasserstein(x, y, generator=_gen(1)).item()
    assert same == pytest.approx(0.0, abs=1e-10)
    shifted = sliced_wasserstein(x, _cloud(25, 4, 1) + 2.0, generator=_gen(1)).item()
    assert shifted > 0.5
    assert sliced_wasserstein(x, _cloud(25, 4, 1) + 2.0, generator=_gen(1)).item() == shifted  # seeded


def test_sw_unequal_sizes_is_exact_in_one_dimension():
    # n=4 vs m=6: replicating both to lcm=12 points gives equal-size clouds with the same measures.
    x, y = _cloud(4, 1, 0), _cloud(6, 1, 1) + 0.3
    got = sliced_wasserstein(x, y, directions=torch.ones(1, 1))
    ref = sliced_wasserstein(x.repeat_interleave(3, 0), y.repeat_interleave(2, 0), directions=torch.ones(1, 1))
    assert got.item() == pytest.approx(ref.item(), rel=1e-6)
    assert got.item() == pytest.approx(_exact_w2_sq(x.repeat_interleave(3, 0), y.repeat_interleave(2, 0)), rel=1e-5)


def test_sw_one_dimension_equals_exact_w2():
    x, y = _cloud(20, 1, 0), _cloud(20, 1, 1) * 2 + 1
    got = sliced_wasserstein(x, y, directions=torch.ones(1, 1))
    assert got.item() == pytest.approx(_exact_w2_sq(x, y), rel=1e-5)


def test_sw_gradients_flow_and_descend():
    x = _cloud(64, 6, 0).requires_grad_()
    y = _cloud(64, 6, 1) + 1.0
    opt = torch.optim.Adam([x], lr=0.05)
    gen, first = _gen(2), None
    for _ in range(40):
        loss = sliced_wasserstein(x, y, num_projections=64, generator=gen)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
        opt.step()
    assert loss.item() < 0.3 * first


def test_random_directions_are_unit_and_seeded():
    a = random_directions(7, 50, generator=_gen(5))
    assert a.shape == (7, 50)
    torch.testing.assert_close(a.norm(dim=0), torch.ones(50))
    torch.testing.assert_close(a, random_directions(7, 50, generator=_gen(5)))


def test_sw_rejects_bad_shapes():
    with pytest.raises(RegularizerError, match="feature sizes"):
        sliced_wasserstein(torch.zeros(3, 2), torch.zeros(3, 4))
    with pytest.raises(RegularizerError, match="num_projections"):
        sliced_wasserstein(torch.zeros(3, 2), torch.zeros(3, 2), num_projections=0)


# ---- Sinkhorn through GeomLoss

@pytest.mark.parametrize("n,d,blur", [(12, 3, 0.05), (16, 5, 0.1), (10, 2, 0.02)])
def test_sinkhorn_within_entropic_bias_of_exact_ot(n, d, blur):
    pytest.importorskip("geomloss")
    x, y = _cloud(n, d, 0), _cloud(n, d, 1) + 0.7
    exact = _exact_w2_sq(x, y) / 2  # GeomLoss' cost is ‖x−y‖²/2
    got = sinkhorn(x, y, blur=blur, scaling=0.9).item()
    eps = blur**2
    assert abs(got - exact) <= eps * math.log(n) + 1e-4, (got, exact)


def test_sinkhorn_float32_small_blur_does_not_underflow():
    pytest.importorskip("geomloss")
    x, y = _cloud(32, 4, 0), _cloud(32, 4, 1) + 3.0
    got = sinkhorn(x, y, blur=0.01).item()
    assert math.isfinite(got) and got == pytest.approx(_exact_w2_sq(x, y) / 2, rel=0.02)


def test_sinkhorn_identical_zero_and_gradients():
    pytest.importorskip("geomloss")
    x = _cloud(20, 3, 0)
    assert abs(sinkhorn(x, x.clone()).item()) < 1e-5
    xs = x.clone().requires_grad_()
    sinkhorn(xs, x + 1).backward()
    assert torch.isfinite(xs.grad).all() and xs.grad.abs().sum() > 0


def test_sinkhorn_missing_geomloss_is_a_clear_error(monkeypatch):
    import builtins

    from lorakit.regularizers import divergences

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "geomloss":
            raise ImportError("no geomloss")
        return real_import(name, *args, **kwargs)

    divergences._samples_loss.cache_clear()
    monkeypatch.setattr(builtins, "__import__", fake_import)
    try:
        with pytest.raises(RegularizerError, match="geomloss"):
            sinkhorn(torch.zeros(3, 2), torch.ones(3, 2), blur=0.123)
    finally:
        divergences._samples_loss.cache_clear()


# ---- MMD

@pytest.mark.parametrize("kernel", ["imq", "gaussian", "energy"])
def test_mmd_zero_for_identical_sets_positive_for_shifted(kernel):
    x = _cloud(50, 4, 0)
    same = mmd(x, x.clone(), kernel=kernel).item()
    # The unbiased estimate of identical sets is -2·mean(diag k)/... small; it must be far below the shifted value.
    shifted = mmd(x, _cloud(50, 4, 1) + 1.5, kernel=kernel).item()
    assert shifted > 0
    assert abs(same) < 0.1 * shifted


def test_mmd_same_distribution_near_zero():
    a, b = _cloud(200, 3, 0), _cloud(200, 3, 1)
    assert abs(mmd(a, b).item()) < 0.01
    assert mmd(a, b + 1.0).item() > 0.05


def test_mmd_energy_matches_energy_distance_and_has_finite_grad():
    x, y = _cloud(6, 2, 0).double().requires_grad_(), _cloud(5, 2, 1).double()
    got = mmd(x, y, kernel="energy")
    dxy = torch.cdist(x, y).mean()
    dxx = torch.cdist(x, x).sum() / (6 * 5)
    dyy = torch.cdist(y, y).sum() / (5 * 4)
    assert got.item() == pytest.approx((2 * dxy - dxx - dyy).item(), rel=1e-9)
    got.backward()
    assert torch.isfinite(x.grad).all()


def test_mmd_options_checked():
    with pytest.raises(RegularizerError, match="kernel"):
        mmd(torch.zeros(3, 2), torch.zeros(3, 2), kernel="laplace")
    with pytest.raises(RegularizerError, match="at least 2"):
        mmd(torch.zeros(1, 2), torch.zeros(3, 2))


def test_brute_force_reference_is_sound():
    # The scipy assignment used as reference above agrees with enumerating every permutation.
    x, y = _cloud(5, 2, 0), _cloud(5, 2, 1)
    c = torch.cdist(x.double(), y.double()).pow(2)
    best = min(sum(c[i, p[i]].item() for i in range(5)) / 5 for p in itertools.permutations(range(5)))
    assert _exact_w2_sq(x, y) == pytest.approx(best, rel=1e-12)
