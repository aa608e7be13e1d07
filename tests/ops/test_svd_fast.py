"""The fast SVD routes: the batched float32 Gram resize and the batched randomized extract, against the exact ones."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from lorakit import Adapter, ModuleLora
from lorakit.ops import extract, extract_module, resize
from lorakit.ops import svd as ops_svd
from lorakit.ops.lowrank import factor_svd


def _decaying(out_f: int, n: int, r: int, seed: int, kernel: tuple[int, ...] = ()) -> ModuleLora:
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(r, n, generator=g) * torch.logspace(0, -2, r)[:, None]
    B = torch.randn(out_f, r, generator=g)
    kind = "conv2d" if kernel else "linear"
    A = A.view(r, n // max(1, torch.Size(kernel).numel()), *kernel)
    return ModuleLora(A=A, B=B, alpha=float(r) / 2, kind=kind)


def _optimal(m: ModuleLora, k: int) -> float:
    _, s, _ = factor_svd(m)
    return abs(m.scale) * float(s[k:].pow(2).sum().sqrt())


def test_gram_resize_matches_the_eckart_young_optimum_and_the_qr_route():
    adapter = Adapter({"a": _decaying(512, 256, 32, 0), "b": _decaying(512, 256, 32, 1),
                       "c": _decaying(256, 72 * 9, 24, 2, kernel=(3, 3))})
    assert all(ops_svd._gram_eligible(m, 8) for m in adapter.modules.values())
    out, report = resize(adapter, rank=8)
    for path, m in adapter.modules.items():
        opt = _optimal(m, 8)
        err = float((out[path].delta().double() - m.delta().double()).norm())
        assert err == pytest.approx(opt, rel=1e-4)
        assert report.error[path] == pytest.approx(opt, rel=1e-4)
        assert out[path].rank == 8 and out[path].scale == pytest.approx(m.scale)
        assert out[path].A.shape == (8, *m.A.shape[1:])
        exact, share, _ = ops_svd.resize_module(m, rank=8)  # the float64 QR route
        assert float((out[path].delta() - exact.delta()).norm() / exact.delta().norm()) < 1e-4
        assert report.retained_energy[path] == pytest.approx(share, rel=1e-5)


def test_gram_resize_batched_equals_one_module_at_a_time():
    mods = {f"m{i}": _decaying(512, 256, 32, i) for i in range(3)}
    together, _ = resize(Adapter(mods), rank=4)
    for path, m in mods.items():
        alone, _ = resize(Adapter({path: m}), rank=4)
        assert torch.allclose(together[path].delta(), alone[path].delta(), atol=1e-5 * float(m.delta().norm()))


def test_gram_resize_falls_back_when_a_is_rank_deficient():
    m = _decaying(512, 256, 32, 0)
    A = m.A.clone()
    A[1] = A[0]  # two equal rows: A·Aᵀ is singular, Cholesky fails, the QR route takes over
    m = ModuleLora(A=A, B=m.B, alpha=m.alpha, kind="linear")
    out, report = resize(Adapter({"x": m}), rank=8)
    opt = _optimal(m, 8)
    assert float((out["x"].delta().double() - m.delta().double()).norm()) == pytest.approx(opt, rel=1e-5)
    assert report.error["x"] == pytest.approx(opt, rel=1e-5)


def test_randomized_extract_is_near_optimal_and_batched_equals_single():
    g = torch.Generator().manual_seed(0)
    delta = _decaying(768, 192, 48, 3).delta()
    base = {f"m{i}.weight": torch.randn(768, 192, generator=g) for i in range(3)}
    tuned = {k: v + delta * (1 + i) for i, (k, v) in enumerate(base.items())}
    kinds = {f"m{i}": "linear" for i in range(3)}
    got, kept = extract(base, tuned, kinds, rank=12)
    s = torch.linalg.svdvals(delta.double())
    for i, path in enumerate(kinds):
        want = delta.double() * (1 + i)
        opt = float(s[12:].pow(2).sum().sqrt()) * (1 + i)
        err = float((got[path].delta().double() - want).norm())
        assert err <= 1.01 * opt
        assert kept[path] == pytest.approx(1 - (opt / float(want.norm())) ** 2, abs=1e-3)
        single, _ = extract_module(base[f"{path}.weight"], tuned[f"{path}.weight"], "linear", rank=12)
        assert torch.allclose(single.delta(), got[path].delta(), atol=1e-5 * float(want.norm()))


def test_randomized_extract_leaves_the_global_rng_alone():
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    extract_module(torch.zeros(40, 30), torch.randn(40, 30, generator=torch.Generator().manual_seed(0)),
                   "linear", rank=3)
    assert torch.equal(torch.rand(3), expected)


def _pinned(out_f: int, n: int, s: list[float], seed: int) -> Tensor:
    """A (out_f, n) matrix whose singular values are exactly ``s`` (random orthonormal singular vectors)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(out_f, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (u * torch.tensor(s, dtype=torch.float64)) @ v.T


def test_extract_energy_counts_the_true_total_not_the_sketch():
    # σ² = 100, 36, 9 and a tail of 40 ones: ‖ΔW‖² = 185. A 75% share needs 3 directions (136/185 = 0.735 <
    # 0.75 ≤ 145/185 = 0.784). A sketch of width 10 + 16 holds only ≈ 168 of the 185, so normalising by the
    # sketch (the old rule) stops at 2 directions (136/168 = 0.81) and keeps less than the share asked for.
    delta = _pinned(60, 50, [10.0, 6.0, 3.0] + [1.0] * 40, seed=7).float()
    m, kept = extract_module(torch.zeros(60, 50), delta, "linear", energy=0.75, max_rank=10)
    assert m.rank == 3
    assert kept == pytest.approx(145 / 185, abs=1e-4) and kept >= 0.75
    base = {"x.weight": torch.zeros(60, 50)}
    got, shares = extract(base, {"x.weight": delta}, {"x": "linear"}, energy=0.75, max_rank=10)
    assert got["x"].rank == 3 and shares["x"] == pytest.approx(145 / 185, abs=1e-4)


def test_extract_energy_computes_more_singular_values_when_the_sketch_falls_short():
    # A flat spectrum and a sketch with no oversampling and no power iteration: its 6 directions hold about 12%
    # of ‖ΔW‖² = 6·4 + 30·1 = 54, where the true top 5 hold 20/54 = 37%, so the sketch alone cannot reach 35%.
    s = [2.0] * 6 + [1.0] * 30
    delta = _pinned(48, 40, s, seed=8).float()
    m, kept = extract_module(torch.zeros(48, 40), delta, "linear", energy=0.35, max_rank=6, oversample=0, niter=0)
    total = sum(x * x for x in s)
    assert m.rank == 5  # 4·4/54 = 0.296 < 0.35 ≤ 5·4/54 = 0.370: the smallest rank that holds the share
    assert kept == pytest.approx(20 / total, abs=1e-4) and kept >= 0.35
    assert float((m.delta() - delta).norm() ** 2) == pytest.approx(total * (1 - kept), rel=1e-4)


def test_extract_energy_beyond_max_rank_keeps_max_rank_and_reports_the_shortfall(monkeypatch):
    delta = _pinned(40, 30, [1.0] * 20, seed=9).float()
    shapes = []
    svd = torch.linalg.svd
    monkeypatch.setattr(torch.linalg, "svd", lambda x, **kw: shapes.append(tuple(x.shape)) or svd(x, **kw))
    m, kept = extract_module(torch.zeros(40, 30), delta, "linear", energy=0.9, max_rank=4)
    assert m.rank == 4 and kept == pytest.approx(4 / 20, abs=1e-4)
    # The sketch's residual proves 4 directions cannot hold 90% (Ky Fan): no full SVD of ΔW was run.
    assert (40, 30) not in shapes and shapes


@pytest.mark.parametrize("energy", [0.0, -0.1, 1.5, float("nan")])
def test_extract_energy_out_of_range_names_the_option(energy):
    from lorakit.errors import LorakitError

    with pytest.raises(LorakitError, match="energy"):
        extract_module(torch.zeros(4, 3), torch.ones(4, 3), "linear", energy=energy)


def test_extract_energy_of_a_zero_difference_is_one_zero_direction():
    m, kept = extract_module(torch.ones(6, 5), torch.ones(6, 5), "linear", energy=0.9, max_rank=4)
    assert m.rank == 1 and kept == 1.0 and float(m.delta().abs().max()) == 0.0
