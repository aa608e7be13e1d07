"""Deterministic image corruptions that turn a held-out split into a shifted target domain (domain adaptation).

Every corruption is a pure function of the images: the noise of ``contrast-noise`` comes from a generator with a fixed
seed, so the same input always gives the same target domain, whatever the run's seed.
"""

from __future__ import annotations

import numpy as np

#: Corruptions :func:`corrupt` knows (``none`` leaves the images as they are).
CORRUPTIONS = ("none", "contrast-noise", "blur", "invert")

#: ``contrast-noise``: pixel values are squeezed to ``CONTRAST`` of their range around mid-grey, then Gaussian noise
#: of this standard deviation (in [0, 1] units) is added.
CONTRAST, NOISE_STD, NOISE_SEED = 0.3, 0.1, 1234
#: ``blur``: standard deviation, in pixels, of the Gaussian kernel.
BLUR_SIGMA = 1.5


def _gaussian_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur of (N, H, W) float images, zero padding (the digits' background is black)."""
    radius = int(np.ceil(3 * sigma))
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    k = np.exp(-t ** 2 / (2 * sigma ** 2))
    k /= k.sum()
    pad = np.pad(x, ((0, 0), (radius, radius), (radius, radius)))
    h, w = x.shape[1:]
    rows = sum(k[i] * pad[:, i:i + h, :] for i in range(len(k)))  # (N, H, W + 2r)
    return sum(k[i] * rows[:, :, i:i + w] for i in range(len(k)))


def corrupt(images: np.ndarray, name: str) -> np.ndarray:
    """Apply the corruption ``name`` to grey images.

    Args:
        images: (N, H, W) uint8.
        name: one of :data:`CORRUPTIONS`.

    Returns:
        A new (N, H, W) uint8 array; the input is not modified.

    Raises:
        ValueError: ``name`` is not a known corruption.
    """
    if name not in CORRUPTIONS:
        raise ValueError(f"corruption must be one of {list(CORRUPTIONS)}, got {name!r}")
    x = images.astype(np.float64) / 255.0
    if name == "invert":
        x = 1.0 - x
    elif name == "blur":
        x = _gaussian_blur(x, BLUR_SIGMA)
    elif name == "contrast-noise":
        noise = np.random.default_rng(NOISE_SEED).normal(0.0, NOISE_STD, size=x.shape)
        x = 0.5 + CONTRAST * (x - 0.5) + noise
    return np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
