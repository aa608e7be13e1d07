"""Injection, extraction, attach, detach and merge on plain torch, transformers and diffusers models."""

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit import AdapterStateError, AttachError, LoraLayer
from tests.conftest import TinyNet, randomize_b


def outputs(model, inputs):
    with torch.no_grad():
        return model(*inputs)


def test_inject_keeps_keys_freezes_and_reports(tiny, tiny_inputs):
    keys = list(tiny.state_dict())
    ref = outputs(tiny, tiny_inputs)
    report = lk.inject(tiny, ["all-linear", "all-conv", "embed"], rank=2, train=["head"], seed=0)
    assert report.modules == ("embed", "conv1", "conv2", "blocks.0.0", "blocks.1.0", "blocks.2.0")
    new_keys = list(tiny.state_dict())
    assert [k for k in new_keys if ".lora." not in k] == keys  # same keys, same order
    trainable = {n for n, p in tiny.named_parameters() if p.requires_grad}
    assert trainable == {n for n in new_keys if ".lora.default." in n} | {"head.weight", "head.bias"}
    assert report.trainable_params == sum(p.numel() for p in tiny.parameters() if p.requires_grad)
    assert torch.equal(outputs(tiny, tiny_inputs), ref)
    assert "trainable" in report.summary()


def test_per_pattern_rank_and_alpha(tiny):
    lk.inject(tiny, ["all-linear"], rank=4, alpha=8, ranks={"blocks.2.0": 2}, alphas={"blocks.1.0": 1.0})
    a = lk.extract(tiny)
    assert [(m.rank, m.alpha) for m in a.modules.values()] == [(4, 8.0), (4, 1.0), (2, 8.0)]


def test_seeded_init_is_reproducible():
    adapters = []
    for _ in range(2):
        torch.manual_seed(0)
        m = TinyNet()
        lk.inject(m, ["all-linear"], seed=7)
        adapters.append(lk.extract(m))
    assert lk.adapters_equal(*adapters)


def test_extract_attach_roundtrip_and_overrides(tiny, tiny_inputs):
    lk.inject(tiny, ["all-linear", "conv2", "embed"], rank=3, alpha=5, train=["head"])
    randomize_b(tiny)
    with torch.no_grad():
        tiny.head.bias.add_(1.0)
    y = outputs(tiny, tiny_inputs)
    adapter = lk.extract(tiny)
    assert set(adapter.overrides) == {"head.weight", "head.bias"}
    torch.manual_seed(0)
    fresh = TinyNet().eval()
    assert lk.attach(fresh, adapter) == adapter.paths
    assert torch.allclose(outputs(fresh, tiny_inputs), y, atol=1e-6)
    assert not any(p.requires_grad for n, p in fresh.named_parameters() if ".lora." in n)


def test_attach_is_strict_and_lists_every_mismatch(tiny):
    lk.inject(tiny, ["all-linear"], rank=2)
    adapter = lk.extract(tiny)
    other = nn.Sequential()
    other.blocks = nn.ModuleList([nn.Linear(6, 6), nn.Linear(6, 7), nn.Conv1d(6, 6, 1)])
    with pytest.raises(AttachError) as e:
        lk.attach(other, adapter)
    msg = str(e.value)
    assert "3 mismatch(es)" in msg
    assert "'blocks.0.0': no such module" in msg
    assert "'blocks.1.0': no such module" in msg
    wrong = lk.Adapter({"blocks.1": adapter["blocks.0.0"], "blocks.2": adapter["blocks.1.0"]},
                       overrides={"nothere": torch.zeros(1), "blocks.0.bias": torch.zeros(3)})
    with pytest.raises(AttachError) as e:
        lk.attach(other, wrong)
    msg = str(e.value)
    assert "'blocks.1': adapter is linear with weight (6, 6), model has linear with weight (7, 6)" in msg
    assert "'blocks.2': adapter is linear with weight (6, 6), model has conv1d" in msg
    assert "override 'nothere'" in msg and "override 'blocks.0.bias': adapter has shape (3,)" in msg
    assert not any(isinstance(m, LoraLayer) for m in other.modules())  # nothing touched


def test_detach_restores_original_objects(tiny, tiny_inputs):
    original = tiny.blocks[0][0]
    ref = outputs(tiny, tiny_inputs)
    lk.inject(tiny, ["all-linear"], name="one")
    lk.inject(tiny, ["blocks.0.0"], name="two", freeze=False)
    randomize_b(tiny, "one")
    lk.merge(tiny, ["one"])
    assert lk.adapter_names(tiny) == ["one", "two"]
    assert lk.detach(tiny, "one") == ["blocks.0.0", "blocks.1.0", "blocks.2.0"]
    assert isinstance(tiny.blocks[0][0], LoraLayer) and not isinstance(tiny.blocks[1][0], LoraLayer)
    lk.detach(tiny)
    assert tiny.blocks[0][0] is original
    assert torch.allclose(outputs(tiny, tiny_inputs), ref, atol=1e-6)
    with pytest.raises(AdapterStateError, match="'one'"):
        lk.detach(tiny, "one")


def test_merge_into_base_gives_plain_model(tiny, tiny_inputs):
    lk.inject(tiny, ["all-linear", "all-conv"], rank=2)
    randomize_b(tiny)
    y = outputs(tiny, tiny_inputs)
    keys = [k for k in tiny.state_dict() if ".lora." not in k]
    lk.merge_into_base(tiny)
    assert not any(isinstance(m, LoraLayer) for m in tiny.modules())
    assert list(tiny.state_dict()) == keys
    assert torch.allclose(outputs(tiny, tiny_inputs), y, atol=1e-5)


