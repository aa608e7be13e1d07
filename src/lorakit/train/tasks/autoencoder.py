"""Autoencoding Fashion-MNIST with :class:`~lorakit.models.fashion_ae.FashionAE`: pretraining on the base classes,
LoRA adaptation to new classes.

The class sets follow the model, which fixes the study's protocol in one place:

* ``fashion-ae-scratch`` (seeded random weights) trains on the *base* classes :data:`BASE_CLASSES` (0–4): the
  pretraining run, normally with ``lora.full_finetune: true`` and an ``ot:`` prior term (``pair: prior``, tapped at
  ``encoder``), so that the aggregate posterior of the base classes matches N(0, I).
* ``fashion-ae`` (the pretrained weights, :func:`~lorakit.models.fashion_ae.pretrained_fashion_ae`) trains on the
  *new* classes :data:`NEW_CLASSES` (5–9): the adaptation run, with or without the prior term.

Within a class set the train split is cut once (fixed seed, whatever the run's seed): the last :data:`VAL` examples
of a fixed permutation are the validation set that the loop evaluates (and that selects the best adapter); the test
split is never read here, so experiments can report on it. Data: ``fashion-mnist`` or ``synthetic`` (random
images, for tests). Metrics: ``mse`` (mean squared pixel error, selects the best adapter) and ``prior_sw`` (SW₂²
between the validation codes and as many N(0, I) samples, fixed directions and samples).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lorakit.regularizers import sliced_wasserstein
from lorakit.train.config import ConfigError, TrainConfig
from lorakit.train.data import subset
from lorakit.train.device import device_of
from lorakit.train.tasks import Task
from lorakit.train.tasks.fashion_mnist import SPLIT_SEED, fixed_split, pixels, shared_split

#: Classes the autoencoder is pretrained on (T-shirt/top, Trouser, Pullover, Dress, Coat).
BASE_CLASSES = (0, 1, 2, 3, 4)
#: Classes it is adapted to (Sandal, Shirt, Sneaker, Bag, Ankle boot).
NEW_CLASSES = (5, 6, 7, 8, 9)
#: Train-split examples of the class set held out for validation.
VAL = 2000
#: Random directions of the ``prior_sw`` validation metric.
EVAL_PROJECTIONS = 512


def class_images(images: np.ndarray, labels: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    """The images (N, 28, 28) whose label is in ``classes``, in split order."""
    return images[np.isin(labels, classes)]


def _model(cfg: TrainConfig) -> tuple[nn.Module, tuple[int, ...]]:
    from lorakit.models.fashion_ae import FashionAE, pretrained_fashion_ae

    if cfg.model.name == "fashion-ae":
        return pretrained_fashion_ae(), NEW_CLASSES
    if cfg.model.name == "fashion-ae-scratch":
        torch.manual_seed(cfg.run.seed)
        return FashionAE(), BASE_CLASSES
    raise ConfigError(f"config field 'model.name': task autoencoder knows 'fashion-ae' (pretrained, adapted to "
                      f"classes 5-9) and 'fashion-ae-scratch' (pretrained on classes 0-4), got {cfg.model.name!r}")


def _images(cfg: TrainConfig, classes: tuple[int, ...]) -> np.ndarray:
    if cfg.data.dataset == "synthetic":  # smooth random blobs, sized by the requested rows so tests stay tiny
        g = np.random.default_rng(11)
        n = (cfg.data.train_rows or 64) + (cfg.data.eval_rows or 32)
        coarse = g.random((n, 7, 7))
        return (np.kron(coarse, np.ones((4, 4))) * 255).astype(np.uint8)
    if cfg.data.dataset != "fashion-mnist":
        raise ConfigError(f"config field 'data.dataset': task autoencoder reads 'fashion-mnist' or 'synthetic', "
                          f"got {cfg.data.dataset!r}")
    return class_images(*shared_split("train"), classes)


def build(cfg: TrainConfig) -> Task:
    model, classes = _model(cfg)
    images = _images(cfg, classes)
    n_val = min(VAL, len(images) // 10) if cfg.data.dataset == "fashion-mnist" else (cfg.data.eval_rows or 32)
    train_idx, val_idx = fixed_split(len(images), n_val)
    train = [images[i] for i in train_idx[subset(len(train_idx), cfg.data.train_rows, cfg.run.seed)]]
    evals = [images[i] for i in val_idx[:cfg.data.eval_rows]]

    def collate(batch: list[np.ndarray]) -> dict[str, Tensor]:
        """pixels: (N, 1, 28, 28) in [0, 1]."""
        return {"pixels": pixels(batch)}

    def forward(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return m(batch["pixels"]).float()  # (N, 1, 28, 28)

    def loss(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return nn.functional.mse_loss(forward(m, batch), batch["pixels"])

    def evaluate(m: nn.Module, rows: Sequence[np.ndarray], batch_size: int = 1000) -> dict[str, float]:
        sq_err, codes = 0.0, []
        for start in range(0, len(rows), batch_size):
            x = pixels(list(rows[start:start + batch_size])).to(device_of(m))
            z = m.encode(x).float()
            sq_err += float((m.decode(z).float() - x).pow(2).sum())
            codes.append(z)
        z = torch.cat(codes)
        # fixed prior samples and directions: the figure moves only when the codes do
        g = torch.Generator().manual_seed(SPLIT_SEED)
        prior = torch.randn(z.shape, generator=g).to(z.device)  # drawn on the CPU: the same on every device
        sw = sliced_wasserstein(z, prior, num_projections=EVAL_PROJECTIONS, generator=g)
        return {"mse": sq_err / (len(rows) * 28 * 28), "prior_sw": float(sw)}

    return Task(model, train, evals, collate, loss, evaluate, "mse", False, cfg.model.name, forward=forward)
