"""Pretrained weights that lorakit trains itself on first use and then reads from a cache folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from torch import nn

from lorakit.formats.safetensors_io import read_safetensors

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
