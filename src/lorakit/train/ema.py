"""An exponential moving average (EMA) of the trained parameters, as diffusion trainers keep one.

After every optimiser step the average moves towards the parameters: ``avg ← d·avg + (1 − d)·θ``, with diffusers'
``EMAModel`` warm-up ``d = min(decay, (1 + k) / (10 + k))`` at the k-th update (0-based), so the average is not
pinned to the initial weights in a short run. Evaluation, samples and saved adapters use the average; training
steps keep using the raw parameters. The average lives beside the parameters (same dtype and device) and goes into
every checkpoint, so a resumed run averages exactly as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

#: The warm-up's constants: d = (1 + k) / (WARMUP + k).
WARMUP = 10


def ema_decay(decay: float, k: int) -> float:
    """The decay of the k-th update (0-based): ``min(decay, (1 + k) / (10 + k))``."""
    return min(decay, (1 + k) / (WARMUP + k))


class EMA:
    """The moving average of named trainable parameters.

    Args:
        params: (name, parameter) of everything the optimiser updates.
        decay: the long-run decay ``d`` in (0, 1).
    """

    def __init__(self, params: list[tuple[str, nn.Parameter]], decay: float) -> None:
        self.params = dict(params)
        self.decay = decay
        self.average = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self, k: int) -> None:
        """Move the average towards the parameters after the k-th optimiser step (0-based)."""
        weight = 1.0 - ema_decay(self.decay, k)
        for n, p in self.params.items():
            self.average[n].lerp_(p.detach(), weight)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """Within the block the parameters hold the average; the raw values come back after it."""
        raw = {n: p.detach().clone() for n, p in self.params.items()}
        self.copy_to()
        try:
            yield
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(raw[n])

    @torch.no_grad()
    def copy_to(self) -> None:
        """Put the average into the parameters for good (the end of a run)."""
        for n, p in self.params.items():
            p.copy_(self.average[n])

    def state(self) -> dict[str, Tensor]:
        """The average, keyed by parameter name (for a checkpoint)."""
        return dict(self.average)

    @torch.no_grad()
    def load(self, tensors: Mapping[str, Tensor]) -> list[str]:
        """Restore the average from a checkpoint; returns the names that are missing or mis-shaped (nothing is
        changed then)."""
        bad = sorted(n for n, a in self.average.items() if n not in tensors or tensors[n].shape != a.shape)
        bad += sorted(n for n in tensors if n not in self.average)
        if not bad:
            for n, a in self.average.items():
                a.copy_(tensors[n])
        return bad
