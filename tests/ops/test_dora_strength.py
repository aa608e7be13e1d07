"""A DoRA strength means the same on data as on a live model: ``W + t·(DoRA(W) − W)``."""

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.errors import LorakitError
from lorakit.ops.control import bake_strengths
from lorakit.ops.merge import merge_state_dict


def _dora_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    lk.inject(model, ["0", "2"], rank=2, dora=True, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            f = layer.lora["default"]
            f.B.copy_(torch.randn(f.B.shape, generator=g) * 0.3)
            f.magnitude.mul_(1.5)
    return model.eval(), base


@pytest.mark.parametrize("t", [0.0, 0.35, 1.0])
def test_merge_state_dict_applies_a_dora_strength_like_the_live_layer(t):
    model, base = _dora_model()
    adapter = lk.extract(model)
    lk.set_strength(model, "default", t)
    x = torch.randn(4, 6)
    live = model(x).detach()
    plain = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    plain.load_state_dict(merge_state_dict(base, adapter, strength=t))
    assert (plain(x) - live).abs().max() < 1e-5


def test_a_dora_block_strength_is_not_baked_into_alpha():
    model, _ = _dora_model()
    m = lk.extract(model)["0"]
    adapter = lk.Adapter({"encoder.layer.0.attention.self.query": m})
    with pytest.raises(LorakitError, match="DoRA"):
        bake_strengths(adapter, {"L00": 0.5}, family="bert")
    assert bake_strengths(adapter, {"L00": 1.0}, family="bert") is adapter
