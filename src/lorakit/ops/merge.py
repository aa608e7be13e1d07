"""Bake an adapter into a base model's state dict (a pure function) and save the merged weights."""

from __future__ import annotations

import os
from collections.abc import Mapping

from torch import Tensor

from lorakit.adapter import Adapter
from lorakit.errors import LorakitError
from lorakit.formats.safetensors_io import write_safetensors


def merge_state_dict(state: Mapping[str, Tensor], adapter: Adapter, strength: float = 1.0,
                     prefix: str = "") -> dict[str, Tensor]:
    """A new state dict with ``W + strength·ΔW`` for every adapted module and overrides copied in.

    Args:
        state: base weights; ``<prefix><module>.weight`` must exist for every adapter module.
        adapter: the adapter; DoRA modules use their base weight.
        strength: multiplier of every update: into alpha for plain LoRA; for DoRA, of the whole DoRA delta
            (``W + t·(DoRA(W) − W)``, as the runtime layer applies a DoRA strength).
        prefix: prepended to adapter paths to find state keys (e.g. ``"unet."``).

    Raises:
        LorakitError: listing every missing key and shape mismatch.
    """
    plain = [p for p, m in adapter.modules.items() if m.magnitude is None]
    adapter = adapter.scaled(strength, plain) if strength != 1.0 else adapter
    problems = []
    out = dict(state)
    for path, m in adapter.modules.items():
        key = f"{prefix}{path}.weight"
        if key not in state:
            problems.append(f"{key!r}: not in the base state dict")
            continue
        w = state[key]
        if tuple(w.shape) != m.weight_shape:
            problems.append(f"{key!r}: base has shape {tuple(w.shape)}, adapter expects {m.weight_shape}")
            continue
        delta = m.delta(w.to(m.A.dtype))
        if m.magnitude is not None and strength != 1.0:
            delta = delta * strength
        out[key] = (w.double() + delta.double()).to(w.dtype)
    for key, t in adapter.overrides.items():
        full = prefix + key
        if full not in state:
            problems.append(f"override {full!r}: not in the base state dict")
        elif state[full].shape != t.shape:
            problems.append(f"override {full!r}: base has shape {tuple(state[full].shape)}, adapter "
                            f"{tuple(t.shape)}")
        else:
            out[full] = t.to(state[full].dtype)
    if problems:
        raise LorakitError("cannot merge adapter into base weights: " + "; ".join(problems))
    return out


def save_merged(state: Mapping[str, Tensor], adapter: Adapter, path: str | os.PathLike, strength: float = 1.0,
                prefix: str = "", metadata: Mapping[str, str] | None = None) -> None:
    """Merge (see :func:`merge_state_dict`) and write the merged weights to ``path`` as safetensors, atomically."""
    write_safetensors(merge_state_dict(state, adapter, strength, prefix), path, metadata)
