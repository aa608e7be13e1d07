"""Process-group helpers: single process, or DDP under ``torchrun`` (gloo on the CPU, NCCL on CUDA devices).

The backend follows the run's device, not the machine: a CPU run on a GPU machine still uses gloo, and NCCL only
ever sees tensors on this process's own GPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from lorakit.train.device import resolve_device


@dataclass(frozen=True)
class Dist:
    """Where this process stands: ``rank`` of ``world`` processes, computing on ``device``."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    distributed: bool = False
    """A process group is up (also with one process): the model is wrapped in DDP and metrics are all-reduced."""

    @property
    def main(self) -> bool:
        """Only the main process writes files."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            # NCCL's barrier must be told which GPU is ours, or it guesses from the rank
            dist.barrier(device_ids=[self.device.index]) if self.device.type == "cuda" else dist.barrier()

    def mean(self, value: float) -> float:
        """The mean of ``value`` over all processes (all-reduced on this process's device: NCCL needs a GPU
        tensor)."""
        if not self.distributed:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t.item()) / self.world

    def gather(self, obj: Any) -> list[Any] | None:
        """Every process's ``obj`` in rank order on the main process (None elsewhere); ``[obj]`` alone."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out if self.main else None


def backend(device: torch.device) -> str:
    """The process-group backend for a run on ``device``: ``nccl`` on CUDA, ``gloo`` on the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def setup(device: str = "auto") -> Dist:
    """Resolve the run's device and join the process group ``torchrun`` described in the environment (or the one
    already initialised, whatever its size).

    Args:
        device: the ``run.device`` setting (see :func:`lorakit.train.device.resolve_device`).

    Raises:
        ConfigError: a device this machine does not have.
    """
    where = resolve_device(device)
    joined = dist.is_available() and dist.is_initialized()
    if not joined and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return Dist(device=where)
    if where.type == "cuda":
        # object collectives (the RNG gather) and NCCL's own buffers use the current device: make it ours
        torch.cuda.set_device(where)
    if not joined:
        dist.init_process_group(backend(where))
    return Dist(dist.get_rank(), dist.get_world_size(), where, True)
