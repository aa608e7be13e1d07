"""Off the common path: subclassed and hooked bases, dtype on attach, stacked DoRA, strengths, mixed batches,
embedding max_norm, and mutations that must be all-or-nothing."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit.errors import AdapterStateError, LorakitError
from lorakit.layers import LoraLinear
from tests.conftest import TinyNet, randomize_b


class ScaledLinear(nn.Linear):
    """A custom linear with its own forward (as quantized and custom layers have)."""

    def forward(self, x):
        return 2.0 * F.linear(x, self.weight, self.bias) + 1.0


def randomize(model, name="default", seed=0, magnitude=False):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            if name in layer.lora:
                f = layer.lora[name]
                f.A.copy_(torch.randn(f.A.shape, generator=g))
                f.B.copy_(torch.randn(f.B.shape, generator=g) * 0.3)
                if magnitude and f.magnitude is not None:
                    f.magnitude.mul_(1.0 + 0.5 * torch.rand(f.magnitude.shape, generator=g))


def test_a_subclass_keeps_its_own_forward_and_buffers():
    torch.manual_seed(0)
    model = nn.Sequential(ScaledLinear(4, 3))
    model[0].register_buffer("calib", torch.ones(3))
    x = torch.randn(2, 4)
    ref = model(x).detach()
    keys = list(model.state_dict())
    lk.inject(model, ["0"], rank=2, seed=0)
    assert isinstance(model[0], LoraLinear) and model[0].delegates
    assert torch.equal(model(x), ref)  # zero-init adapter: exactly the subclass's output
    assert [k for k in model.state_dict() if ".lora." not in k] == keys
    model.double()
    assert model[0].base_layer.calib.dtype == torch.float64  # the base sees the moved buffer


def test_forward_hooks_on_the_base_keep_firing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    seen = []
    model[0].register_forward_hook(lambda m, i, o: seen.append(o.shape))
    lk.inject(model, ["0"], rank=2, seed=0)
    model(torch.randn(2, 4)).sum().backward()
    assert seen == [torch.Size([2, 3])]
    assert model[0].lora["default"].A.grad is not None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_float32_file_attaches_to_a_half_model(tiny, tiny_inputs, dtype):
    lk.inject(tiny, ["all-linear", "conv1", "embed"], rank=2, seed=0)
    randomize_b(tiny)
    adapter = lk.extract(tiny)
    torch.manual_seed(0)
    half = TinyNet().to(dtype).eval()
    lk.attach(half, adapter)
    f = half.blocks[0][0].lora["default"]
    assert f.A.dtype == f.B.dtype == dtype
    ids, img = tiny_inputs
    with torch.no_grad():
        out = half.blocks[0][0](torch.randn(3, 6).to(dtype))
    assert out.dtype == dtype


def test_seeded_init_does_not_depend_on_the_global_rng(tiny):
    torch.manual_seed(0)
    a = TinyNet()
    torch.manual_seed(0)
    b = TinyNet()
    lk.inject(a, ["all-linear"], seed=3)
    torch.manual_seed(123)
    lk.inject(b, ["all-linear"], seed=3)
    assert lk.adapters_equal(lk.extract(a), lk.extract(b))


def _two_adapters(dora_second=True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4, bias=False))
    lk.inject(model, ["0", "2"], rank=2, name="plain", seed=0)
    lk.inject(model, ["0", "2"], rank=2, name="dora", dora=dora_second, seed=1)
    randomize(model, "plain", 1)
    randomize(model, "dora", 2, magnitude=True)
    return model.eval()


def test_dora_after_another_active_adapter_equals_the_merged_model():
    model = _two_adapters()
    x = torch.randn(7, 6)
    y = model(x).detach()
    lk.merge(model)
    assert (model(x) - y).abs().max() < 1e-5
    lk.unmerge(model)
    assert (model(x) - y).abs().max() < 1e-5


def test_dora_strength_zero_is_off_and_strengths_merge_exactly():
    model = _two_adapters()
    x = torch.randn(7, 6)
    lk.set_enabled(model, "dora", False)
    without = model(x).detach()
    lk.set_enabled(model, "dora", True)
    lk.set_strength(model, "dora", 0.0)
    assert (model(x) - without).abs().max() < 1e-6
    lk.set_strength(model, "dora", 0.4)
    y = model(x).detach()
    w0 = model[0].weight.detach().clone()
    lk.merge(model)
    assert (model(x) - y).abs().max() < 1e-5
    lk.unmerge(model)
    assert (model[0].weight - w0).abs().max() < 1e-6


def test_dora_strength_cannot_be_baked_into_alpha():
    model = _two_adapters()
    lk.set_strength(model, "dora", 0.5)
    with pytest.raises(AdapterStateError, match="DoRA strength"):
        lk.extract(model, "dora", bake_strength=True)


def test_mixed_batch_needs_one_name_per_sample():
    model = _two_adapters(dora_second=False)
    with lk.mixed_batch(model, ["plain", "dora"]), pytest.raises(AdapterStateError, match="batch of 3"):
        model(torch.randn(3, 6))


def test_mixed_batch_with_dora_on_a_bias_free_layer_backpropagates():
    model = _two_adapters()
    for p in model.parameters():
        p.requires_grad_(True)
    x = torch.randn(4, 6)
    with lk.mixed_batch(model, ["dora", "dora", "plain", None]):
        y = model(x)
    y.sum().backward()
    assert model[2].lora["dora"].magnitude.grad is not None
    # Each sample got exactly its own adapter.
    with torch.no_grad(), lk.disabled(model, ["plain"]):
        ref = model(x[:2])
    assert torch.allclose(y[:2].detach(), ref, atol=1e-5)


def test_embedding_lora_never_renormalises_its_factors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0))
    lk.inject(model, ["0"], rank=3, seed=0)
    f = model[0].lora["default"]
    with torch.no_grad():
        f.A.copy_(torch.randn(f.A.shape) * 5)
    before = f.A.detach().clone()
    model(torch.tensor([[1, 2, 3]]))
    assert torch.equal(f.A, before)


def test_inject_validates_every_module_before_changing_any():
    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Conv2d(4, 4, 3, groups=2)

    model = Grouped()
    with pytest.raises(LorakitError, match="grouped"):
        lk.inject(model, ["a", "b"], rank=2)
    assert type(model.a) is nn.Linear and all(p.requires_grad for p in model.parameters())
    with pytest.raises(LorakitError, match="match no module"):
        lk.inject(model, ["a"], rank=2, train=["nothing"])
    assert type(model.a) is nn.Linear and not lk.adapter_names(model)
    with pytest.raises(LorakitError, match="rank"):
        lk.inject(model, ["a"], rank=0)
    assert type(model.a) is nn.Linear


def test_set_strength_is_all_or_nothing():
    model = _two_adapters(dora_second=False)
    model[2].merge(["plain"])
    with pytest.raises(AdapterStateError, match="merged"):
        lk.set_strength(model, "plain", 0.3)
    assert model[0].lora["plain"].strength == 1.0


def test_set_strength_on_an_adapter_that_covers_only_some_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    lk.inject(model, ["0"], rank=2, name="a")
    lk.inject(model, ["1"], rank=2, name="b")
    assert lk.set_strength(model, "a", 0.5) == 1
