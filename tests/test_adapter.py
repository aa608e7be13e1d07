import pytest
import torch

from lorakit import Adapter, AdapterValidationError, ModuleLora, adapters_equal, lora_scale


def module(kind="linear", r=3, inp=5, out=4, k=(), alpha=6.0, seed=0, **kw) -> ModuleLora:
    g = torch.Generator().manual_seed(seed)
    return ModuleLora(A=torch.randn(r, inp, *k, generator=g), B=torch.randn(out, r, generator=g), alpha=alpha,
                      kind=kind, **kw)


def test_scale_rules():
    assert lora_scale(16, 8) == 2.0
    assert lora_scale(16, 4, rslora=True) == 8.0
    assert module(alpha=6.0, r=3).scale == 2.0


@pytest.mark.parametrize("kind,k,shape", [("linear", (), (4, 5)), ("linear_t", (), (5, 4)),
                                          ("embedding", (), (5, 4)), ("conv1d", (3,), (4, 5, 3)),
                                          ("conv2d", (3, 2), (4, 5, 3, 2))])
def test_delta_layout_per_kind(kind, k, shape):
    m = module(kind, k=k)
    d = m.delta()
    assert tuple(d.shape) == shape == m.weight_shape
    ref = m.scale * (m.B @ m.A.flatten(1))
    assert torch.allclose(d.T if kind in ("linear_t", "embedding") else d.reshape(4, -1), ref)


def test_delta_norm_without_forming_product():
    m = module("conv2d", k=(3, 3), r=4)
    assert m.delta_norm() == pytest.approx(float(m.delta().norm()), rel=1e-6)


def test_dora_delta_needs_base_and_keeps_row_norms():
    m = module(magnitude=torch.rand(4) + 0.5)
    w = torch.randn(4, 5)
    with pytest.raises(AdapterValidationError, match="base weight"):
        m.delta()
    new = w + m.delta(w)
    assert torch.allclose(new.norm(dim=1), m.magnitude, atol=1e-6)


def test_scaled_changes_alpha_only_and_copies():
    a = Adapter({"x": module(), "y": module(seed=1)})
    b = a.scaled(0.5, paths=["y"])
    assert b["y"].alpha == 3.0 and b["x"].alpha == 6.0 and a["y"].alpha == 6.0
    assert b["y"].A is a["y"].A and b["y"].B is a["y"].B  # factors untouched, bit-identical
    with pytest.raises(AdapterValidationError, match="'z'"):
        a.scaled(2.0, paths=["z"])


def test_totals_cast_select():
    a = Adapter({"x": module(r=3), "y": module(r=2, seed=1)}, overrides={"head.bias": torch.zeros(4)})
    assert a.total_rank == 5
    assert a.num_params == (3 * 5 + 4 * 3) + (2 * 5 + 4 * 2) + 4
    assert a.nbytes == 4 * a.num_params
    h = a.cast(torch.float16)
    assert h.dtype == torch.float16 and a.dtype == torch.float32
    assert h.nbytes == a.nbytes // 2
    assert a.select(["y"]).paths == ["y"]


def test_validate_collects_every_problem():
    bad = Adapter({
        "rank_mismatch": ModuleLora(A=torch.zeros(3, 5), B=torch.zeros(4, 2), alpha=1.0),
        "nan": ModuleLora(A=torch.full((2, 5), float("nan")), B=torch.zeros(4, 2), alpha=1.0),
        "ints": ModuleLora(A=torch.zeros(2, 5, dtype=torch.int32), B=torch.zeros(4, 2, dtype=torch.int32), alpha=1.0),
        "conv_2d_A": ModuleLora(A=torch.zeros(2, 5), B=torch.zeros(4, 2), alpha=1.0, kind="conv2d"),
        "kind": ModuleLora(A=torch.zeros(2, 5), B=torch.zeros(4, 2), alpha=1.0, kind="lstm"),
    })
    with pytest.raises(AdapterValidationError) as e:
        bad.validate("f.safetensors")
    msg = str(e.value)
    assert "6 problem(s) in f.safetensors" in msg
    for needle in ["rank_mismatch: rank mismatch", "nan.A: contains NaN", "ints.A: expected a floating dtype",
                   "ints.B: expected a floating dtype",
                   "conv_2d_A.A: expected 4 dims", "kind: unknown layer kind 'lstm'"]:
        assert needle in msg


def test_adapters_equal_is_bitwise():
    a = Adapter({"x": module()})
    b = Adapter({"x": module()})
    assert adapters_equal(a, b)
    nudged = ModuleLora(A=a["x"].A.nextafter(torch.tensor(1e9)), B=a["x"].B, alpha=a["x"].alpha)
    assert not adapters_equal(a, Adapter({"x": nudged}))
    assert not adapters_equal(a, a.scaled(1.0000001))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_all_finite_finds_nan_and_inf(dtype):
    from lorakit.adapter import all_finite

    x = torch.randn(6, 5).to(dtype)
    assert all_finite(x) and all_finite(x[:0])
    for bad in (float("nan"), float("inf"), -float("inf")):
        y = x.clone()
        y[3, 2] = bad
        assert not all_finite(y)
