"""The fused autograd paths give the plain path's outputs and gradients, and step aside where they cannot apply."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from lorakit.layers import fast, lora_layer_type

CASES = {
    "linear": (lambda: nn.Linear(5, 7), (4, 6, 5)),
    "linear_t": (lambda: Conv1D(7, 5), (4, 6, 5)),
    "conv1d": (lambda: nn.Conv1d(5, 7, 3, stride=2, padding=1), (3, 5, 11)),
    "conv2d": (lambda: nn.Conv2d(5, 7, 3, stride=(2, 1), padding=2, dilation=2), (3, 5, 9, 8)),
    "conv2d_same": (lambda: nn.Conv2d(5, 7, (3, 1), padding="same"), (3, 5, 6, 6)),
}


def pair(case: str, dropout: float):
    make, _ = CASES[case]
    layers = []
    for use_fast in (True, False):
        torch.manual_seed(0)
        base = make()
        base.requires_grad_(False)
        layer = lora_layer_type(base)(base)
        f = layer.new_factors(3, 6.0, dropout=dropout, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            f.B.normal_(generator=torch.Generator().manual_seed(2))
        layer.add_adapter("a", f)
        layer.use_fast_path = use_fast
        layers.append(layer.train())
    return layers


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fast_equals_plain_outputs_and_gradients(case, dropout):
    results = []
    for layer in pair(case, dropout):
        x = torch.randn(*CASES[case][1], generator=torch.Generator().manual_seed(3), requires_grad=True)
        torch.manual_seed(42)  # the same dropout masks on both paths
        y = layer(x)
        (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        f = layer.lora["a"]
        results.append((y.detach(), x.grad, f.A.grad, f.B.grad))
    for fast_t, plain_t in zip(*results):
        assert torch.allclose(fast_t, plain_t, atol=1e-5), (fast_t - plain_t).abs().max()


def test_backward_leaves_global_rng_stream_alone():
    layer, _ = pair("linear", 0.5)
    x = torch.randn(3, 5, requires_grad=True)
    torch.manual_seed(7)
    layer(x).sum().backward()
    after = torch.rand(3)
    torch.manual_seed(7)
    layer(x)
    assert torch.equal(torch.rand(3), after)


def test_fallbacks(monkeypatch):
    calls = []
    real = fast.LoraLinearFn.apply
    monkeypatch.setattr(fast.LoraLinearFn, "apply", lambda *a: calls.append(1) or real(*a))
    layer, _ = pair("linear", 0.0)
    x = torch.randn(2, 5)
    layer(x)
    assert len(calls) == 1
    layer.weight.requires_grad_(True)  # full fine-tuning of the base: plain path
    layer(x)
    layer.weight.requires_grad_(False)
    layer.add_adapter("b", layer.new_factors(2, 2.0))  # two active adapters: plain path
    layer(x)
    layer.lora["b"].enabled = False
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: plain path
        layer(x)
    assert len(calls) == 1
    layer(x)
    assert len(calls) == 2


def test_conv_fallback_for_padding_modes(monkeypatch):
    calls = []
    real = fast.LoraConvFn.apply
    monkeypatch.setattr(fast.LoraConvFn, "apply", lambda *a: calls.append(1) or real(*a))
    base = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect").requires_grad_(False)
    layer = lora_layer_type(base)(base)
    layer.add_adapter("a", layer.new_factors(2, 2.0))
    layer(torch.randn(1, 3, 5, 5))
    assert calls == []


@pytest.mark.parametrize("case", ["linear", "linear_t"])
@pytest.mark.parametrize("train", [False, True])
def test_fast_path_without_grad_equals_plain(case, train):
    outs = []
    for layer in pair(case, 0.3):
        layer.train(train)
        x = torch.randn(*CASES[case][1], generator=torch.Generator().manual_seed(3))
        torch.manual_seed(42)
        with torch.no_grad():
            outs.append(layer(x))
    assert torch.allclose(outs[0], outs[1], atol=1e-5)


def _saved_bytes(layer, x) -> tuple[int, list[torch.dtype]]:
    """Bytes of the tensors autograd keeps for backward (storage counted once), and their dtypes."""
    seen: dict[int, int] = {}
    dtypes = []

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        dtypes.append(t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    return sum(seen.values()), dtypes


def test_fast_dropout_keeps_a_bool_mask_instead_of_the_dropped_copy():
    fast_layer, plain_layer = pair("linear", 0.3)
    big_fast = nn.Linear(256, 256).requires_grad_(False)
    x = torch.randn(64, 256, requires_grad=True)
    for layer in (fast_layer, plain_layer):
        layer.weight, layer.bias = big_fast.weight, big_fast.bias
        f = layer.lora["a"]
        f.A = nn.Parameter(torch.randn(3, 256))
        f.B = nn.Parameter(torch.randn(256, 3))
    fast_bytes, fast_dtypes = _saved_bytes(fast_layer, x)
    plain_bytes, _ = _saved_bytes(plain_layer, x)
    assert torch.bool in fast_dtypes
    # plain: x, the dropped float copy (and its mask); fast: x and a one-byte-per-element mask
    assert fast_bytes <= plain_bytes - 3 * x.numel()
