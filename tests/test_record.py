"""The injection record: extract, trained tensors, PiSSA export and detach read what inject/attach recorded."""

import json

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.errors import LorakitError
from lorakit.inject import INJECTION_KEY, trained_tensors
from lorakit.record import get_record
from tests.conftest import TinyNet, randomize_b


def outputs(model, inputs):
    with torch.no_grad():
        return model(*inputs)


class DenseEncoder(nn.Module):
    """An encoder layer and RoBERTa's classification head: ``classifier.dense`` then ``classifier.out_proj``."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Sequential()
        self.encoder.add_module("dense", nn.Linear(6, 6))
        self.classifier = nn.Module()
        self.classifier.dense = nn.Linear(6, 6)
        self.classifier.out_proj = nn.Linear(6, 2)

    def forward(self, x):
        h = torch.tanh(self.encoder(x))
        return self.classifier.out_proj(torch.tanh(self.classifier.dense(h)))


def test_extract_after_attach_on_a_freshly_loaded_model_exports_only_the_adapter(tiny, tiny_inputs):
    lk.inject(tiny, ["all-linear"], rank=2, seed=0)
    randomize_b(tiny)
    adapter = lk.extract(tiny)
    torch.manual_seed(0)
    fresh = TinyNet()  # as HF models load: every parameter requires grad
    assert all(p.requires_grad for p in fresh.parameters())
    lk.attach(fresh, adapter)
    again = lk.extract(fresh)
    assert again.num_params == adapter.num_params == sum(m.numel for m in adapter.modules.values())
    assert dict(again.overrides) == {}
    assert lk.adapters_equal(lk.Adapter(again.modules), lk.Adapter(adapter.modules))


def test_attached_overrides_are_exported_again(tiny, tiny_inputs):
    lk.inject(tiny, ["blocks.0.0"], rank=2, train=["head"], seed=0)
    randomize_b(tiny)
    with torch.no_grad():
        tiny.head.bias.add_(1.0)
    adapter = lk.extract(tiny)
    torch.manual_seed(0)
    fresh = TinyNet()
    lk.attach(fresh, adapter)
    again = lk.extract(fresh)
    assert set(again.overrides) == {"head.weight", "head.bias"}
    assert torch.equal(again.overrides["head.bias"], adapter.overrides["head.bias"])


def test_wrapped_module_inside_a_trained_head_is_exported_whole():
    torch.manual_seed(0)
    model = DenseEncoder()
    report = lk.inject(model, ["dense"], rank=2, train=["classifier"], seed=0)
    assert report.modules == ("encoder.dense", "classifier.dense")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.dense.weight", "classifier.dense.bias", "classifier.out_proj.weight"} <= trainable
    randomize_b(model)
    with torch.no_grad():
        model.classifier.dense.weight.add_(0.5)  # a "trained" head weight
        model.classifier.out_proj.bias.add_(1.0)
    x = torch.randn(3, 6)
    y = model(x).detach()
    adapter = lk.extract(model)
    assert set(adapter.overrides) == {"classifier.dense.weight", "classifier.dense.bias",
                                      "classifier.out_proj.weight", "classifier.out_proj.bias"}
    torch.manual_seed(0)
    fresh = DenseEncoder()
    lk.attach(fresh, adapter)
    assert torch.allclose(fresh(x), y, atol=1e-6)


def test_trained_tensors_include_buffers_and_follow_the_record_not_requires_grad():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    lk.inject(model, ["0"], rank=2, train=["1"], seed=0)
    keys = set(trained_tensors(model))
    assert keys == {"1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked"}
    model.requires_grad_(True)  # says nothing about what was trained
    assert set(trained_tensors(model)) == keys
    assert set(lk.extract(model).overrides) == keys


def test_pissa_export_attaches_to_the_original_base():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    original = {k: v.clone() for k, v in model.state_dict().items()}
    lk.inject(model, ["0", "2"], rank=2, alpha=4, init="pissa", seed=0)
    randomize_b(model)  # training moves the factors
    x = torch.randn(5, 8)
    y = model(x).detach()
    adapter = lk.extract(model)
    assert [m.rank for m in adapter.modules.values()] == [4, 4]
    fresh = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    fresh.load_state_dict(original)
    lk.attach(fresh, adapter)
    assert (fresh(x) - y).abs().max() < 1e-5
    # Detaching gives the principal part back: the base is the original again.
    lk.detach(model)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, original[k], atol=1e-6), k


def test_pissa_refuses_a_module_that_trains_fully():
    model = DenseEncoder()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LorakitError, match="PiSSA"):
        lk.inject(model, ["dense"], init="pissa", train=["classifier"])
    assert not list(lk.lora_layers(model))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_record_lists_wrapped_types_init_and_order_and_goes_into_the_header(tiny):
    lk.inject(tiny, ["blocks.0.0", "conv1"], rank=2, name="a", seed=0)
    lk.inject(tiny, ["blocks.0.0"], rank=2, name="b", init="gaussian", seed=1, train=["head"])
    rec = get_record(tiny)
    assert rec.wrapped["blocks.0.0"].base_type == "torch.nn.modules.linear.Linear"
    assert rec.wrapped["conv1"].kind == "conv1d" and not rec.wrapped["conv1"].delegates
    assert list(rec.adapters) == ["a", "b"] and rec.adapters["b"].init == "gaussian"
    assert rec.trained == {"a": (), "b": ("head",)}
    header = json.loads(lk.extract(tiny, "b").metadata[INJECTION_KEY])
    assert header["wrapped"] == {"blocks.0.0": "torch.nn.modules.linear.Linear"}
    assert header["trained"] == ["head"] and header["order"] == ["a", "b"]
    lk.detach(tiny, "a")
    assert "conv1" not in get_record(tiny).wrapped and list(get_record(tiny).adapters) == ["b"]
