"""kohya and diffusers interop against real ``diffusers`` loaders, on a tiny SD-1.5-structured UNet."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lorakit.formats import detect, kohya, names

pytest.importorskip("diffusers")

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.0.proj", "conv1", "time_emb_proj"]


@pytest.fixture(scope="module")
def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)
    return model.eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 16, generator=g)


def _run(model, inputs) -> torch.Tensor:
    sample, t, ctx = inputs
    with torch.no_grad():
        return model(sample, t, encoder_hidden_states=ctx).sample


def _lorakit_adapter(unet) -> lk.Adapter:
    model = copy.deepcopy(unet)
    # The alpha that differs sits on a resnet conv: diffusers 0.42 names the network alphas of attention
    # projections after their processor (``…to_v_lora.down.weight.alpha``), which then match none of its
    # alpha_pattern keys, so a per-module alpha on to_q/k/v/out is ignored by diffusers (lorakit reads it).
    lk.inject(model, TARGETS, rank=4, alpha=6.0, ranks={"to_v": 2, "conv1": 3}, alphas={"conv1": 0.5}, seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # stand-in for training: every B non-zero
        for _, layer in lk.lora_layers(model):
            layer.lora["default"].B.copy_(torch.randn(layer.lora["default"].B.shape, generator=g) * 0.3)
    return lk.extract(model)


def test_kohya_file_from_lorakit_loads_in_diffusers(unet, inputs, tmp_path):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as SDLoader

    adapter = _lorakit_adapter(unet)
    assert {m.kind for m in adapter.modules.values()} == {"linear", "conv2d"}
    path = tmp_path / "lora.safetensors"
    detect.write(adapter, path, "kohya", root="unet")
    assert detect.detect(path) == "kohya"

    ours = copy.deepcopy(unet)
    lk.attach(ours, detect.read_any(path))
    expected = _run(ours, inputs)
    assert (expected - _run(unet, inputs)).abs().max() > 1e-2  # the adapter does change the output

    theirs = copy.deepcopy(unet)
    state_dict, alphas = SDLoader.lora_state_dict(str(path))
    SDLoader.load_lora_into_unet(state_dict, alphas, unet=theirs)
    torch.testing.assert_close(_run(theirs, inputs), expected, atol=1e-5, rtol=0)


def test_kohya_names_resolve_against_the_model(unet, tmp_path):
    adapter = _lorakit_adapter(unet)
    tensors, _ = kohya.to_tensors(adapter, root="unet")
    back = kohya.from_tensors(tensors, {"ss_network_alpha": "6"}, root="unet", known_paths=names.model_paths(unet))
    assert list(back.modules) == list(adapter.modules)
    assert back.metadata == {"ss_network_alpha": "6"}


def test_diffusers_file_loads_in_lorakit(unet, inputs, tmp_path):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as SDLoader
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    theirs = copy.deepcopy(unet)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_v", "to_out.0", "conv1"],
                        rank_pattern={"to_v": 2}, alpha_pattern={"to_v": 3}, init_lora_weights="gaussian")
    theirs.add_adapter(config)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    expected = _run(theirs, inputs)
    SDLoader.save_lora_weights(tmp_path / "out", unet_lora_layers=get_peft_model_state_dict(theirs),
                                              unet_lora_adapter_metadata=config.to_dict())
    path = tmp_path / "out" / "pytorch_lora_weights.safetensors"
    assert detect.detect(path) == "diffusers"

    adapter = detect.read_any(path, root="unet")
    v = next(m for p, m in adapter.modules.items() if p.endswith("attn1.to_v"))
    assert (v.rank, v.alpha) == (2, 3.0)
    ours = copy.deepcopy(unet)
    lk.attach(ours, adapter)
    torch.testing.assert_close(_run(ours, inputs), expected, atol=1e-5, rtol=0)

    # and the same adapter written by lorakit as diffusers loads back through diffusers' own loader
    detect.write(adapter, tmp_path / "again.safetensors", "diffusers", root="unet")
    again = copy.deepcopy(unet)
    state_dict, alphas, metadata = SDLoader.lora_state_dict(str(tmp_path / "again.safetensors"),
                                                                           return_lora_metadata=True)
    SDLoader.load_lora_into_unet(state_dict, alphas, unet=again, metadata=metadata)
    torch.testing.assert_close(_run(again, inputs), expected, atol=1e-5, rtol=0)


def test_kohya_file_written_by_diffusers_loads_in_lorakit(unet, inputs, tmp_path):
    """diffusers' own PEFT → kohya converter (which always writes alpha = r, so the config keeps alpha = r)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    theirs = copy.deepcopy(unet)
    theirs.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_out.0", "proj_out", "conv2"],
                                  init_lora_weights="gaussian"))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    expected = _run(theirs, inputs)
    sd = {f"unet.{k}": v for k, v in get_peft_model_state_dict(theirs).items()}
    save_file(convert_state_dict_to_kohya(sd), str(tmp_path / "k.safetensors"))
    assert detect.detect(tmp_path / "k.safetensors") == "kohya"

    ours = copy.deepcopy(unet)
    lk.attach(ours, detect.read_any(tmp_path / "k.safetensors", root="unet", known_paths=names.model_paths(unet)))
    torch.testing.assert_close(_run(ours, inputs), expected, atol=1e-5, rtol=0)


def test_kohya_text_encoder_file_loads_in_diffusers(tmp_path):
    """``lora_te_…`` names for a CLIP text encoder, through diffusers' text-encoder LoRA loader."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin as SDLoader
    from transformers import CLIPTextConfig, CLIPTextModel

    def base():
        torch.manual_seed(0)
        return CLIPTextModel(CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                            num_attention_heads=2, vocab_size=50, max_position_embeddings=16)).eval()

    ids = torch.tensor([[3, 7, 11, 2]])
    model = base()
    lk.inject(model, ["q_proj", "v_proj", "out_proj", "fc1"], rank=3, alpha=7.0, alphas={"fc1": 2.0}, seed=0)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.lora["default"].B.copy_(torch.randn(layer.lora["default"].B.shape, generator=g) * 0.3)
        expected = model(ids).last_hidden_state
    detect.write(lk.extract(model), tmp_path / "te.safetensors", "kohya", root="text_encoder")

    theirs = base()
    state_dict, alphas = SDLoader.lora_state_dict(str(tmp_path / "te.safetensors"))
    assert all(k.startswith("text_encoder.text_model.") for k in state_dict)  # kohya's spelling, as written
    # diffusers 0.42 drops ``text_model.`` from the weights' keys for transformers 5's flattened CLIPTextModel but
    # not from the alphas' keys, so a per-module alpha (fc1's 2.0) would be ignored; a caller strips it too
    alphas = {k.replace("text_encoder.text_model.", "text_encoder.", 1): v for k, v in alphas.items()}
    SDLoader.load_lora_into_text_encoder(state_dict, alphas, text_encoder=theirs, prefix="text_encoder")
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).last_hidden_state, expected, atol=1e-5, rtol=0)
