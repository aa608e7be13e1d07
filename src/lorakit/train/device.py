"""Where a run computes: the device that ``run.device`` and the launcher's ``LOCAL_RANK`` name, and moving batches.

``auto`` picks ``cuda:{LOCAL_RANK}`` when CUDA is available (one GPU per process under ``torchrun``), else the CPU;
``cuda`` means ``cuda:{LOCAL_RANK}``; ``cuda:N`` and ``cpu`` are taken as written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lorakit.train.config import DEVICE_PATTERN, ConfigError


def local_rank(env: Mapping[str, str] | None = None) -> int:
    """This process's rank on its machine, from ``LOCAL_RANK`` (set by ``torchrun`` / ``accelerate``); 0 alone.

    Raises:
        ConfigError: ``LOCAL_RANK`` is not a non-negative integer.
    """
    text = (os.environ if env is None else env).get("LOCAL_RANK", "0")
    if not text.isdigit():
        raise ConfigError(f"environment variable LOCAL_RANK: expected an int >= 0, got {text!r}")
    return int(text)


def resolve_device(setting: str = "auto", env: Mapping[str, str] | None = None) -> torch.device:
    """The device a run with ``run.device = setting`` uses in this process.

    Args:
        setting: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        env: the environment to read ``LOCAL_RANK`` from (default ``os.environ``).

    Raises:
        ConfigError: an unknown spelling, or a CUDA device that this machine does not have (named).
    """
    if not isinstance(setting, str) or not DEVICE_PATTERN.fullmatch(setting):
        raise ConfigError(f"config field 'run.device': expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {setting!r}")
    if setting == "cpu":
        return torch.device("cpu")
    available = torch.cuda.is_available()
    if setting == "auto":
        return torch.device("cuda", local_rank(env)) if available else torch.device("cpu")
    if not available:
        raise ConfigError(f"config field 'run.device': {setting!r}, but CUDA is not available on this machine")
    index = local_rank(env) if setting == "cuda" else int(setting.split(":")[1])
    count = torch.cuda.device_count()
    if index >= count:
        source = "LOCAL_RANK" if setting == "cuda" else "the index"
        raise ConfigError(f"config field 'run.device': {setting!r} asks for cuda:{index} ({source}), but this "
                          f"machine has {count} CUDA device(s)")
    return torch.device("cuda", index)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (through nested dicts, lists and tuples) moved to ``device``.

    Other values pass through unchanged; containers are rebuilt, so the caller's batch is not modified.
    """
    if isinstance(batch, torch.Tensor):
        # host → GPU may overlap the compute (stream-ordered, so safe); a copy back to the host must not, or the
        # caller could read it before it lands
        return batch.to(device, non_blocking=device.type == "cuda")
    if isinstance(batch, Mapping):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple keeps its type
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (or buffer); the CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
