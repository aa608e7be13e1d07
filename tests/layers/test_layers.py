"""Each runtime layer against the equation it implements: h = base(x) + s·B(A(x)), merged or not."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.errors import AdapterStateError, LorakitError
from lorakit.layers import LoraConv, LoraEmbedding, LoraLinear, lora_layer_type


def make(kind: str):
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(6, 5), torch.randn(3, 4, 6)
    if kind == "linear_t":
        base = Conv1D(5, 6)
        nn.init.normal_(base.bias)
        return base, torch.randn(3, 4, 6)
    if kind == "conv1d":
        return nn.Conv1d(6, 5, 3, padding=1, stride=2), torch.randn(2, 6, 9)
    if kind == "conv2d":
        return nn.Conv2d(6, 5, 3, padding=1, dilation=1, padding_mode="circular"), torch.randn(2, 6, 7, 7)
    return nn.Embedding(10, 5, padding_idx=0), torch.randint(0, 10, (3, 4))


KINDS = ["linear", "linear_t", "conv1d", "conv2d", "embedding"]


def wrapped(kind, rank=3, alpha=6.0, **kw):
    base, x = make(kind)
    ref = base(x).detach()
    layer = lora_layer_type(base)(base)
    f = layer.new_factors(rank, alpha, generator=torch.Generator().manual_seed(0), **kw)
    layer.add_adapter("a", f)
    return base, layer, f, x, ref


def randomize(f, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        f.A.copy_(torch.randn(f.A.shape, generator=g))
        f.B.copy_(torch.randn(f.B.shape, generator=g) * 0.1)


def reference(base, x, delta):
    """The base layer's own forward with ΔW added to its weight."""
    w0 = base.weight.detach().clone()
    with torch.no_grad():
        base.weight.add_(delta)
        out = base(x)
        base.weight.copy_(w0)
    return out


@pytest.mark.parametrize("kind", KINDS)
def test_zero_init_is_bit_identical_and_keeps_parameter_objects(kind):
    base, layer, f, x, ref = wrapped(kind)
    assert torch.equal(layer(x), ref)
    assert layer.weight is base.weight
    assert layer.kind == kind


@pytest.mark.parametrize("kind", KINDS)
def test_forward_equals_base_with_delta_weight(kind):
    base, layer, f, x, _ = wrapped(kind)
    randomize(f)
    delta = layer.factor_delta(f).detach()
    assert torch.allclose(layer(x), reference(base, x, delta), atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_merge_unmerge_idempotent(kind):
    base, layer, f, x, ref = wrapped(kind)
    randomize(f)
    w0 = layer.weight.detach().clone()
    y = layer(x)
    assert layer.merge() == ["a"]
    assert layer.merge() == []  # merging twice never adds twice
    assert torch.allclose(layer(x), y, atol=1e-5)
    assert layer.unmerge() == ["a"] and layer.unmerge() == []
    assert torch.allclose(layer.weight, w0, atol=1e-6, rtol=0)
    assert torch.allclose(layer(x), y, atol=1e-6)


def test_several_adapters_scales_enable_strength():
    base, layer, f, x, ref = wrapped("linear")
    randomize(f)
    g = layer.new_factors(2, 8.0, rslora=True)
    randomize(g, seed=2)
    layer.add_adapter("b", g)
    assert g.scale == 8.0 / 2 ** 0.5
    both = reference(base, x, (layer.factor_delta(f) + layer.factor_delta(g)).detach())
    assert torch.allclose(layer(x), both, atol=1e-5)
    g.enabled = False
    assert torch.allclose(layer(x), reference(base, x, layer.factor_delta(f).detach()), atol=1e-5)
    g.enabled, f.strength = True, 0.0
    assert torch.allclose(layer(x), reference(base, x, layer.factor_delta(g).detach()), atol=1e-5)
    with pytest.raises(AdapterStateError, match="already"):
        layer.add_adapter("b", g)
    layer.merge(["b"])
    layer.remove_adapter("b")  # removing a merged adapter unmerges it first
    f.strength = 1.0
    assert torch.allclose(layer(x), reference(base, x, layer.factor_delta(f).detach()), atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "linear_t", "conv2d"])
def test_dora_forward_matches_merged_weight(kind):
    base, layer, f, x, ref = wrapped(kind, dora=True)
    assert torch.allclose(layer(x), ref, atol=1e-5)  # magnitude = ‖W‖ at init: unchanged output
    randomize(f)
    with torch.no_grad():
        f.magnitude.mul_(1.3)
    y = layer(x)
    w0 = layer.weight.detach().clone()
    layer.merge()
    assert torch.allclose(layer(x), y, atol=1e-5)
    layer.unmerge()
    assert torch.allclose(layer.weight, w0, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "linear_t", "conv2d"])
def test_pissa_moves_principal_part_into_factors(kind):
    base, x = make(kind)
    ref = base(x).detach()
    w = base.weight.detach().clone()
    layer = lora_layer_type(base)(base)
    f = layer.new_factors(2, 4.0, init="pissa")
    layer.add_adapter("a", f)
    assert torch.allclose(layer(x), ref, atol=1e-5)
    assert torch.allclose(layer.weight + layer.factor_delta(f).detach(), w, atol=1e-5)
    assert not torch.allclose(layer.weight, w)  # the base keeps only the residual


def test_gradients_reach_only_factors():
    base, layer, f, x, _ = wrapped("linear", dropout=0.5)
    base.weight.requires_grad_(False)
    base.bias.requires_grad_(False)
    layer.train()
    layer(x).sum().backward()
    assert f.A.grad is not None and f.B.grad is not None
    assert base.weight.grad is None


def test_bad_options_are_named():
    base, layer, f, x, _ = wrapped("linear")
    with pytest.raises(LorakitError, match="unknown init 'svd'"):
        layer.new_factors(2, 2.0, init="svd")
    with pytest.raises(LorakitError, match="do not fit"):
        layer.add_adapter("z", LoraLinear(nn.Linear(3, 3)).new_factors(2, 2.0))
    with pytest.raises(LorakitError, match="groups=2"):
        LoraConv(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(LorakitError, match="DoRA"):
        LoraEmbedding(nn.Embedding(4, 3)).new_factors(2, 2.0, dora=True)
