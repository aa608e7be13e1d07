"""Join split parts back into one adapter, and load or attach only some parts.

``join(split)`` of a complete union split is bitwise equal to the parent; of a complete rank-band split it has the
parent's update (to float rounding) in a re-orthogonalised basis. Joining only some parts gives the adapter those
parts describe: a subset of modules (union), or the best approximation of the summed band rank (rank bands).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import replace

import torch
from torch import nn

from lorakit.adapter import Adapter, ModuleLora, lora_scale
from lorakit.blocks import Selector, block_of, detect_family, parse_lbw
from lorakit.errors import LorakitError
from lorakit.formats import native
from lorakit.inject import attach, set_strength
from lorakit.ops.lowrank import alpha_for_scale
from lorakit.ops.package import load_split
from lorakit.ops.split import Split


def join(split: Split, partial: bool = False) -> Adapter:
    """Recombine the parts of ``split`` into one adapter with the parent's order, fields and metadata.

    Args:
        split: a split (from :func:`lorakit.ops.split.split` or :func:`lorakit.ops.package.load_split`).
        partial: allow parts to be missing (the result then holds what the given parts hold).

    Raises:
        LorakitError: a module in two parts of a union split, a module or override unknown to the parent (or of
            another kind, or a rank the parent's does not allow), bands of one module whose shapes or dtypes
            differ, or (unless ``partial``) a parent module or override that no part holds.
        AdapterValidationError: the joined adapter is inconsistent (shapes, NaN/inf), naming each module.
    """
    parent = split.parent
    mods: dict[str, list[ModuleLora]] = {}
    overrides: dict[str, torch.Tensor] = {}
    problems = []
    for part in split.parts:
        for path, m in part.adapter.modules.items():
            if path not in parent.modules:
                problems.append(f"part {part.name!r}: module {path!r} is not in the parent")
            elif m.kind != parent.modules[path][0]:
                problems.append(f"part {part.name!r}: module {path!r} is {m.kind}, the parent's is "
                                f"{parent.modules[path][0]}")
            elif split.recombine == "union" and path in mods:
                problems.append(f"module {path!r} is in more than one part of a union split")
            elif split.recombine == "union" and m.rank != parent.modules[path][1]:
                problems.append(f"part {part.name!r}: module {path!r} has rank {m.rank}, the parent's has "
                                f"{parent.modules[path][1]}")
            mods.setdefault(path, []).append(m)
        for key, t in part.adapter.overrides.items():
            if key not in parent.overrides:
                problems.append(f"part {part.name!r}: override {key!r} is not in the parent")
            elif key in overrides:
                problems.append(f"override {key!r} is in more than one part")
            overrides[key] = t
    if not partial:
        problems += [f"module {p!r} of the parent is in no part" for p in parent.modules if p not in mods]
        problems += [f"override {k!r} of the parent is in no part" for k in parent.overrides if k not in overrides]
    if split.recombine != "union":
        problems += [p for path, pieces in mods.items() if path in parent.modules
                     for p in _band_problems(path, pieces, parent.modules[path][1])]
    if problems:
        raise LorakitError("cannot join split: " + "; ".join(problems))
    joined = {}
    for path in parent.modules:
        if path not in mods:
            continue
        pieces = mods[path]
        joined[path] = pieces[0] if split.recombine == "union" else _concat_bands(pieces, parent.modules[path])
    over = {k: overrides[k] for k in parent.overrides if k in overrides}
    adapter = Adapter(joined, over, base_model=parent.base_model, targets=tuple(parent.targets),
                      metadata=dict(parent.metadata))
    return adapter.validate("joined split")


def _band_problems(path: str, pieces: list[ModuleLora], rank: int) -> list[str]:
    """Why the rank bands ``pieces`` of module ``path`` cannot be concatenated into one module of the parent's
    ``rank`` (empty when they can): different in/out shapes, dtypes or kinds, or more rank than the parent's."""
    first = pieces[0]
    out = [f"module {path!r}: band {i} has A {tuple(m.A.shape)} / B {tuple(m.B.shape)} ({m.A.dtype}) but band 0 has "
           f"A {tuple(first.A.shape)} / B {tuple(first.B.shape)} ({first.A.dtype})"
           for i, m in enumerate(pieces[1:], 1)
           if m.A.shape[1:] != first.A.shape[1:] or m.B.shape[0] != first.B.shape[0] or m.A.dtype != first.A.dtype
           or m.B.dtype != first.B.dtype or m.kind != first.kind]
    total = sum(m.rank for m in pieces)
    if total > rank:  # bands split the SVD of the parent's update, whose rank is at most the parent's rank
        out.append(f"module {path!r}: its bands add up to rank {total}, more than the parent's rank {rank}")
    return out


def _concat_bands(pieces: list[ModuleLora], info: tuple[str, int, float, bool]) -> ModuleLora:
    """Rank bands of one module → one module with the parent's scale (bands with another scale are rescaled in A)."""
    _, rank, alpha, rslora = info
    scale = lora_scale(alpha, rank, rslora)
    a_parts = []
    for m in pieces:
        ratio = m.scale / scale if scale != 0 else 1.0
        a_parts.append(m.A if ratio == 1.0 else m.A * ratio)
    A = torch.cat(a_parts, dim=0)
    B = torch.cat([m.B for m in pieces], dim=1)
    total = int(A.shape[0])
    return replace(pieces[0], A=A, B=B, alpha=alpha_for_scale(scale, total, rslora))


def recombine(split: Split, weights: Mapping[str, float] | str, partial: bool = False) -> Adapter:
    """Join the parts of ``split`` with a weight each, the weight going into alpha (factors untouched).

    Args:
        split: any split.
        weights: part name → weight (parts not named keep their default weight), or, for a block split of an SD
            family, an LBW string (block parts take the block's strength).
        partial: as in :func:`join`.

    Raises:
        LorakitError: a weight names no part.
    """
    if isinstance(weights, str):
        if split.family not in ("sd15", "sdxl"):
            raise LorakitError(f"an LBW string needs a block split of sd15 or sdxl, not {split.family!r}")
        weights = {b: w for b, w in parse_lbw(weights, split.family).items() if b in split.names}
    unknown = sorted(set(weights) - set(split.names))
    if unknown:
        raise LorakitError(f"weights for unknown part(s) {unknown} (parts: {', '.join(split.names)})")
    parts = []
    for part in split.parts:
        w = float(weights.get(part.name, part.default_weight))
        parts.append(part if w == 1.0 or not len(part.adapter) else replace(part, adapter=part.adapter.scaled(w)))
    return join(replace(split, parts=tuple(parts)), partial=partial)


def load_parts(folder: str | os.PathLike, names: Iterable[str] | None = None,
               tags: Iterable[str] | None = None) -> Adapter:
    """The adapter made of the chosen parts of a split package, reading (and hash-checking) only their files."""
    return join(load_split(folder, names, tags), partial=names is not None or tags is not None)


def load_selected(path: str | os.PathLike, selector: str | Selector | None = None, *,
                  blocks: Iterable[str] | None = None, family: str | None = None) -> Adapter:
    """Some modules of one unsplit native file, reading only their bytes (overrides are not read).

    Args:
        path: a native lorakit file.
        selector: patterns with ``!`` exclusions (see :class:`lorakit.blocks.Selector`).
        blocks: keep only modules in these blocks of ``family`` (default: detected).

    Raises:
        LorakitError: nothing is selected.
    """
    paths = list(native.read_info(path)["modules"])
    if selector is not None:
        sel = selector if isinstance(selector, Selector) else Selector.parse(selector)
        paths = sel.select(paths)
    if blocks is not None:
        wanted = set(blocks)
        fam = family or detect_family(paths)
        paths = [p for p in paths if block_of(p, fam) in wanted]
    if not paths:
        raise LorakitError(f"{path}: selector {selector!r} / blocks {blocks!r} select no module")
    return native.load(path, modules=paths)


def attach_parts(model: nn.Module, folder: str | os.PathLike, names: Iterable[str] | None = None,
                 tags: Iterable[str] | None = None, name: str = "default") -> list[str]:
    """Attach the chosen parts of a split package to ``model`` as one adapter ``name``; returns module paths."""
    return attach(model, load_parts(folder, names, tags), name)


def attach_split(model: nn.Module, folder: str | os.PathLike, names: Iterable[str] | None = None,
                 tags: Iterable[str] | None = None) -> list[str]:
    """Attach each chosen part as its own adapter, named as the part, at the part's default weight.

    Each part's strength can then be changed at run time with ``set_strength(model, part_name, w)``; this also
    works for rank bands, which share modules. Returns the adapter names attached.
    """
    split = load_split(folder, names, tags)
    for part in split.parts:
        attach(model, part.adapter, part.name)
        if part.default_weight != 1.0 and len(part.adapter):
            set_strength(model, part.name, part.default_weight)
    return split.names
