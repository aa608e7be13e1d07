"""TAEF2, the tiny autoencoder of the FLUX.2 latent space, matching the key layout of the shipped weights.

An image in [0, 1] (N, 3, H, W) maps to a 32-channel latent at 1/8 resolution and back. Both halves are plain
``nn.Sequential`` stacks of 3×3 convolutions and residual blocks (conv-ReLU-conv-ReLU-conv plus identity skip, then
ReLU); the three blocks next to the latent carry an extra GroupNorm branch (the "flux_2" variant) that is added to the
block input. The decoder starts with a soft clamp ``3·tanh(z/3)`` of the latent and upsamples by nearest neighbour.
Our own definition of the architecture of madebyollin/taesd; the weights are theirs (MIT).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from lorakit.errors import FileFormatError
from lorakit.models.hub import data_root

#: Channels of the FLUX.2 latent, and the width of every hidden layer.
LATENT_CHANNELS = 32
WIDTH = 64


def _conv3(c_in: int, c_out: int, *, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


class SoftClamp(nn.Module):
    """``3·tanh(z / 3)``: bounds the latent to (-3, 3) smoothly before decoding."""

    def forward(self, z: Tensor) -> Tensor:
        return 3.0 * torch.tanh(z / 3.0)


class GroupNormBranch(nn.Sequential):
    """1×1 conv to 4× width, GroupNorm (4 groups), ReLU, 1×1 conv back; keys ``0``, ``1``, ``3``."""

    def __init__(self, channels: int) -> None:
        wide = 4 * channels
        super().__init__(nn.Conv2d(channels, wide, 1, bias=False), nn.GroupNorm(4, wide), nn.ReLU(),
                         nn.Conv2d(wide, channels, 1, bias=False))


class TinyBlock(nn.Module):
    """``relu(convs(h) + h)`` with ``h = x + branch(x)`` when the block has the GroupNorm branch, else ``h = x``.

    Args:
        channels: input and output channels (the blocks here never change width, so the skip is the identity).
        group_norm: add the mid-block GroupNorm branch (stored under ``pool``).
    """

    def __init__(self, channels: int, *, group_norm: bool = False) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv3(channels, channels), nn.ReLU(), _conv3(channels, channels), nn.ReLU(),
                                  _conv3(channels, channels))
        self.pool = GroupNormBranch(channels) if group_norm else None
        self.fuse = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, C, H, W) → (N, C, H, W)."""
        h = x if self.pool is None else x + self.pool(x)
        return self.fuse(self.conv(h) + h)


def _stage(n: int, *, group_norm: bool = False) -> list[nn.Module]:
    return [TinyBlock(WIDTH, group_norm=group_norm) for _ in range(n)]


class TAEF2Encoder(nn.Sequential):
    """Image (N, 3, H, W) in [0, 1] → latent (N, 32, H/8, W/8); H and W multiples of 8."""

    def __init__(self) -> None:
        down = [_conv3(WIDTH, WIDTH, stride=2, bias=False) for _ in range(3)]
        super().__init__(
            _conv3(3, WIDTH), *_stage(1),
            down[0], *_stage(3),
            down[1], *_stage(3),
            down[2], *_stage(3, group_norm=True),
            _conv3(WIDTH, LATENT_CHANNELS),
        )


class TAEF2Decoder(nn.Sequential):
    """Latent (N, 32, h, w) → image (N, 3, 8h, 8w), roughly in [0, 1] (clamp it for display or PSNR)."""

    def __init__(self) -> None:
        super().__init__(
            SoftClamp(), _conv3(LATENT_CHANNELS, WIDTH), nn.ReLU(),
            *_stage(3, group_norm=True), nn.Upsample(scale_factor=2), _conv3(WIDTH, WIDTH, bias=False),
            *_stage(3), nn.Upsample(scale_factor=2), _conv3(WIDTH, WIDTH, bias=False),
            *_stage(3), nn.Upsample(scale_factor=2), _conv3(WIDTH, WIDTH, bias=False),
            *_stage(1), _conv3(WIDTH, 3),
        )


class TAEF2(nn.Module):
    """Encoder and decoder together; ``forward`` reconstructs.

    The state-dict keys are ``encoder.<i>...`` and ``decoder.<i>...``; each half also loads the upstream
    ``taef2_{encoder,decoder}.pth`` files on its own.
    """

    def __init__(self) -> None:
        super().__init__()
        self.encoder = TAEF2Encoder()
        self.decoder = TAEF2Decoder()

    def encode(self, x: Tensor) -> Tensor:
        """x: (N, 3, H, W) in [0, 1] → latent (N, 32, H/8, W/8)."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """z: (N, 32, h, w) → image (N, 3, 8h, 8w), unclamped."""
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, 3, H, W) in [0, 1] → reconstruction (N, 3, H, W), unclamped."""
        return self.decode(self.encode(x))


def taef2_weights_dir() -> Path:
    """The folder with the shipped ``taef2_encoder.pth`` and ``taef2_decoder.pth`` under the data root."""
    return data_root() / "pretrained" / "taef2"


def _load_half(module: nn.Module, path: Path) -> None:
    if not path.is_file():
        raise FileFormatError(path, "TAEF2 weights not found (set LORAKIT_DATA to the folder holding "
                                    "pretrained/taef2/)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or non-weights file
        raise FileFormatError(path, f"cannot read weights: {exc}") from exc
    if not isinstance(state, dict):
        raise FileFormatError(path, f"expected a state_dict, got {type(state).__name__}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise FileFormatError(path, f"weights do not fit the TAEF2 layout: {exc}") from exc


def load_taef2(folder: str | Path | None = None) -> TAEF2:
    """The pretrained TAEF2 (both halves loaded with ``strict=True``), in eval mode, on the CPU, float32.

    Args:
        folder: where ``taef2_encoder.pth`` and ``taef2_decoder.pth`` live; default :func:`taef2_weights_dir`.

    Raises:
        FileFormatError: a file is missing, unreadable, or its keys/shapes do not match the definition.
    """
    root = Path(folder) if folder is not None else taef2_weights_dir()
    model = TAEF2()
    _load_half(model.encoder, root / "taef2_encoder.pth")
    _load_half(model.decoder, root / "taef2_decoder.pth")
    return model.eval()
