"""Resumable checkpoints: trained tensors, optimiser state and per-rank RNG in safetensors, the rest in JSON; never
pickle.

Layout under ``<run>/checkpoints/``: one ``step-NNNNNNN/`` folder per checkpoint (``trained.safetensors``,
``optimizer.safetensors``, ``rng.safetensors``, ``state.json``, and ``ema.safetensors`` for a run with
``optim.ema_decay``) and ``latest.json`` naming the newest one. A folder
is written aside (``.tmp-step-…``), renamed into place only once complete, and only then does the pointer move, so
a kill at any point leaves the previous checkpoint in force (or, inside the first one, no checkpoint at all) and
never a pointer to an incomplete folder. Older folders are removed after the pointer moved on; what a kill leaves
behind (temp folders, temp files, unreferenced step folders) is removed by :func:`remove_stale`.

"Trained tensors" are everything training changes: the adapter factors, and the parameters *and buffers* (e.g.
BatchNorm running statistics) of fully trained modules (:func:`lorakit.inject.trained_tensors`); for a full
fine-tune, the whole state dict.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import FileFormatError
from lorakit.formats import checked
from lorakit.formats.safetensors_io import atomic_write, read_safetensors, write_safetensors
from lorakit.inject import trained_tensors
from lorakit.layers.base import LoraFactors
from lorakit.train.ema import EMA

POINTER = "latest.json"
#: The moving average's file in a checkpoint folder.
EMA_FILE = "ema.safetensors"
#: Prefix of a checkpoint folder being written; such a folder is never read.
TMP_PREFIX = ".tmp-step-"


def write_json(path: Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    text = json.dumps(data, indent=2, sort_keys=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n", encoding="utf-8"))


def trained_state(model: nn.Module, full: bool = False) -> dict[str, torch.Tensor]:
    """The state-dict entries that training changes, keyed as in ``model.state_dict()`` (detached, not copied).

    Args:
        model: the bare model (not a DDP wrapper).
        full: a full fine-tune: every entry.
    """
    if full:
        return {k: t.detach() for k, t in model.state_dict().items()}
    out = trained_tensors(model)  # fully trained modules: parameters and buffers (BatchNorm running statistics)
    for path, m in model.named_modules():
        if isinstance(m, LoraFactors):
            out.update({f"{path}.{k}": t.detach() for k, t in m.state_dict().items()})
    # anything else the optimiser updates (nothing, when the two sets above cover the run as they should)
    out.update({n: p.detach() for n, p in model.named_parameters() if p.requires_grad and n not in out})
    return out


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG state: the CPU generator, and the CUDA generator of ``device`` when it is a GPU."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


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


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (where the platform allows opening a directory)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, tensors: Mapping[str, torch.Tensor],
                    optimizer: torch.optim.Optimizer, rng: list[dict[str, torch.Tensor]],
                    state: dict[str, Any], ema: Mapping[str, torch.Tensor] | None = None) -> Path:
    """Write a checkpoint: the trained ``tensors`` (see :func:`trained_state`), the optimiser, each rank's RNG
    state (``rng[r]`` from :func:`rng_state` on rank ``r``), ``state`` (JSON-ready) and the parameters' moving
    average ``ema`` when the run keeps one (``ema.safetensors``).

    Returns:
        The checkpoint folder.
    """
    root = run_dir / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    remove_stale(run_dir)
    # os.mkdir (not mkdtemp, which makes 0700 folders): the checkpoint keeps the caller's umask
    tmp = root / f"{TMP_PREFIX}{step:07d}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        write_safetensors(tensors, tmp / "trained.safetensors")
        opt_tensors, opt_meta = _optimizer_split(optimizer)
        write_safetensors(opt_tensors, tmp / "optimizer.safetensors")
        write_safetensors({f"{kind}.rank{rank}": t for rank, states in enumerate(rng) for kind, t in states.items()},
                          tmp / "rng.safetensors", {"world": str(len(rng))})
        if ema is not None:
            write_safetensors(ema, tmp / EMA_FILE)
        write_json(tmp / "state.json", {"step": step, "optimizer": opt_meta, **state})
        folder = _free_folder(root, step)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(root)
    write_json(root / POINTER, {"step": step, "folder": folder.name})
    for old in root.glob("step-*"):
        if old.is_dir() and old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def _free_folder(root: Path, step: int) -> Path:
    """``step-NNNNNNN``, or ``step-NNNNNNN-k`` when that name is taken (a step saved again on resume): a complete
    folder is never renamed over, so the pointer never names a folder that is momentarily absent."""
    folder, k = root / f"step-{step:07d}", 0
    while folder.exists():
        k += 1
        folder = root / f"step-{step:07d}-{k}"
    return folder


def remove_stale(run_dir: Path) -> list[Path]:
    """Remove what a killed run left behind: temp files of atomic writes in the run folder and in ``checkpoints/``,
    checkpoint folders being written (``.tmp-step-*``) and step folders the pointer does not name (e.g. a first
    checkpoint killed before its pointer was written).

    Returns:
        The removed paths.
    """
    root = run_dir / "checkpoints"
    removed: list[Path] = []
    keep = None
    if (root / POINTER).is_file():
        keep = _pointed(root / POINTER).name
    for folder in (run_dir, root):
        if not folder.is_dir():
            continue
        for p in folder.iterdir():
            stale = (p.is_file() and _temp_file(p.name)) or \
                    (folder == root and p.is_dir() and (p.name.startswith(TMP_PREFIX) or
                                                        (p.name.startswith("step-") and p.name != keep)))
            if stale:
                shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
                removed.append(p)
    return removed


def _temp_file(name: str) -> bool:
    """A temporary file of an atomic write (``.lorakit-tmp.<name>.<pid>.<tag>``, or the older ``.<name>.<tag>.tmp``);
    only the run's own main process writes into its folder, so any such file is a killed write's."""
    return name.startswith(".lorakit-tmp.") or (name.startswith(".") and name.endswith(".tmp"))


#: ``latest.json``: the step and the name of its folder (a bare ``step-*`` name, never a path).
_POINTER_SCHEMA = checked.Obj(required={"step": checked.Int(lo=0),
                                        "folder": checked.Str(pattern=r"step-[0-9]+(-[0-9]+)?")})
#: ``state.json``: the step, the optimiser's JSON half and the loop's own state (checked where it is used).
_STATE_SCHEMA = checked.Obj(
    required={"step": checked.Int(lo=0),
              "optimizer": checked.Obj(required={"param_groups": checked.List(), "scalars": checked.Map()})},
    # an fp16 run's gradient scaler (torch.amp.GradScaler.state_dict)
    optional={"scaler": checked.Obj(required={"scale": checked.Num(positive=True),
                                              "growth_factor": checked.Num(positive=True),
                                              "backoff_factor": checked.Num(positive=True),
                                              "growth_interval": checked.Int(lo=1),
                                              "_growth_tracker": checked.Int(lo=0)})})


def _pointed(pointer: Path) -> Path:
    return pointer.parent / checked.load_file(pointer, _POINTER_SCHEMA, "checkpoint pointer")["folder"]


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The folder ``latest.json`` points to, or None when the run has no complete checkpoint.

    Raises:
        FileFormatError: the pointer is malformed or names a folder that is not a complete checkpoint.
    """
    pointer = run_dir / "checkpoints" / POINTER
    if not pointer.is_file():
        return None
    folder = _pointed(pointer)
    if not (folder / "state.json").is_file():
        raise FileFormatError(folder, "checkpoint folder is incomplete (no state.json)")
    return folder


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, *, full: bool = False,
                    rank: int = 0, device: torch.device | None = None, ema: EMA | None = None) -> dict[str, Any]:
    """Restore the trained tensors, the optimiser, rank ``rank``'s RNG and (for a run that keeps one) the moving
    average ``ema`` from ``folder``; return its JSON state.

    Args:
        folder: a complete checkpoint folder.
        model: the bare model, built as for the run that saved it.
        optimizer: its optimiser.
        full: a full fine-tune (see :func:`trained_state`).
        rank: this process's rank.
        device: this process's device (the CUDA RNG is restored on a GPU).

    Raises:
        FileFormatError: a file is missing, a tensor does not fit the model, or no RNG state for ``rank`` (named).
    """
    state = checked.load_file(folder / "state.json", _STATE_SCHEMA, "checkpoint state")
    path = folder / "trained.safetensors"
    tensors, _ = read_safetensors(path)
    targets = model.state_dict(keep_vars=True)
    expected = trained_state(model, full)
    problems = [k for k in tensors if k not in targets or targets[k].shape != tensors[k].shape]
    missing = [k for k in expected if k not in tensors]
    if problems or missing:
        raise FileFormatError(path, f"does not fit the model: unknown or mis-shaped {problems}, missing {missing}")
    with torch.no_grad():
        for k, t in tensors.items():
            targets[k].copy_(t)
    rng_path = folder / "rng.safetensors"
    rng, meta = read_safetensors(rng_path)
    if f"torch.rank{rank}" not in rng:
        raise FileFormatError(rng_path, f"no key 'torch.rank{rank}': the run was saved by {meta.get('world', '?')} "
                                        "process(es); resume it with as many")
    torch.set_rng_state(rng[f"torch.rank{rank}"])
    if device is not None and device.type == "cuda" and f"cuda.rank{rank}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.rank{rank}"], device)
    if ema is not None:
        ema_path = folder / EMA_FILE
        if not ema_path.is_file():
            raise FileFormatError(folder, f"no {EMA_FILE}: the run was started without optim.ema_decay")
        bad = ema.load(read_safetensors(ema_path)[0])
        if bad:
            raise FileFormatError(ema_path, f"does not fit the trained parameters: unknown, missing or mis-shaped "
                                            f"{bad[:8]}{' …' if len(bad) > 8 else ''}")
    opt_tensors, _ = read_safetensors(folder / "optimizer.safetensors")
    optimizer.load_state_dict(_optimizer_join(opt_tensors, state.pop("optimizer")))
    return state