def test_strength_enable_disable(tiny, tiny_inputs):
    ref = outputs(tiny, tiny_inputs)
    lk.inject(tiny, ["all-linear"])
    randomize_b(tiny)
    y = outputs(tiny, tiny_inputs)
    with lk.disabled(tiny):
        assert torch.equal(outputs(tiny, tiny_inputs), ref)
    assert torch.equal(outputs(tiny, tiny_inputs), y)
    assert lk.set_strength(tiny, "default", 0.0) == 3
    assert torch.equal(outputs(tiny, tiny_inputs), ref)
    lk.set_strength(tiny, "default", 1.0, paths=["blocks.0.0"])
    lk.set_enabled(tiny, "default", False)
    assert torch.equal(outputs(tiny, tiny_inputs), ref)
    with pytest.raises(AdapterStateError, match="'head'"):
        lk.set_strength(tiny, "default", 1.0, paths=["head"])
    lk.set_enabled(tiny, "default", True)
    lk.merge(tiny)
    with pytest.raises(AdapterStateError, match="merged"):
        lk.set_strength(tiny, "default", 2.0)


def test_duplicate_name_and_unknown_train_pattern(tiny):
    lk.inject(tiny, ["head"])
    with pytest.raises(AdapterStateError, match="already has an adapter named 'default'"):
        lk.inject(tiny, ["all-linear"])
    with pytest.raises(lk.LorakitError, match="'classifier'"):
        lk.inject(tiny, ["all-linear"], name="b", train=["classifier"])


def _check_transformer(model, inputs, targets, expect_kind):
    keys = set(model.state_dict())
    with torch.no_grad():
        ref = model(**inputs).logits
    report = lk.inject(model, targets, rank=4, alpha=8)
    assert keys <= set(model.state_dict())
    assert {m.kind for m in lk.extract(model).modules.values()} == {expect_kind}
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, ref)
    randomize_b(model)
    with torch.no_grad():
        y = model(**inputs).logits
        lk.merge(model)
        assert torch.allclose(model(**inputs).logits, y, atol=1e-5)
    return report


def test_gpt2_from_config_uses_transposed_conv1d():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=50, n_positions=16)).eval()
    report = _check_transformer(model, {"input_ids": torch.randint(0, 50, (2, 8))}, ["all-linear"], "linear_t")
    assert len(report.modules) == 2 * 4  # c_attn, c_proj, c_fc, mlp.c_proj; lm_head skipped


def test_llama_from_config_layers_range():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=60)
    model = LlamaForCausalLM(cfg).eval()
    report = _check_transformer(model, {"input_ids": torch.randint(0, 60, (2, 8))}, ["all-linear"], "linear")
    assert "lm_head" not in report.modules and len(report.modules) == 3 * 7
    fresh = LlamaForCausalLM(cfg)
    r2 = lk.inject(fresh, ["q_proj", "v_proj"], layers="1-2")
    assert r2.modules == ("model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj",
                          "model.layers.2.self_attn.q_proj", "model.layers.2.self_attn.v_proj")


def test_diffusers_unet_from_tiny_config():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=8, norm_num_groups=8).eval()
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 5, 16)
    with torch.no_grad():
        ref = unet(x, t, ctx).sample
    report = lk.inject(unet, ["to_q", "to_k", "to_v", "to_out.0", "all-conv"], rank=4, seed=0)
    assert any(p.endswith("attn2.to_k") for p in report.modules)
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx).sample, ref)
    randomize_b(unet)
    adapter = lk.extract(unet)
    assert {m.kind for m in adapter.modules.values()} == {"linear", "conv2d"}
    with torch.no_grad():
        y = unet(x, t, ctx).sample
        lk.merge(unet)
        assert torch.allclose(unet(x, t, ctx).sample, y, atol=1e-4)


def test_mixed_batch_equals_per_sample_runs(tiny, tiny_inputs):
    lk.inject(tiny, ["all-linear", "all-conv", "embed"], rank=2, name="a", seed=0)
    lk.inject(tiny, ["all-linear", "conv2"], rank=5, alpha=3, name="b", seed=1, dora=True)
    randomize_b(tiny, "a", seed=1)
    randomize_b(tiny, "b", seed=2)
    lk.set_strength(tiny, "a", 0.7)
    ids, img = tiny_inputs
    for order in (["a", "a", "b", None], ["b", None, "a", "b"]):
        with lk.mixed_batch(tiny, order):
            mixed = outputs(tiny, (ids, img))
        for i, name in enumerate(order):
            with lk.disabled(tiny, [n for n in ("a", "b") if n != name]):
                alone = outputs(tiny, (ids[i:i + 1], img[i:i + 1]))
            assert torch.allclose(mixed[i:i + 1], alone, atol=1e-5), (order, i)
    assert all(layer.routing is None for _, layer in lk.lora_layers(tiny))
    with pytest.raises(AdapterStateError, match="\\['zz'\\]"):
        with lk.mixed_batch(tiny, ["zz", None, None, None]):
            pass
    lk.merge(tiny, ["a"])
    with pytest.raises(AdapterStateError, match="merged"):
        with lk.mixed_batch(tiny, ["a", None, None, None]):
            pass
