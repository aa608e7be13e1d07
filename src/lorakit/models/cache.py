"""Pretrained weights that lorakit trains itself on first use and then reads from a cache folder."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from torch import nn

from lorakit.formats.safetensors_io import read_safetensors, write_safetensors

#: Environment variable naming the cache folder.
CACHE_ENV = "LORAKIT_CACHE"

M = TypeVar("M", bound=nn.Module)


def cache_dir() -> Path:
    """Where pretrained weights are cached: ``$LORAKIT_CACHE``, else ``runs/pretrained`` of the checkout that holds
    this package (source layout), else ``~/.cache/lorakit``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    root = Path(__file__).resolve().parents[3]
    if (root / "pyproject.toml").is_file():
        return root / "runs" / "pretrained"
    return Path.home() / ".cache" / "lorakit"


def load_or_pretrain(model: M, file_name: str, cache: str | Path | None, train_if_missing: bool,
                     pretrain: Callable[[Path], None], what: str) -> M:
    """``model`` in eval mode with the weights of ``<cache>/<file_name>`` (default folder :func:`cache_dir`), loaded
    strictly; ``pretrain(path)`` writes that file first when it is absent.

    Raises:
        FileNotFoundError: the file is absent and ``train_if_missing`` is False (the message names ``what``).
    """
    path = (Path(cache) if cache is not None else cache_dir()) / file_name
    if not path.is_file():
        if not train_if_missing:
            raise FileNotFoundError(f"{path}: no pretrained {what} weights (train_if_missing=False)")
        pretrain(path)
    tensors, _ = read_safetensors(path)
    model.load_state_dict(tensors, strict=True)
    return model.eval()


def pretrain_and_save(path: Path, config: Callable[[str], dict], recipe: dict, trained_by: str) -> None:
    """Train from scratch with lorakit's own loop, on one thread, and write the model's weights to ``path``
    (atomically).

    Args:
        path: the safetensors file to write.
        config: run folder → the training config mapping (a full fine-tuning run of one process).
        recipe: what names the weights (seed, steps, …), kept in the metadata beside ``val_<metric>`` figures.
        trained_by: the function that asked, for the metadata.
    """
    import torch

    from lorakit.train import TrainConfig, train

    # The weights depend on the intra-op thread count (reductions are split differently), so pretraining always
    # runs on one thread: the cached file is then the same whatever the caller's setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="lorakit-pretrain-") as run_dir:
            result = train(TrainConfig.from_dict(config(run_dir)))
    finally:
        torch.set_num_threads(threads)
    assert result.model is not None  # single process
    tensors = {k: v.detach().contiguous() for k, v in result.model.state_dict().items()}
    metadata = {"recipe": json.dumps(recipe, sort_keys=True), "trained_by": trained_by,
                **{f"val_{k}": f"{v:.6f}" for k, v in result.final_metrics.items()}}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, path, metadata)
