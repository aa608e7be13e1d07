"""Fashion-MNIST classification with :class:`~lorakit.models.fashion_cnn.FashionCNN`, optionally adapted to an
unlabelled, corrupted target domain (``data.target``).

Splits are fixed, whatever the run's seed, so every run of an experiment sees the same source and target sets:

* source: the labelled train split minus :data:`SOURCE_VAL` examples held out as the source validation set (the
  eval set, which selects the best adapter). The pretrained CNN never saw those held-out examples either.
* target: the test split under ``data.target.corruption``, cut into two halves: the *adaptation* half supplies
  unlabelled inputs to the OT regulariser, the *evaluation* half (never trained on) gives the ``target_accuracy``
  that is reported. Target labels reach neither the loss nor model selection.

Models: ``fashion-cnn`` (the pretrained weights, :func:`~lorakit.models.fashion_cnn.pretrained_fashion_cnn`) or
``fashion-cnn-scratch`` (seeded random weights: pretraining and tests). Data: ``fashion-mnist`` or ``synthetic``
(random images, for tests). Metric: source validation accuracy.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from lorakit.train.config import ConfigError, TrainConfig
from lorakit.train.corruptions import corrupt
from lorakit.train.data import read_fashion_mnist, subset
from lorakit.train.device import device_of, to_device
from lorakit.train.tasks import Task

#: Example: (image (28, 28) uint8, label). A target input is the image alone.
Example = tuple[np.ndarray, int]
#: Train-split examples held out as the source validation set (never used to pretrain or to train an adapter).
SOURCE_VAL = 5000
#: Seed of the fixed source and target splits (not the run seed: every run shares the splits).
SPLIT_SEED = 0


def fixed_split(n: int, n_last: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted indices (first, last) of ``n`` examples cut by a permutation with a fixed seed (:data:`SPLIT_SEED`);
    the last part has ``n_last`` examples."""
    perm = np.random.default_rng(SPLIT_SEED).permutation(n)
    return np.sort(perm[:n - n_last]), np.sort(perm[n - n_last:])


def source_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, validation) of a labelled split of ``n`` examples; :data:`SOURCE_VAL` of them (a tenth of
    ``n`` when that is smaller) validate."""
    return fixed_split(n, min(SOURCE_VAL, n // 10))


def target_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (adaptation, evaluation) of the two fixed halves of a held-out split of ``n`` examples."""
    return fixed_split(n, n - n // 2)


def _synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    g = np.random.default_rng(seed)
    return g.integers(0, 256, (n, 28, 28), dtype=np.uint8), g.integers(0, 10, n)


def _splits(cfg: TrainConfig) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """The labelled train split and the held-out split (images (N, 28, 28) uint8, labels (N,))."""
    if cfg.data.dataset == "synthetic":  # sizes follow the requested rows, so tests stay tiny
        d = cfg.data
        n_train = (d.train_rows or 64) + (d.eval_rows or 32) * 10
        t = d.target
        n_held = 2 * max((t.rows or 32) if t else 32, (t.eval_rows or 32) if t else 32)
        return _synthetic(n_train, 11), _synthetic(n_held, 12)
    if cfg.data.dataset != "fashion-mnist":
        raise ConfigError(f"config field 'data.dataset': task fashion-mnist reads 'fashion-mnist' or 'synthetic', "
                          f"got {cfg.data.dataset!r}")
    return shared_split("train"), shared_split("test")


@functools.lru_cache(maxsize=2)
def shared_split(split: str) -> tuple[np.ndarray, np.ndarray]:
    """The split, read once per process (experiments build many tasks in a row); read-only, since it is shared."""
    images, labels = read_fashion_mnist(split)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def _model(cfg: TrainConfig) -> nn.Module:
    from lorakit.models.fashion_cnn import FashionCNN, pretrained_fashion_cnn

    if cfg.model.num_labels != 10:
        raise ConfigError(f"config field 'model.num_labels': Fashion-MNIST has 10 classes, got {cfg.model.num_labels}")
    if cfg.model.name == "fashion-cnn":
        return pretrained_fashion_cnn()
    if cfg.model.name == "fashion-cnn-scratch":
        torch.manual_seed(cfg.run.seed)
        return FashionCNN()
    raise ConfigError(f"config field 'model.name': task fashion-mnist knows 'fashion-cnn' and 'fashion-cnn-scratch', "
                      f"got {cfg.model.name!r}")


def pixels(images: Sequence[np.ndarray] | np.ndarray) -> Tensor:
    """Images (28, 28) uint8 → (N, 1, 28, 28) float in [0, 1], the input of the CNN and of the autoencoder."""
    return torch.from_numpy(np.stack(images)).unsqueeze(1).float() / 255


def build(cfg: TrainConfig) -> Task:
    model = _model(cfg)
    (x, y), (x_held, y_held) = _splits(cfg)
    train_idx, val_idx = source_split(len(y))
    train = [(x[i], int(y[i])) for i in train_idx[subset(len(train_idx), cfg.data.train_rows, cfg.run.seed)]]
    # the first eval_rows of the validation set, the same for every seed
    evals = [(x[i], int(y[i])) for i in val_idx[:cfg.data.eval_rows]]
    target_inputs: list[np.ndarray] | None = None
    target_evals: list[Example] = []
    if cfg.data.target is not None:
        t = cfg.data.target
        x_t = corrupt(x_held, t.corruption)  # the whole split at once: the noise depends only on the split
        adapt_idx, eval_idx = target_split(len(y_held))
        # a fixed subset (seed 0, like the splits): every seed adapts to the same target pool
        target_inputs = [x_t[i] for i in adapt_idx[subset(len(adapt_idx), t.rows, SPLIT_SEED)]]
        target_evals = [(x_t[i], int(y_held[i])) for i in eval_idx[:t.eval_rows]]

    def collate(batch: list[Example]) -> dict[str, Tensor]:
        """pixels: (N, 1, 28, 28) in [0, 1]; labels: (N,)."""
        return {"pixels": pixels([img for img, _ in batch]), "labels": torch.tensor([lab for _, lab in batch])}

    def collate_inputs(batch: list[np.ndarray]) -> dict[str, Tensor]:
        """pixels: (N, 1, 28, 28) in [0, 1]; no labels."""
        return {"pixels": pixels(batch)}

    def forward(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return m(batch["pixels"]).float()  # (N, 10)

    def loss(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        return nn.functional.cross_entropy(forward(m, batch), batch["labels"])

    def accuracy(m: nn.Module, rows: Sequence[Example], batch_size: int = 1000) -> tuple[float, float]:
        correct, loss_sum = 0, 0.0
        for start in range(0, len(rows), batch_size):
            batch = to_device(collate(list(rows[start:start + batch_size])), device_of(m))
            logits = forward(m, batch)
            loss_sum += nn.functional.cross_entropy(logits, batch["labels"], reduction="sum").item()
            correct += int((logits.argmax(-1) == batch["labels"]).sum())
        return correct / max(len(rows), 1), loss_sum / max(len(rows), 1)

    def evaluate(m: nn.Module, rows: Sequence[Example]) -> dict[str, float]:
        acc, mean_loss = accuracy(m, rows)
        metrics = {"accuracy": acc, "eval_loss": mean_loss}
        if target_evals:  # reported only: the loop selects on ``accuracy`` (source validation)
            metrics["target_accuracy"], metrics["target_loss"] = accuracy(m, target_evals)
        return metrics

    return Task(model, train, evals, collate, loss, evaluate, "accuracy", True, cfg.model.name,
                target_set=target_inputs, collate_inputs=collate_inputs, forward=forward)
