"""OTConfig validation, the warm-up schedule, normalisation and ``ot_loss`` as a training loop calls it."""

from __future__ import annotations

import pytest
import torch

from lorakit.regularizers import (
    OTConfig,
    RegularizerError,
    ot_loss,
    sliced_wasserstein,
    warmup_weight,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_config_errors_name_every_bad_field_at_once():
    with pytest.raises(RegularizerError) as info:
        OTConfig(tap="", divergence="wasserstein", weight=-1.0, pair="both", warmup_steps=-3, kernel="rbf")
    msg = str(info.value)
    for field in ("ot.tap", "ot.divergence", "ot.weight", "ot.pair", "ot.warmup_steps", "ot.kernel"):
        assert field in msg


def test_deepjdot_needs_domain_pair():
    with pytest.raises(RegularizerError, match="ot.pair"):
        OTConfig(tap="layer3", divergence="deepjdot", pair="prior")


def test_warmup_is_linear_then_flat():
    assert [warmup_weight(2.0, s, 4) for s in (0, 1, 2, 4, 10)] == [0.0, 0.5, 1.0, 2.0, 2.0]
    assert warmup_weight(2.0, 0, 0) == 2.0


def test_zero_weight_during_warmup_costs_nothing():
    cfg = OTConfig(tap="x", divergence="sliced", weight=1.0, warmup_steps=10)
    x = torch.randn(8, 4, requires_grad=True)
    out = ot_loss(cfg, x, torch.randn(8, 4), step=0)
    assert out.item() == 0.0 and out.grad_fn is None


def test_prior_pair_flattens_and_matches_a_standard_normal():
    cfg = OTConfig(tap="enc", divergence="sliced", pair="prior", num_projections=256)
    z_prior = torch.randn(256, 2, 2, 2, generator=_gen(0))
    z_off = z_prior * 3 + 2
    near = ot_loss(cfg, z_prior, None, step=5, generator=_gen(1)).item()
    far = ot_loss(cfg, z_off, None, step=5, generator=_gen(1)).item()
    assert near < 0.05 < far
    with pytest.raises(RegularizerError, match="prior"):
        ot_loss(cfg, z_prior, z_prior, step=0)


def test_domain_pair_needs_target():
    cfg = OTConfig(tap="enc")
    with pytest.raises(RegularizerError, match="target"):
        ot_loss(cfg, torch.randn(4, 3), None, step=0)


def test_normalize_puts_sliced_and_sinkhorn_on_one_scale():
    pytest.importorskip("geomloss")
    d = 8
    x = torch.randn(128, d, generator=_gen(0))
    y = x + torch.full((d,), 1.0)  # a translation: W₂²/d = 1 exactly
    sliced = ot_loss(OTConfig(tap="t", divergence="sliced", num_projections=2000), x, y, 0, generator=_gen(2))
    sink = ot_loss(OTConfig(tap="t", divergence="sinkhorn", blur=0.05), x, y, 0)
    assert sliced.item() == pytest.approx(1.0, rel=0.1)
    assert sink.item() == pytest.approx(1.0, rel=0.1)
    raw = ot_loss(OTConfig(tap="t", divergence="sinkhorn", blur=0.05, normalize=False), x, y, 0)
    assert raw.item() == pytest.approx(d / 2, rel=0.1)


def test_weight_scales_and_mmd_and_deepjdot_run():
    x, y = torch.randn(16, 5, generator=_gen(0)), torch.randn(16, 5, generator=_gen(1)) + 1
    base = ot_loss(OTConfig(tap="t", weight=1.0), x, y, 0, generator=_gen(3))
    twice = ot_loss(OTConfig(tap="t", weight=2.0), x, y, 0, generator=_gen(3))
    assert twice.item() == pytest.approx(2 * base.item(), rel=1e-6)
    assert base.item() == pytest.approx(sliced_wasserstein(x, y, generator=_gen(3)).item(), rel=1e-6)
    assert ot_loss(OTConfig(tap="t", divergence="mmd", kernel="gaussian"), x, y, 0).item() > 0
    cfg = OTConfig(tap="t", divergence="deepjdot", label_weight=0.1)
    with pytest.raises(RegularizerError, match="source_labels"):
        ot_loss(cfg, x, y, 0)
    pytest.importorskip("scipy")
    xs = x.clone().requires_grad_()
    loss = ot_loss(cfg, xs, y, 0, source_labels=torch.randint(0, 3, (16,), generator=_gen(4)),
                   target_logits=torch.randn(16, 3, generator=_gen(5)))
    loss.backward()
    assert loss.item() > 0 and xs.grad.abs().sum() > 0


def test_from_mapping_names_unknown_and_missing_keys():
    cfg = OTConfig.from_mapping({"tap": "layer3", "divergence": "mmd", "weight": 0.5})
    assert cfg.divergence == "mmd" and cfg.weight == 0.5
    with pytest.raises(RegularizerError, match="ot.weigth"):
        OTConfig.from_mapping({"tap": "layer3", "weigth": 1.0})
    with pytest.raises(RegularizerError, match="ot.tap"):
        OTConfig.from_mapping({"divergence": "sliced"})


def test_importing_the_package_loads_no_optional_dependency():
    import subprocess
    import sys

    code = ("import sys, lorakit.regularizers; "
            "print(any(m in sys.modules for m in ('geomloss', 'scipy', 'ot')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
