"""Latent taps: capture the right tensor with its graph, leave no hook behind, name a bad path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.regularizers import RegularizerError, tap


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Sequential(nn.Linear(6, 3), nn.Tanh()), nn.Linear(3, 2))


def _hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_tap_captures_the_submodule_output_with_graph():
    model = _net()
    x = torch.randn(5, 4)
    with tap(model, "2.0") as feats:
        out = model(x)
    assert len(feats) == 1
    torch.testing.assert_close(feats[0], model[2][0](model[1](model[0](x))))
    feats[0].pow(2).sum().backward()
    assert model[0].weight.grad is not None and model[3].weight.grad is None
    assert out.shape == (5, 2)


def test_tap_records_every_call_and_can_detach():
    model = _net()
    with tap(model, "1", detach=True) as feats:
        model(torch.randn(2, 4))
        model(torch.randn(3, 4))
    assert [f.shape[0] for f in feats] == [2, 3]
    assert all(not f.requires_grad for f in feats)


def test_no_hooks_remain_after_exit_or_error():
    model = _net()
    assert _hook_count(model) == 0
    with tap(model, "2"):
        assert _hook_count(model) == 1
    assert _hook_count(model) == 0
    with pytest.raises(ValueError), tap(model, "2"):
        raise ValueError("boom")
    assert _hook_count(model) == 0


def test_unknown_path_is_named():
    with pytest.raises(RegularizerError, match="'2.5'"), tap(_net(), "2.5"):
        pass


def test_tap_sees_through_a_lora_wrapper():
    model = _net()
    lorakit.inject(model, ["all-linear"], rank=2)
    with tap(model, "2.0") as feats:
        model(torch.randn(3, 4))
    assert feats[0].shape == (3, 3) and feats[0].requires_grad
    assert _hook_count(model) == 0


def test_tap_feeds_ot_loss_and_gradients_reach_the_adapter():
    from lorakit.regularizers import OTConfig, ot_loss

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 3))
    lorakit.inject(model, ["all-conv"], rank=2)
    cfg = OTConfig(tap="2", divergence="sliced", pair="domain", num_projections=32)
    with tap(model, cfg.tap) as feats:
        model(torch.randn(8, 3, 6, 6))
        model(torch.randn(8, 3, 6, 6) * 0.5 + 1.0)
    loss = ot_loss(cfg, feats[0], feats[1], step=1, generator=torch.Generator().manual_seed(0))
    loss.backward()
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for p in trainable)
    assert sum(p.grad.abs().sum().item() for p in trainable) > 0
    assert _hook_count(model) == 0
