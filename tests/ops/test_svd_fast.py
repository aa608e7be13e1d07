"""The fast SVD routes: the batched float32 Gram resize and the batched randomized extract, against the exact ones."""

from __future__ import annotations

import pytest
import torch

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
