"""TAEF2 as a diffusers VAE component: what ``vae/`` of a diffusion model folder holds when its latent space is
FLUX.2's, read by the diffusion task and by diffusers' pipelines alike.

diffusers' :class:`~diffusers.AutoencoderTiny` has the TAESD layout but not TAEF2's mid-block GroupNorm branch, so
this is a small :class:`~diffusers.ModelMixin` around lorakit's own :class:`~lorakit.models.taef2.TAEF2`, with
AutoencoderTiny's interface: pixels in [-1, 1] (the pipelines' convention, TAEF2 takes [0, 1]),
``encode(x).latents``, ``decode(z).sample``, a ``scaling_factor`` that brings the latents to unit variance and
``block_out_channels`` of length 4 (diffusers reads the 8× downsampling from it). ``save_pretrained`` /
``from_pretrained`` are diffusers' own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.autoencoders.autoencoder_tiny import AutoencoderTinyOutput
from diffusers.models.autoencoders.vae import DecoderOutput
from torch import Tensor

from lorakit.models.taef2 import LATENT_CHANNELS, WIDTH, TAEF2Decoder, TAEF2Encoder, load_taef2

#: The ``_class_name`` a ``vae/config.json`` gives for this component.
CLASS_NAME = "TAEF2Autoencoder"


class TAEF2Autoencoder(ModelMixin, ConfigMixin):
    """TAEF2 (1/8 resolution, 32 latent channels) with diffusers' VAE interface.

    Args:
        scaling_factor: latents are multiplied by it after encoding (and divided before decoding, by the
            pipelines), to bring them to about unit variance for the diffusion model.
        latent_channels: 32 (FLUX.2's latent).
        block_out_channels: four widths; only their count matters to diffusers (2 ** (4 - 1) = 8× downsampling).
    """

    config_name = "config.json"

    @register_to_config
    def __init__(self, scaling_factor: float = 1.0, latent_channels: int = LATENT_CHANNELS,
                 block_out_channels: tuple[int, ...] = (WIDTH,) * 4) -> None:
        super().__init__()
        if latent_channels != LATENT_CHANNELS or len(block_out_channels) != 4:
            raise ValueError(f"TAEF2 has {LATENT_CHANNELS} latent channels and 8x downsampling; config asks "
                             f"latent_channels={latent_channels}, {len(block_out_channels)} blocks")
        self.encoder = TAEF2Encoder()
        self.decoder = TAEF2Decoder()

    def encode(self, x: Tensor, return_dict: bool = True) -> AutoencoderTinyOutput | tuple[Tensor]:
        """x: (N, 3, H, W) in [-1, 1] → latents (N, 32, H/8, W/8), unscaled (the caller applies
        ``scaling_factor``, as with AutoencoderTiny)."""
        z = self.encoder((x + 1) / 2)
        return AutoencoderTinyOutput(latents=z) if return_dict else (z,)

    def decode(self, z: Tensor, generator: torch.Generator | None = None,
               return_dict: bool = True) -> DecoderOutput | tuple[Tensor]:
        """z: (N, 32, h, w) unscaled latents → images (N, 3, 8h, 8w), about [-1, 1] (unclamped)."""
        x = self.decoder(z) * 2 - 1
        return DecoderOutput(sample=x) if return_dict else (x,)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, 3, H, W) in [-1, 1] → reconstruction (N, 3, H, W)."""
        return self.decode(self.encode(x).latents).sample


def pretrained_taef2_vae(scaling_factor: float = 1.0, folder: str | Path | None = None) -> TAEF2Autoencoder:
    """The shipped TAEF2 weights (see :func:`lorakit.models.taef2.load_taef2`) as a :class:`TAEF2Autoencoder`."""
    vae = TAEF2Autoencoder(scaling_factor=scaling_factor)
    taef2 = load_taef2(folder)
    vae.encoder.load_state_dict(taef2.encoder.state_dict())
    vae.decoder.load_state_dict(taef2.decoder.state_dict())
    return vae.eval()
