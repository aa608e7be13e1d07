"""A small CNN for 28×28 grey images (Fashion-MNIST): the source model of the domain-adaptation experiments and
the feature extractor of the Fréchet distance in the prior-matching study.

Three 3×3 conv stages (32, 64, 128 channels, ReLU, each followed by a 2×2 max-pool: 28 → 14 → 7 → 3), then
``features`` (flatten, a 1152→128 linear layer and ReLU: the latent that OT regularisers tap) and ``head`` (128→10).
The 3×3 map is flattened rather than averaged: keeping where a part sits (collar, sole, handle) is worth several
points of accuracy on Fashion-MNIST.
There is no batch norm, so a frozen base has no running statistics that would adapt to a new domain on their own:
whatever adaptation happens is the adapter's.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from lorakit.models.cache import load_or_pretrain, pretrain_and_save

#: Width of the tapped feature layer.
FEATURE_DIM = 128
#: File name of the cached weights inside the cache folder.
WEIGHTS_FILE = "fashion-cnn.safetensors"
#: Bumped whenever the architecture changes, so cached weights of an older one are never loaded.
ARCH_VERSION = 2
#: How the cached weights are made: seed, optimiser steps, batch size, peak learning rate. A change of recipe gives a
#: new file name, so stale weights are never reused.
RECIPE = {"seed": 0, "steps": 1500, "batch_size": 128, "lr": 2e-3}


class FashionCNN(nn.Module):
    """``x`` (N, 1, 28, 28) in [0, 1] → logits (N, num_classes); ``embed(x)`` gives the (N, 128) features."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(128 * 3 * 3, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """(N, 1, 28, 28) → (N, 128) features (the output of ``features``)."""
        h = self.pool(self.act(self.conv1(x)))
        h = self.pool(self.act(self.conv2(h)))
        h = self.pool(self.act(self.conv3(h)))  # (N, 128, 3, 3)
        return self.features(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))


def _recipe_name() -> str:
    r = RECIPE
    return f"{WEIGHTS_FILE.removesuffix('.safetensors')}-v{ARCH_VERSION}-s{r['seed']}-n{r['steps']}.safetensors"


def pretrained_fashion_cnn(cache: str | Path | None = None, *, train_if_missing: bool = True) -> FashionCNN:
    """The Fashion-MNIST CNN with weights pretrained on the labelled train split (all 10 classes).

    The weights are read from ``<cache>/fashion-cnn-v<arch>-s<seed>-n<steps>.safetensors``. When that file is absent they
    are trained once, deterministically (fixed seed, data order and splits), through lorakit's own training loop
    (task ``fashion-mnist``, full fine-tuning from random weights, on the train split minus the
    :data:`~lorakit.train.tasks.fashion_mnist.SOURCE_VAL` held-out examples), and written atomically with their
    validation accuracy in the metadata. Training takes about a minute or two on two CPU cores.

    Args:
        cache: folder of the cached weights; default :func:`lorakit.models.cache.cache_dir`.
        train_if_missing: train (and cache) the weights when the file is absent; otherwise raise.

    Returns:
        A ``FashionCNN`` in eval mode with gradients on (callers freeze or adapt it).

    Raises:
        FileNotFoundError: the weights are absent and ``train_if_missing`` is False.
    """
    return load_or_pretrain(FashionCNN(), _recipe_name(), cache, train_if_missing, _pretrain, "Fashion-MNIST CNN")


def pretrain_config(out_dir: str | Path) -> dict:
    """The :data:`RECIPE` as a training config mapping (task ``fashion-mnist``, model ``fashion-cnn-scratch``: random
    weights trained fully on the source train split), running in ``out_dir``."""
    r = RECIPE
    return {
        "task": "fashion-mnist", "model": {"name": "fashion-cnn-scratch", "num_labels": 10},
        "data": {"dataset": "fashion-mnist"},
        "lora": {"targets": [], "full_finetune": True},
        "optim": {"lr": r["lr"], "batch_size": r["batch_size"], "max_steps": r["steps"], "warmup_steps": 50,
                  "schedule": "cosine", "weight_decay": 0.0},
        # on the CPU wherever it runs: the cached weights must not depend on the machine having a GPU
        "run": {"out_dir": str(out_dir), "seed": r["seed"], "eval_before": False, "log_every": 100, "device": "cpu"},
    }


def _pretrain(path: Path) -> None:
    """Train FashionCNN from scratch with the :data:`RECIPE` through the training loop and save it to ``path``."""
    pretrain_and_save(path, pretrain_config, RECIPE, "lorakit.models.fashion_cnn.pretrained_fashion_cnn")
