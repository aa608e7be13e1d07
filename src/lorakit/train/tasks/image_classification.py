"""Image classification: the pretrained CIFAR-10 ResNet-20 adapted to the CIFAR-10 JPEG re-encodings.

Metric: accuracy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lorakit.models.resnet_cifar import MEAN, STD, ResNetCifar, resnet20_cifar10
from lorakit.train.config import ConfigError, TrainConfig
from lorakit.train.data import read_cifar10_jpg, subset
from lorakit.train.device import device_of, to_device
from lorakit.train.tasks import Task

#: Example: (image (32, 32, 3) uint8, label).
Example = tuple[np.ndarray, int]


def _data(cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    if cfg.data.dataset == "synthetic":  # random images and labels, for tests
        def make(n: int, seed: int) -> list[Example]:
            g = np.random.default_rng(seed)
            return [(g.integers(0, 256, (32, 32, 3), dtype=np.uint8), int(g.integers(0, 10))) for _ in range(n)]

        return make(cfg.data.train_rows or 64, cfg.run.seed), make(cfg.data.eval_rows or 32, cfg.run.seed + 1)
    if cfg.data.dataset != "cifar10-jpg":
        raise ConfigError(f"config field 'data.dataset': task image-classification reads 'cifar10-jpg' or "
                          f"'synthetic', got {cfg.data.dataset!r}")
    x, y = read_cifar10_jpg("train")
    train = [(x[i], int(y[i])) for i in subset(len(y), cfg.data.train_rows, cfg.run.seed)]
    x, y = read_cifar10_jpg("test")
    keep = subset(len(y), cfg.data.eval_rows, cfg.run.seed + 1)  # a random subset: the tar is ordered by class
    return train, [(x[i], int(y[i])) for i in keep]


def build(cfg: TrainConfig) -> Task:
    if cfg.model.name == "resnet20-cifar10":
        model: nn.Module = resnet20_cifar10()
    elif cfg.model.name == "tiny-resnet":  # random weights, one block per stage: for tests
        torch.manual_seed(cfg.run.seed)
        model = ResNetCifar(blocks_per_stage=1)
    else:
        raise ConfigError(f"config field 'model.name': task image-classification knows 'resnet20-cifar10' and "
                          f"'tiny-resnet', got {cfg.model.name!r}")
    train, evals = _data(cfg)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)

    def collate(batch: list[Example]) -> dict[str, Tensor]:
        """pixels: (N, 3, 32, 32) normalised; labels: (N,)."""
        x = torch.from_numpy(np.stack([img for img, _ in batch])).permute(0, 3, 1, 2).float() / 255
        return {"pixels": (x - mean) / std, "labels": torch.tensor([y for _, y in batch])}

    def loss(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return nn.functional.cross_entropy(m(batch["pixels"]).float(), batch["labels"])

    def evaluate(m: nn.Module, rows: Sequence[Example], batch_size: int = 500) -> dict[str, float]:
        correct, loss_sum = 0, 0.0
        for start in range(0, len(rows), batch_size):
            batch = to_device(collate(list(rows[start:start + batch_size])), device_of(m))
            logits = m(batch["pixels"]).float()
            loss_sum += nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        return {"accuracy": correct / max(len(rows), 1), "eval_loss": loss_sum / max(len(rows), 1)}

    return Task(model, train, evals, collate, loss, evaluate, "accuracy", True, cfg.model.name)
