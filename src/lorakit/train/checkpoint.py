"""Resumable checkpoints: trainable tensors, optimiser state and RNG in safetensors, the rest in JSON; never pickle.

Layout under ``<run>/checkpoints/``: one ``step-NNNNNNN/`` folder per checkpoint (``trainable.safetensors``,
``optimizer.safetensors``, ``state.json``), each file written atomically, and ``latest.json`` naming the newest
complete folder. The pointer is written last, so a crash mid-checkpoint leaves the previous one in force; older
folders are removed only after the pointer moved on.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import FileFormatError
from lorakit.formats.safetensors_io import atomic_write, read_safetensors, write_safetensors

POINTER = "latest.json"


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    text = json.dumps(data, indent=2, sort_keys=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))


def _optimizer_split(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser state_dict split into tensors (``state.<param>.<key>``) and JSON (everything else)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, entry in sd["state"].items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_join(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = t
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any]) -> Path:
    """Write a checkpoint of every trainable parameter, the optimiser, the torch RNG and ``state`` (JSON-ready).

    Returns:
        The checkpoint folder.
    """
    root = run_dir / "checkpoints"
    folder = root / f"step-{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    write_safetensors(trainable, folder / "trainable.safetensors")
    opt_tensors, opt_meta = _optimizer_split(optimizer)
    opt_tensors["rng.torch"] = torch.get_rng_state()
    write_safetensors(opt_tensors, folder / "optimizer.safetensors")
    write_json(folder / "state.json", {"step": step, "optimizer": opt_meta, **state})
    write_json(root / POINTER, {"step": step, "folder": folder.name})
    for old in root.glob("step-*"):
        if old.is_dir() and old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder ``latest.json`` points to, or None when the run has no checkpoint."""
    pointer = run_dir / "checkpoints" / POINTER
    if not pointer.is_file():
        return None
    try:
        folder = run_dir / "checkpoints" / json.loads(pointer.read_text(encoding="utf-8"))["folder"]
    except (ValueError, KeyError, TypeError) as e:
        raise FileFormatError(pointer, f"not a checkpoint pointer: {e}") from None
    if not (folder / "state.json").is_file():
        raise FileFormatError(folder, "checkpoint folder is incomplete (no state.json)")
    return folder


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Restore trainable parameters, optimiser and torch RNG from ``folder``; return its JSON state.

    Raises:
        FileFormatError: a file is missing or a tensor does not fit the model (named).
    """
    state_path = folder / "state.json"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise FileFormatError(state_path, f"cannot read checkpoint state: {e}") from None
    tensors, _ = read_safetensors(folder / "trainable.safetensors")
    params = dict(model.named_parameters())
    problems = [k for k in tensors if k not in params or params[k].shape != tensors[k].shape]
    missing = [n for n, p in params.items() if p.requires_grad and n not in tensors]
    if problems or missing:
        raise FileFormatError(folder / "trainable.safetensors",
                              f"does not fit the model: unknown or mis-shaped {problems}, missing {missing}")
    with torch.no_grad():
        for k, t in tensors.items():
            params[k].copy_(t)
    opt_tensors, _ = read_safetensors(folder / "optimizer.safetensors")
    torch.set_rng_state(opt_tensors.pop("rng.torch"))
    optimizer.load_state_dict(_optimizer_join(opt_tensors, state.pop("optimizer")))
    return state
