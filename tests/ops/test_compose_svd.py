"""compose (identity, exact concatenation, svd, TIES, DARE), resize (Eckart–Young), extract, merge."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorakit as lk
from lorakit import Adapter, ModuleLora, adapters_equal
from lorakit.errors import LorakitError
from lorakit.ops import compose, extract, extract_module, merge_state_dict, module_kinds, resize, save_merged
from tests.ops.strategies import adapters, full_delta, make_module

FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


@FAST
@given(adapter=adapters())
def test_compose_one_adapter_with_weight_one_is_identity(adapter):
    for method in ("concat", "ties", "dare"):
        out, report = compose([adapter], [1.0], method=method)
        assert adapters_equal(out, adapter)
        assert all(v == 1.0 for v in report.retained_energy.values())


@FAST
@given(a=adapters(with_overrides=False), b=adapters(with_overrides=False),
       wa=st.sampled_from([1.0, 0.5, -0.7, 2.0]), wb=st.sampled_from([1.0, 0.3, 1.5]))
def test_concat_is_exact_weighted_sum_of_deltas(a, b, wa, wb):
    out, _ = compose([a, b], [wa, wb])
    for path, m in out.modules.items():
        want = sum(w * full_delta(x[path]) for x, w in ((a, wa), (b, wb)) if path in x.modules)
        assert _rel(full_delta(m), want) < 1e-6
    for path in set(a.paths) ^ set(b.paths):  # a module of one adapter keeps its factors bit for bit
        src = a if path in a.modules else b
        assert torch.equal(out[path].A, src[path].A) and torch.equal(out[path].B, src[path].B)


def test_concat_with_equal_scales_only_changes_alpha():
    g = torch.Generator().manual_seed(0)
    m = make_module(g, "linear", 5, 4, (), 3, 6.0, False)
    out, _ = compose([Adapter({"x": m}), Adapter({"x": m})], [0.5, 0.5])
    assert torch.equal(out["x"].A[:3], m.A) and torch.equal(out["x"].A[3:], m.A)
    assert _rel(full_delta(out["x"]), full_delta(m)) < 1e-6


def test_svd_recompression_reports_retained_energy():
    g = torch.Generator().manual_seed(1)
    a = Adapter({"x": make_module(g, "linear", 12, 10, (), 4, 4.0, False)})
    b = Adapter({"x": make_module(g, "linear", 12, 10, (), 4, 2.0, False)})
    exact, _ = compose([a, b])
    out, report = compose([a, b], method="svd", rank=3)
    assert out["x"].rank == 3 and 0 < report.retained_energy["x"] < 1
    d, dk = full_delta(exact["x"]), full_delta(out["x"])
    s = torch.linalg.svdvals(d)
    assert float((d - dk).norm()) == pytest.approx(float((s[3:] ** 2).sum().sqrt()), rel=1e-5)
    assert report.retained_energy["x"] == pytest.approx(float((s[:3] ** 2).sum() / (s ** 2).sum()), rel=1e-5)


@pytest.mark.parametrize("method", ["ties", "dare"])
def test_ties_and_dare_give_low_rank_modules(method):
    g = torch.Generator().manual_seed(2)
    a = Adapter({"x": make_module(g, "linear", 12, 10, (), 3, 3.0, False)})
    b = Adapter({"x": make_module(g, "linear", 12, 10, (), 3, 3.0, False)})
    out, report = compose([a, b], method=method, density=1.0, rank=6)
    assert out["x"].rank == 6 and 0 < report.retained_energy["x"] <= 1
    if method == "dare":  # density 1 keeps everything: the plain sum of two rank-3 updates, kept exactly
        assert report.retained_energy["x"] == pytest.approx(1.0, abs=1e-6)
        assert _rel(full_delta(out["x"]), full_delta(a["x"]) + full_delta(b["x"])) < 1e-5
    else:  # TIES of an update with itself: every sign agrees, the disjoint mean is the update itself
        same, _ = compose([a, a], method="ties", density=1.0, rank=3)
        assert _rel(full_delta(same["x"]), full_delta(a["x"])) < 1e-5
        sparse, _ = compose([a, b], method="ties", density=0.2, rank=6)
        assert sparse["x"].rank == 6
    with pytest.raises(LorakitError):
        compose([a, b], method=method, density=0.0)


def test_compose_refuses_conflicts():
    g = torch.Generator().manual_seed(3)
    a = Adapter({"x": make_module(g, "linear", 4, 4, (), 2, 2.0, False)}, {"h.weight": torch.zeros(2)})
    b = Adapter({"x": make_module(g, "linear", 5, 4, (), 2, 2.0, False)}, {"h.weight": torch.ones(2)})
    with pytest.raises(LorakitError, match="cannot concatenate"):
        compose([a, b])
    with pytest.raises(LorakitError, match="differs"):
        compose([a, Adapter({}, {"h.weight": torch.ones(2)})])
    with pytest.raises(LorakitError, match="unknown compose method"):
        compose([a], method="sum")


@FAST
@given(adapter=adapters(with_overrides=False), k=st.integers(1, 4))
def test_resize_error_is_the_eckart_young_optimum(adapter, k):
    out, report = resize(adapter, rank=k)
    for path, m in adapter.modules.items():
        d = full_delta(m)
        s = torch.linalg.svdvals(d.flatten(1) if m.kind not in ("linear_t", "embedding") else d)
        optimal = float((s[k:] ** 2).sum().sqrt())
        err = float((full_delta(out[path]) - d).norm())
        assert out[path].rank == min(k, m.rank, *m.B.shape[:1], m.A.flatten(1).shape[1])
        assert err == pytest.approx(optimal, rel=1e-5, abs=1e-6 * float(d.norm()))
        assert report.error[path] == pytest.approx(optimal, rel=1e-5, abs=1e-6 * float(d.norm()))
        assert out[path].scale == pytest.approx(m.scale)


def test_dynamic_resize_rules():
    g = torch.Generator().manual_seed(4)
    u, _ = torch.linalg.qr(torch.randn(10, 4, generator=g))
    v, _ = torch.linalg.qr(torch.randn(12, 4, generator=g))
    s = torch.tensor([8.0, 4.0, 1.0, 0.5])
    m = ModuleLora(A=(s[:, None] * v.T).float(), B=u.float(), alpha=4.0)  # scale 1, σ = s
    a = Adapter({"x": m})
    assert resize(a, sv_ratio=5)[0]["x"].rank == 2  # keep σ ≥ 8/5
    assert resize(a, fro=0.99)[0]["x"].rank == 2  # √(80/81.25) = 0.992
    assert resize(a, fro=0.995)[0]["x"].rank == 3  # √(81/81.25) = 0.998
    assert resize(a, cumulative=0.8)[0]["x"].rank == 2  # (8+4)/13.5 ≥ 0.8
    assert resize(a, sv_ratio=100, max_rank=3)[0]["x"].rank == 3
    with pytest.raises(LorakitError):
        resize(a, rank=2, fro=0.9)


def test_extract_recovers_a_known_low_rank_delta(tiny):
    base = {k: v.clone() for k, v in tiny.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    true = {
        "blocks.0.0": ModuleLora(torch.randn(2, 6, generator=g), torch.randn(6, 2, generator=g), 2.0),
        "conv2": ModuleLora(torch.randn(2, 3, 3, 3, generator=g), torch.randn(5, 2, generator=g), 4.0,
                            kind="conv2d"),
        "embed": ModuleLora(torch.randn(1, 20, generator=g), torch.randn(8, 1, generator=g), 1.0,
                            kind="embedding"),
    }
    tuned = merge_state_dict(base, Adapter(true))
    got, kept = extract(base, tuned, module_kinds(tiny), energy=0.999999, max_rank=6)
    assert sorted(got.paths) == sorted(true)
    for path, m in true.items():
        assert got[path].rank == m.rank and kept[path] == pytest.approx(1.0, abs=1e-6)
        assert _rel(full_delta(got[path]), full_delta(m)) < 1e-5
    fixed, _ = extract(base, tuned, module_kinds(tiny), rank=1)
    assert all(m.rank == 1 for m in fixed.modules.values())
    with pytest.raises(LorakitError, match="no weight differs"):
        extract(base, base, module_kinds(tiny), rank=2)
    with pytest.raises(LorakitError):
        extract_module(torch.zeros(3, 3), torch.zeros(3, 4), "linear", rank=1)


def test_merge_state_dict_matches_merge_into_base(tiny, tiny_inputs, tmp_path):
    from tests.conftest import randomize_b

    base = {k: v.clone() for k, v in tiny.state_dict().items()}
    lk.inject(tiny, "all-linear", rank=3, alpha=5, seed=0)
    lk.inject(tiny, ["conv2", "embed"], rank=2, alpha=3, seed=1, name="b")
    randomize_b(tiny)
    adapter = lk.extract(tiny, include_trained=False)
    snapshot = {k: v.clone() for k, v in base.items()}
    merged = merge_state_dict(base, adapter)
    assert set(merged) == set(base) and merged is not base
    assert all(torch.equal(base[k], snapshot[k]) for k in base)  # the input state dict is untouched
    lk.detach(tiny, "b")
    lk.merge_into_base(tiny)
    for k, v in tiny.state_dict().items():
        assert torch.allclose(merged[k], v, atol=1e-6), k
    save_merged(base, adapter, tmp_path / "m.safetensors")
    from safetensors.torch import load_file

    assert torch.equal(load_file(tmp_path / "m.safetensors")["head.weight"], merged["head.weight"])
    with pytest.raises(LorakitError, match="not in the base"):
        merge_state_dict({}, adapter)
