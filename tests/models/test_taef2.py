"""TAEF2: the definition loads the shipped weights strictly and reconstructs real CIFAR images well."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.errors import FileFormatError
from lorakit.models.hub import data_root
from lorakit.models.taef2 import TAEF2, load_taef2, taef2_weights_dir
from lorakit.train.data import read_cifar10_jpg

needs_weights = pytest.mark.skipif(not (taef2_weights_dir() / "taef2_encoder.pth").is_file(),
                                   reason=f"TAEF2 weights not found under {taef2_weights_dir()} (set LORAKIT_DATA)")
CIFAR_TEST = data_root() / "cifar10-jpg" / "cifar10-test-jpg.tar.gz"


def _cifar_128(n: int) -> torch.Tensor:
    """The first ``n`` CIFAR-10 test JPEGs, bilinearly upsampled to 128×128: (n, 3, 128, 128) in [0, 1]."""
    images, _ = read_cifar10_jpg("test", limit=n)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    return F.interpolate(x, size=128, mode="bilinear", align_corners=False).clamp(0, 1)


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over images of 10·log10(1 / MSE), images in [0, 1]."""
    mse = (a - b).pow(2).mean((1, 2, 3))
    return (10 * torch.log10(1 / mse)).mean().item()


def test_shapes_without_weights():
    model = TAEF2()
    z = model.encode(torch.rand(1, 3, 32, 48))
    assert z.shape == (1, 32, 4, 6)
    assert model.decode(z).shape == (1, 3, 32, 48)
    assert sum(p.numel() for p in model.encoder.parameters()) == 1_338_528
    assert sum(p.numel() for p in model.decoder.parameters()) == 1_338_499


@needs_weights
def test_loads_strict_with_the_upstream_key_layout():
    model = load_taef2()
    n_enc = sum(p.numel() for p in model.encoder.parameters())
    n_dec = sum(p.numel() for p in model.decoder.parameters())
    assert 1.3e6 < n_enc < 1.4e6 and 1.3e6 < n_dec < 1.4e6  # README: 1.34M each
    enc = torch.load(taef2_weights_dir() / "taef2_encoder.pth", weights_only=True)
    assert set(model.encoder.state_dict()) == set(enc)
    assert not model.training


@needs_weights
@pytest.mark.skipif(not CIFAR_TEST.is_file(), reason=f"CIFAR-10 test JPEGs not found at {CIFAR_TEST}")
def test_reconstructs_cifar_well_and_noise_badly():
    torch.manual_seed(0)
    model = load_taef2()
    x = _cifar_128(4)
    noise = torch.rand(1, 3, 128, 128)
    with torch.no_grad():
        rec = model(x).clamp(0, 1)
        rec_noise = model(noise).clamp(0, 1)
    # Measured 37.7 dB on these 4 images (README: ~35.8 dB with the upstream code), 9.8 dB for uniform noise.
    assert _psnr(x, rec) > 34.0
    assert _psnr(noise, rec_noise) < 12.0


def test_missing_folder_is_a_file_format_error(tmp_path):
    with pytest.raises(FileFormatError, match="taef2_encoder.pth"):
        load_taef2(tmp_path)


def test_wrong_layout_is_named(tmp_path):
    torch.save({"0.weight": torch.zeros(1)}, tmp_path / "taef2_encoder.pth")
    with pytest.raises(FileFormatError, match="TAEF2 layout"):
        load_taef2(tmp_path)


@needs_weights
def test_conv_lora_on_the_decoder_starts_as_identity():
    model = load_taef2()
    z = torch.randn(1, 32, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model.decode(z)
    report = lorakit.inject(model.decoder, ["all-conv"], rank=4)
    assert len(report.modules) > 20
    with torch.no_grad():
        torch.testing.assert_close(model.decode(z), before)


def test_latent_tap_on_the_encoder_output():
    from lorakit.regularizers import OTConfig, ot_loss, tap

    torch.manual_seed(0)
    model = TAEF2()
    with tap(model, "encoder.14") as latents:
        model(torch.rand(4, 3, 16, 16))
    assert latents[0].shape == (4, 32, 2, 2)
    cfg = OTConfig(tap="encoder.14", pair="prior", num_projections=16)
    ot_loss(cfg, latents[0], None, step=0, generator=torch.Generator().manual_seed(0)).backward()
    assert model.encoder[0].weight.grad.abs().sum() > 0
