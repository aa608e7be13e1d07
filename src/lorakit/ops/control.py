"""Run-time strengths per block or part on an injected model, LBW export, and baking strengths into data.

Switching goes through :func:`lorakit.inject.set_strength`: it touches only the affected modules' ``strength`` and
never merges. Baking puts a strength into alpha only, never into the factors.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from lorakit.adapter import Adapter
from lorakit.blocks import block_of, block_vocabulary, detect_family, format_lbw, parse_lbw, vocabulary
from lorakit.errors import AdapterStateError, LorakitError
from lorakit.inject import lora_layers, set_strength


def _strengths(spec: Mapping[str, float] | str, family: str, paths: list[str]) -> dict[str, float]:
    """Block → strength from a mapping or an LBW string, refusing block names the family does not have."""
    values = parse_lbw(spec, family) if isinstance(spec, str) else {k: float(v) for k, v in spec.items()}
    known = block_vocabulary(family, paths)
    unknown = sorted(b for b in values if b not in known)
    if unknown:
        raise LorakitError(f"unknown block(s) {unknown} for family {family!r} (blocks: {', '.join(known)})")
    return values


def _adapter_paths(model: nn.Module, name: str) -> list[str]:
    paths = [p for p, layer in lora_layers(model) if name in layer.lora]
    if not paths:
        raise AdapterStateError(f"model has no adapter named {name!r}")
    return paths


def set_block_strengths(model: nn.Module, strengths: Mapping[str, float] | str, name: str = "default",
                        family: str | None = None) -> int:
    """Set the strength of adapter ``name`` per block: ``{"IN04": 0.5, "OUT03": 0}`` or an LBW string.

    Blocks not mentioned keep their strength. Returns the number of layers changed.

    Raises:
        LorakitError: a block name outside the family's vocabulary.
    """
    paths = _adapter_paths(model, name)
    family = family or detect_family(paths)
    values = _strengths(strengths, family, paths)
    by_block: dict[str, list[str]] = {}
    for p in paths:
        by_block.setdefault(block_of(p, family), []).append(p)
    by_value: dict[float, list[str]] = {}  # one model walk per distinct strength, not per block
    for block, value in values.items():
        by_value.setdefault(value, []).extend(by_block.get(block, []))
    return sum(set_strength(model, name, v, paths) for v, paths in by_value.items() if paths)


def set_part_strengths(model: nn.Module, strengths: Mapping[str, float]) -> int:
    """Set the strength of parts attached with :func:`lorakit.ops.join.attach_split` (part name → strength)."""
    return sum(set_strength(model, part, float(w)) for part, w in strengths.items())


def block_strengths(model: nn.Module, name: str = "default", family: str | None = None) -> dict[str, float]:
    """Current strength of each block of adapter ``name``.

    Raises:
        AdapterStateError: layers of one block have different strengths (not expressible per block).
    """
    layers = [(p, layer.lora[name]) for p, layer in lora_layers(model) if name in layer.lora]
    if not layers:
        raise AdapterStateError(f"model has no adapter named {name!r}")
    family = family or detect_family([p for p, _ in layers])
    out: dict[str, float] = {}
    for p, f in layers:
        b = block_of(p, family)
        if b in out and out[b] != f.strength:
            raise AdapterStateError(f"block {b!r} has mixed strengths ({out[b]:g} and {f.strength:g} at {p!r})")
        out[b] = f.strength
    return out


def export_lbw(model: nn.Module, name: str = "default", family: str | None = None, size: int | None = None) -> str:
    """The per-block strengths of adapter ``name`` as an LBW string (blocks without modules read 1).

    Args:
        size: vocabulary size (17/26 for SD1.5, 12/20 for SDXL); default the full one (26 or 20).
    """
    strengths = block_strengths(model, name, family)
    family = family or detect_family(_adapter_paths(model, name))
    if family not in ("sd15", "sdxl"):
        raise LorakitError(f"LBW strings exist for sd15 and sdxl only, not {family!r}")
    names = vocabulary(family, size or (26 if family == "sd15" else 20))
    lost = sorted(b for b, v in strengths.items() if b not in names and v != 1.0)
    if lost:
        raise LorakitError(f"blocks {lost} have strengths but are not in the {len(names)}-block vocabulary")
    return format_lbw(strengths, names)


def bake_strengths(adapter: Adapter, strengths: Mapping[str, float] | str, family: str | None = None) -> Adapter:
    """A copy of ``adapter`` with per-block strengths folded into each module's alpha (factors untouched).

    Args:
        strengths: block → strength, or an LBW string; blocks not mentioned keep strength 1.

    Raises:
        LorakitError: a block name outside the family's vocabulary; a strength other than 1 on a block with DoRA
            modules (a DoRA strength scales the whole DoRA delta, which alpha cannot express).
    """
    family = family or detect_family(adapter.paths)
    values = _strengths(strengths, family, adapter.paths)
    out = adapter
    for block, value in values.items():
        paths = [p for p in adapter.paths if block_of(p, family) == block]
        dora = [p for p in paths if adapter.modules[p].magnitude is not None]
        if dora and value != 1.0:
            raise LorakitError(f"block {block!r}: strength {value:g} on DoRA module(s) {dora[:3]} cannot be baked "
                               f"into alpha; merge with that strength instead")
        if paths and value != 1.0:
            out = out.scaled(value, paths)
    return out
