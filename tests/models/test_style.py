"""The ink-duotone style, and a decoder LoCon on the real TAEF2 that learns it, exports to kohya and switches per level.

The real-weight tests are skipped, with the reason, when the shared data folder is absent (set LORAKIT_DATA).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lorakit as lk
from lorakit.blocks import detect_family
from lorakit.errors import LorakitError
from lorakit.formats import kohya, read_any, write
from lorakit.formats.names import model_paths
from lorakit.formats.safetensors_io import read_safetensors
from lorakit.models.hub import data_root
from lorakit.models.style import (InkDuotone, fit_decoder, images_to_tensor, ink_duotone, inject_decoder_locon,
                                  psnr)
from lorakit.models.taef2 import TAEF2, load_taef2
from lorakit.ops.control import block_strengths, set_block_strengths
from lorakit.train.data import read_cifar10_jpg

ROOT = data_root()
needs = lambda sub: pytest.mark.skipif(not (ROOT / sub).is_dir(),
                                       reason=f"shared data folder {ROOT / sub} is absent (set LORAKIT_DATA)")
LEVELS = ("DEC0", "DEC1", "DEC2", "DEC3")


def _images(n: int = 4, size: int = 32) -> torch.Tensor:
    """Smooth random images with edges: (n, 3, size, size) in [0, 1]."""
    g = torch.Generator().manual_seed(0)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    return torch.nn.functional.interpolate(coarse, size=size, mode="nearest")


def test_style_is_deterministic_in_range_and_two_coloured() -> None:
    x = _images()
    y = ink_duotone(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert torch.equal(y, ink_duotone(x.clone()))  # bit-identical: no randomness, no state
    assert y.min() >= 0 and y.max() <= 1
    # Every output pixel lies on the segment from the ink colour to the paper colour (a duotone).
    s = InkDuotone()
    ink, paper = torch.tensor(s.ink).view(1, 3, 1, 1), torch.tensor(s.paper).view(1, 3, 1, 1)
    t = ((y - ink) / (paper - ink))
    assert torch.allclose(t, t[:, :1].expand_as(t), atol=1e-5)
    assert not torch.allclose(y, x, atol=0.1)


def test_flat_images_posterise_to_the_tone_levels_without_ink() -> None:
    style = InkDuotone(levels=4)
    grey = torch.linspace(0, 1, 11).view(11, 1, 1, 1).expand(11, 3, 8, 8)
    y = ink_duotone(grey, style)
    ink, paper = torch.tensor(style.ink).view(1, 3, 1, 1), torch.tensor(style.paper).view(1, 3, 1, 1)
    tone = ((y - ink) / (paper - ink))[:, 0]
    torch.testing.assert_close(tone, torch.round(tone * 3) / 3, atol=1e-5, rtol=0)  # on the 4-tone staircase
    assert tone[0].max() == 0 and torch.allclose(tone[-1], torch.ones_like(tone[-1]))


def test_style_parameters_are_checked() -> None:
    with pytest.raises(LorakitError, match=r"levels must be at least 2.*low < high"):
        InkDuotone(levels=1, low=0.8, high=0.2)  # every problem named at once
    with pytest.raises(LorakitError, match="no trainable parameters"):
        fit_decoder(TAEF2().requires_grad_(False), torch.zeros(1, 32, 1, 1), torch.zeros(1, 3, 8, 8), steps=1)


def test_psnr_golden_values_and_image_conversion() -> None:
    a = torch.zeros(2, 3, 4, 4)
    assert psnr(a, a + 0.1).tolist() == pytest.approx([20.0, 20.0], abs=1e-4)
    x = images_to_tensor(np.full((2, 4, 4, 3), 255, np.uint8), size=8)
    assert x.shape == (2, 3, 8, 8) and torch.equal(x, torch.ones_like(x))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread for this module: the real-weight convolutions slow down badly on a shared, busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained():
    """A TAEF2 whose decoder LoCon was trained 8 steps on 16 real CIFAR test images at 32 px, with its data."""
    torch.manual_seed(0)
    x = images_to_tensor(read_cifar10_jpg("test", limit=16)[0])
    y = ink_duotone(x)
    model = load_taef2()
    with torch.no_grad():
        z = model.encode(x)
        base = model.decode(z)
    inject_decoder_locon(model, rank=4, seed=0)
    with torch.no_grad():
        start = torch.nn.functional.mse_loss(model.decode(z), y).item()
    losses = fit_decoder(model, z, y, steps=8, lr=3e-3, batch_size=4, seed=0)
    model.eval()
    with torch.no_grad():
        adapted = model.decode(z)
    return {"model": model, "x": x, "y": y, "z": z, "base": base, "adapted": adapted, "start": start,
            "losses": losses}


@needs("pretrained/taef2")
@needs("cifar10-jpg")
def test_a_few_steps_of_decoder_locon_reduce_the_loss_and_leave_the_encoder_alone(trained) -> None:
    model = trained["model"]
    end = torch.nn.functional.mse_loss(trained["adapted"], trained["y"]).item()
    assert end < 0.8 * trained["start"], (trained["start"], end)
    assert psnr(trained["adapted"], trained["y"]).mean() > psnr(trained["base"], trained["y"]).mean() + 1.0
    assert not any(isinstance(m, lk.LoraLayer) for m in model.encoder.modules())
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert all(math.isfinite(v) for v in trained["losses"])


@needs("pretrained/taef2")
@needs("cifar10-jpg")
def test_kohya_export_and_import_reproduce_the_decoded_output(trained, tmp_path) -> None:
    adapter = lk.extract(trained["model"])
    assert detect_family(adapter.paths) == "taef2"
    path = tmp_path / "style.kohya.safetensors"
    write(adapter, path, "kohya", root="unet")
    tensors, _ = read_safetensors(path)
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else k.rsplit(".", 1)[-1] for k in tensors} == {
        "lora_down", "lora_up", "alpha"}
    assert tensors["lora_unet_decoder_3_conv_0.lora_down.weight"].shape == (4, 64, 3, 3)
    assert tensors["lora_unet_decoder_3_conv_0.lora_up.weight"].shape == (64, 4, 1, 1)
    # Read back with lorakit's hints, and as another tool would leave it (no metadata, names undone from the model).
    for loaded in (read_any(path, root="unet"),
                   kohya.from_tensors(tensors, {}, root="unet", known_paths=model_paths(load_taef2()))):
        fresh = load_taef2()
        lk.attach(fresh, loaded)
        with torch.no_grad():
            torch.testing.assert_close(fresh.decode(trained["z"]), trained["adapted"], atol=1e-5, rtol=0)


@needs("pretrained/taef2")
@needs("cifar10-jpg")
def test_per_level_strength_zero_is_the_base_and_levels_switch_independently(trained) -> None:
    model, z = trained["model"], trained["z"]
    try:
        set_block_strengths(model, dict.fromkeys(LEVELS, 0.0))
        assert block_strengths(model) == dict.fromkeys(LEVELS, 0.0)
        with torch.no_grad():
            torch.testing.assert_close(model.decode(z), trained["base"], atol=1e-6, rtol=0)
        set_block_strengths(model, {"DEC0": 1.0, "DEC1": 1.0})  # low-res levels only
        with torch.no_grad():
            low = model.decode(z)
        assert (low - trained["base"]).abs().max() > 1e-3 and (low - trained["adapted"]).abs().max() > 1e-3
    finally:
        set_block_strengths(model, dict.fromkeys(LEVELS, 1.0))
    with torch.no_grad():
        torch.testing.assert_close(model.decode(z), trained["adapted"])
