"""A small deterministic autoencoder for 28×28 grey images (Fashion-MNIST), the generative model of the
prior-matching study.

It is a sliced-Wasserstein autoencoder (SWAE, Kolouri et al. 2019; the WAE family of Tolstikhin et al. 2018):
the encoder is deterministic, ``z = encoder(x)``, and the prior N(0, I) is imposed on the *aggregate* posterior,
the distribution of ``z`` over the data, by a sliced-Wasserstein term added to the reconstruction loss (the
``ot:`` section of the training config, ``pair: prior``, tapped at ``encoder``). New images come from decoding
prior samples, ``decoder(z)`` with ``z ~ N(0, I)``. A deterministic AE rather than a VAE keeps one knob (the SW
weight) and no per-sample noise, and it is exactly what latent OT regularises: the aggregate posterior.

Shapes: encoder (N, 1, 28, 28) → two stride-2 4×4 convs (16, 32 channels: 28 → 14 → 7) → flatten → 128 → d;
decoder d → 128 → 32·7·7 → two (nearest ×2 upsample, 3×3 conv) stages → sigmoid (N, 1, 28, 28) in [0, 1].
Every layer is an ``nn.Linear`` or ``nn.Conv2d``, so LoRA reaches all of them (upsample + conv instead of a
transposed conv, which lorakit does not adapt). There is no batch norm: a frozen base has no running statistics
that would shift with a new data set on their own.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor, nn

from lorakit.models.cache import load_or_pretrain, pretrain_and_save

#: Size of the latent code z.
LATENT_DIM = 8
#: File name stem of the cached pretrained weights inside :func:`lorakit.models.cache.cache_dir`.
WEIGHTS_STEM = "fashion-ae"
#: Bumped whenever the architecture changes, so cached weights of an older one are never loaded.
ARCH_VERSION = 1
#: How the cached weights are made (pretraining on the base classes 0–4 by ``lorakit train``): seed, optimiser
#: steps, batch size, peak learning rate and the sliced-Wasserstein prior weight. ``configs/fmnist-ae-pretrain.yaml``
#: is the same recipe as a config file (a test keeps the two alike).
RECIPE = {"seed": 0, "steps": 600, "batch_size": 128, "lr": 2e-3, "sw_weight": 0.2}


class FashionAE(nn.Module):
    """``x`` (N, 1, 28, 28) in [0, 1] → reconstruction (N, 1, 28, 28) in [0, 1] through a latent (N, d)."""

    def __init__(self, latent_dim: int = LATENT_DIM) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(1, 16, 4, stride=2, padding=1), nn.ReLU(),   # (N, 16, 14, 14)
            nn.Conv2d(16, 32, 4, stride=2, padding=1), nn.ReLU(),  # (N, 32, 7, 7)
            nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(),
            nn.Linear(128, latent_dim),                            # (N, d): no activation, the prior is N(0, I)
        )
        self.decoder = nn.Sequential(
            nn.Linear(latent_dim, 128), nn.ReLU(),
            nn.Linear(128, 32 * 7 * 7), nn.ReLU(), nn.Unflatten(1, (32, 7, 7)),
            nn.Upsample(scale_factor=2), nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(),  # (N, 16, 14, 14)
            nn.Upsample(scale_factor=2), nn.Conv2d(16, 1, 3, padding=1), nn.Sigmoid(),  # (N, 1, 28, 28)
        )

    def encode(self, x: Tensor) -> Tensor:
        """(N, 1, 28, 28) → (N, d) latent codes (the output of ``encoder``, the module OT regularisers tap)."""
        return self.encoder(x)

    def decode(self, z: Tensor) -> Tensor:
        """(N, d) → (N, 1, 28, 28) images in [0, 1]."""
        return self.decoder(z)

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def sample(self, n: int, *, generator: torch.Generator | None = None) -> Tensor:
        """Decode ``n`` prior samples z ~ N(0, I): (n, 1, 28, 28)."""
        param = next(self.parameters())
        z = torch.randn(n, self.latent_dim, generator=generator, dtype=param.dtype)
        return self.decode(z.to(param.device))


def _recipe_name() -> str:
    r = RECIPE
    return f"{WEIGHTS_STEM}-v{ARCH_VERSION}-s{r['seed']}-n{r['steps']}-w{r['sw_weight']:g}.safetensors"


def pretrain_config(out_dir: str | Path) -> dict:
    """The :data:`RECIPE` as a training config mapping (task ``autoencoder``, model ``fashion-ae-scratch``: random
    weights trained fully on the base classes with reconstruction + SW prior matching), running in ``out_dir``."""
    r = RECIPE
    return {
        "task": "autoencoder", "model": {"name": "fashion-ae-scratch"}, "data": {"dataset": "fashion-mnist"},
        "lora": {"targets": [], "full_finetune": True},
        "optim": {"lr": r["lr"], "batch_size": r["batch_size"], "max_steps": r["steps"], "warmup_steps": 50,
                  "schedule": "cosine", "weight_decay": 0.0},
        # on the CPU wherever it runs: the cached weights must not depend on the machine having a GPU
        "run": {"out_dir": str(out_dir), "seed": r["seed"], "eval_before": False, "log_every": 100, "device": "cpu"},
        "ot": {"tap": "encoder", "divergence": "sliced", "pair": "prior", "weight": r["sw_weight"]},
    }


def pretrained_fashion_ae(cache: str | Path | None = None, *, train_if_missing: bool = True) -> FashionAE:
    """The autoencoder pretrained on the Fashion-MNIST base classes 0–4 (train split minus a held-out validation
    set), with reconstruction + sliced-Wasserstein prior matching.

    The weights are read from ``<cache>/fashion-ae-v<arch>-s<seed>-n<steps>-w<weight>.safetensors``. When that file
    is absent they are trained once, deterministically, through lorakit's own training loop (task ``autoencoder``,
    full fine-tuning from seeded random weights, the ``ot:`` prior term tapped at ``encoder``), and written
    atomically with their validation figures in the metadata. About a minute or two on two CPU cores.

    Args:
        cache: folder of the cached weights; default :func:`lorakit.models.cache.cache_dir`.
        train_if_missing: train (and cache) the weights when the file is absent; otherwise raise.

    Returns:
        A ``FashionAE`` in eval mode with gradients on (callers freeze or adapt it).

    Raises:
        FileNotFoundError: the weights are absent and ``train_if_missing`` is False.
    """
    return load_or_pretrain(FashionAE(), _recipe_name(), cache, train_if_missing, _pretrain,
                            "Fashion-MNIST autoencoder")


def _pretrain(path: Path) -> None:
    """Train FashionAE from scratch with the :data:`RECIPE` through the training loop and save it to ``path``."""
    pretrain_and_save(path, pretrain_config, RECIPE, "lorakit.models.fashion_ae.pretrained_fashion_ae")
