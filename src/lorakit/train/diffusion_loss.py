"""The denoising loss of Stable Diffusion LoRA training and its options (pure functions over tensors).

The noising itself (``add_noise``, ``get_velocity``) is the scheduler's own, from diffusers; only the weighting
options that kohya sd-scripts and diffusers' scripts add on top live here.
"""

from __future__ import annotations

import torch
from torch import Tensor


def offset_noise(noise: Tensor, offset: float, extra: Tensor) -> Tensor:
    """Noise offset (Guttenberg 2023, as kohya sd-scripts applies it): ``noise + offset · extra``, where ``extra``
    (N, C, 1, 1) is standard normal, one value per example and channel, so the model learns to shift the mean
    brightness of an image.

    Args:
        noise: (N, C, H, W) standard normal.
        offset: the strength; 0 returns ``noise`` itself.
        extra: (N, C, 1, 1) standard normal.
    """
    return noise + offset * extra if offset else noise


def snr(alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 − ᾱ_t) of each timestep: (N,)."""
    a = alphas_cumprod.to(timesteps.device)[timesteps].double()
    return (a / (1.0 - a)).float()


def min_snr_weights(snr_t: Tensor, gamma: float, prediction_type: str) -> Tensor:
    """Min-SNR-γ loss weights (Hang et al. 2023, eq. 5): ``min(SNR, γ) / SNR`` for an ε-prediction loss; for
    v-prediction ``min(SNR, γ) / (SNR + 1)``, since the v-loss already carries a factor ``SNR + 1`` (kohya's
    ``apply_snr_weight``).

    Under a zero-terminal-SNR schedule (diffusers' ``rescale_betas_zero_snr``) the last step has SNR 0: its
    ε weight is the limit 1 (not 0/0), and its v weight is 0, so min-SNR leaves that step untrained with
    v-prediction; such schedules are usually trained without it.

    Args:
        snr_t: (N,) the SNR of each example's timestep.
        gamma: γ (5 in the paper).
        prediction_type: ``epsilon`` or ``v_prediction``.
    """
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1.0)
    return torch.where(snr_t > 0, clipped / snr_t.clamp(min=torch.finfo(snr_t.dtype).tiny), torch.ones_like(snr_t))


def denoising_loss(pred: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean squared error per example, optionally weighted, then the batch mean: a scalar.

    Args:
        pred: (N, C, H, W) the UNet's output.
        target: (N, C, H, W) the noise (ε) or the velocity (v).
        weights: (N,) per-example weights, or None.
    """
    per_example = (pred.float() - target.float()).pow(2).mean(dim=tuple(range(1, pred.dim())))  # (N,)
    if weights is not None:
        per_example = per_example * weights
    return per_example.mean()
