"""A visual style for generative LoRA, and the small pieces to teach it to the TAEF2 decoder.

The style, *ink duotone*, is a deterministic image transform that a reconstruction decoder cannot produce by itself:
luminance through a contrast curve, posterised to a few flat tones, dark ink drawn along luminance edges, and the
result printed in two colours (navy ink on cream paper). Learning it needs global colour remapping (the duotone),
a non-linear staircase (posterisation) and local edge detection (the ink lines), so it exercises every decoder
level. :func:`fit_decoder` trains a conv LoRA (LoCon) on the decoder alone so that ``decode(encode(x)) ≈ style(x)``
with the encoder and every base weight frozen.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.inject import InjectReport, inject
from lorakit.models.taef2 import TAEF2

#: ITU-R BT.601 luma weights (R, G, B).
LUMA = (0.299, 0.587, 0.114)
#: Every convolution of the TAEF2 decoder (inject on the whole :class:`TAEF2`, so paths keep the ``decoder.`` head
#: that the ``taef2`` block family needs).
DECODER_CONVS = r"re:decoder\..*"


@dataclass(frozen=True)
class InkDuotone:
    """Parameters of the ink-duotone style (defaults: the documented style of ``bench/taef2_style.py``)."""

    levels: int = 4
    """Flat tones after posterisation (≥ 2)."""
    low: float = 0.15
    """Luminance mapped to black by the contrast curve."""
    high: float = 0.85
    """Luminance mapped to white by the contrast curve."""
    edge_low: float = 0.08
    """Sobel gradient magnitude (per pixel, luminance in [0, 1]) where ink starts."""
    edge_high: float = 0.25
    """Gradient magnitude where the ink is fully dark."""
    ink: tuple[float, float, float] = (0.08, 0.10, 0.28)
    """RGB of the ink (navy)."""
    paper: tuple[float, float, float] = (0.98, 0.91, 0.74)
    """RGB of the paper (cream)."""

    def __post_init__(self) -> None:
        problems = []
        if self.levels < 2:
            problems.append(f"levels must be at least 2, got {self.levels}")
        if not 0 <= self.low < self.high <= 1:
            problems.append(f"need 0 <= low < high <= 1, got low={self.low}, high={self.high}")
        if not 0 <= self.edge_low < self.edge_high:
            problems.append(f"need 0 <= edge_low < edge_high, got {self.edge_low}, {self.edge_high}")
        if problems:
            raise LorakitError("InkDuotone: " + "; ".join(problems))


def ink_duotone(x: Tensor, style: InkDuotone = InkDuotone()) -> Tensor:
    """Apply the ink-duotone style.

    Args:
        x: (N, 3, H, W) RGB in [0, 1].
        style: the style's parameters.

    Returns:
        (N, 3, H, W) in [0, 1], a pure function of ``x`` (no randomness, no state).
    """
    luma = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    lum = (x * luma).sum(1, keepdim=True)  # (N, 1, H, W)
    t = ((lum - style.low) / (style.high - style.low)).clamp(0, 1)
    t = t * t * (3 - 2 * t)  # smoothstep: an S-shaped contrast curve
    tone = torch.round(t * (style.levels - 1)) / (style.levels - 1)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x.dtype, device=x.device)
    kernels = torch.stack([sobel, sobel.T]).unsqueeze(1) / 4  # (2, 1, 3, 3); /4 makes a unit step read ~1
    grad = F.conv2d(F.pad(lum, (1, 1, 1, 1), mode="replicate"), kernels)  # replicate: no ink along the border
    magnitude = grad.pow(2).sum(1, keepdim=True).sqrt()
    ink_amount = ((magnitude - style.edge_low) / (style.edge_high - style.edge_low)).clamp(0, 1)
    tone = tone * (1 - ink_amount)
    ink = torch.tensor(style.ink, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    paper = torch.tensor(style.paper, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (ink + tone * (paper - ink)).clamp(0, 1)


def images_to_tensor(images: np.ndarray, size: int | None = None) -> Tensor:
    """uint8 images (N, H, W, 3) → float (N, 3, size, size) in [0, 1], bilinearly resized when ``size`` is given."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    if size is not None and size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp(0, 1)
    return x


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Per-image PSNR in dB of images in [0, 1]: ``10·log10(1 / MSE)``; a, b: (N, C, H, W) → (N,)."""
    mse = (a.clamp(0, 1) - b.clamp(0, 1)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


def inject_decoder_locon(model: TAEF2, *, rank: int = 8, alpha: float | None = None, seed: int | None = 0,
                         targets: Sequence[str] = (DECODER_CONVS,), name: str = "default") -> InjectReport:
    """Add a conv LoRA (LoCon) to the decoder of ``model`` and freeze everything else, encoder included.

    Args:
        model: a :class:`TAEF2` (injected on as a whole, so adapter paths read ``decoder.<i>…``).
        rank: LoRA rank of every convolution.
        alpha: scaling numerator (default ``rank``).
        seed: seed of the factor initialisation.
        targets: module patterns (default: every decoder convolution).
        name: adapter name.

    Returns:
        The :class:`~lorakit.inject.InjectReport` of the injection (wrapped paths, trainable / total parameters).
    """
    return inject(model, list(targets), rank=rank, alpha=alpha, seed=seed, name=name)


def fit_decoder(model: nn.Module, latents: Tensor, targets: Tensor, *, steps: int, lr: float = 2e-3,
                batch_size: int = 8, seed: int = 0) -> list[float]:
    """Train the trainable parameters of ``model.decoder`` so that ``decoder(latents) ≈ targets`` (MSE, Adam).

    The latents come from the frozen encoder once, outside this loop, so a step costs one decoder forward and
    backward. Minibatches are drawn with a seeded generator, so a run is reproducible on one thread.

    Args:
        model: a :class:`TAEF2` with a trainable adapter on its decoder (see :func:`inject_decoder_locon`).
        latents: (N, 32, h, w) encoder outputs.
        targets: (N, 3, 8h, 8w) styled images in [0, 1].
        steps: optimiser steps.
        lr: Adam learning rate; a cosine decay takes it to zero over ``steps``.
        batch_size: images per step.
        seed: seed of the minibatch order.

    Returns:
        The training loss of each step.

    Raises:
        LorakitError: the model has nothing to train.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise LorakitError("fit_decoder: the model has no trainable parameters (inject an adapter first)")
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(len(latents), (batch_size,), generator=gen)
        loss = F.mse_loss(model.decoder(latents[idx]), targets[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
    return losses
