"""Split an adapter into named parts, each a valid standalone adapter; pure functions, inputs never modified.

Two kinds of split, told apart by how the parts recombine:

* **union** (component, block, module type, selector, size): every module goes, untouched, into exactly one part;
  overrides go with the part of their module (or a part of their own). Joining is bitwise exact.
* **concat_rank** (rank bands): every module is re-orthogonalised from its factors (:func:`factor_svd`) and its
  energy-ordered singular directions are cut into bands. Band k of a module holds ``U_k√S_k`` / ``√S_k V_kᵀ`` with
  alpha set so its scale equals the parent's, so the bands' updates sum to the parent's update and every prefix of
  bands is the best approximation of its rank (Eckart–Young). Overrides go into the first band.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from torch import Tensor

from lorakit.adapter import Adapter, ModuleLora
from lorakit.blocks import OTHER, Selector, block_of, detect_family, group_by_block
from lorakit.errors import LorakitError
from lorakit.ops.lowrank import energies, factor_svd, module_from_svd

MODES = ("component", "block", "type", "selector", "size", "rank")
MODULE_TYPES = ("embedding", "conv", "cross_attn", "self_attn", "mlp", "other")


@dataclass(frozen=True)
class ParentInfo:
    """What a split remembers of its parent, enough to join the parts back exactly.

    Attributes:
        modules: module path → (kind, rank, alpha, rslora), in the parent's order.
        overrides: override keys in the parent's order.
        base_model, targets, metadata: the parent's fields.
        sha256: hash of the parent file, when the split was made from one.
    """

    modules: Mapping[str, tuple[str, int, float, bool]]
    overrides: tuple[str, ...] = ()
    base_model: str | None = None
    targets: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    sha256: str | None = None

    @classmethod
    def of(cls, adapter: Adapter, sha256: str | None = None) -> ParentInfo:
        mods = {p: (m.kind, m.rank, m.alpha, m.rslora) for p, m in adapter.modules.items()}
        return cls(mods, tuple(adapter.overrides), adapter.base_model, tuple(adapter.targets),
                   dict(adapter.metadata), sha256)


@dataclass(frozen=True)
class Part:
    """One piece of a split.

    Attributes:
        name: unique name, also the file stem.
        adapter: the part as a standalone adapter.
        selector: what made it (``block:sd15:IN04``, ``type:mlp``, ``rank:0-4``, a selector string...).
        tags: free labels to load parts by (``style``, ``content``, the family, the module type...).
        default_weight: the strength this part is attached with unless told otherwise.
        rank_range: module path → (first, last+1) singular direction it holds (rank bands); (0, r) otherwise.
        energy: share of the parent's total ‖ΔW‖²_F in this part.
        retained_energy: share held by this part and all earlier ones (for rank bands, the prefix's).
    """

    name: str
    adapter: Adapter
    selector: str
    tags: tuple[str, ...] = ()
    default_weight: float = 1.0
    rank_range: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    energy: float = 0.0
    retained_energy: float = 0.0


@dataclass(frozen=True)
class Split:
    """An adapter cut into parts.

    Attributes:
        mode: one of :data:`MODES`.
        recombine: ``union`` (modules are disjoint across parts) or ``concat_rank`` (bands of the same modules).
        parts: the parts, in order.
        parent: what is needed to join them back.
        family: the block family used, if any.
    """

    mode: str
    recombine: str
    parts: tuple[Part, ...]
    parent: ParentInfo
    family: str | None = None

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.parts]

    def part(self, name: str) -> Part:
        for p in self.parts:
            if p.name == name:
                return p
        raise LorakitError(f"split has no part named {name!r} (parts: {', '.join(self.names)})")


def module_energy(m: ModuleLora) -> float:
    """‖scale·B·A‖²_F from the factors (see :meth:`ModuleLora.delta_norm`)."""
    return m.delta_norm() ** 2


def _union_split(adapter: Adapter, mode: str, assign: Callable[[str, ModuleLora | None], str],
                 order: Sequence[str] = (), selector: Callable[[str], str] | None = None,
                 tags: Callable[[str], tuple[str, ...]] = lambda name: (), family: str | None = None,
                 sha256: str | None = None, assign_override: Callable[[str], str] | None = None) -> Split:
    """Group modules with ``assign``, parts in ``order`` then first seen.

    Overrides go with ``assign_override(key)`` if given, else with ``assign`` of their module path.
    """
    groups: dict[str, tuple[list[str], list[str]]] = {n: ([], []) for n in order}
    for path, m in adapter.modules.items():
        groups.setdefault(assign(path, m), ([], []))[0].append(path)
    for key in adapter.overrides:
        owner = key.rpartition(".")[0] or key
        name = assign_override(key) if assign_override else assign(owner, adapter.modules.get(owner))
        groups.setdefault(name, ([], []))[1].append(key)
    energy = {p: module_energy(m) for p, m in adapter.modules.items()}
    total = sum(energy.values()) or 1.0
    parts, running = [], 0.0
    for name, (paths, keys) in groups.items():
        if not paths and not keys:
            continue
        sub = replace(adapter, modules={p: adapter.modules[p] for p in paths},
                      overrides={k: adapter.overrides[k] for k in keys})
        share = sum(energy[p] for p in paths) / total
        running += share
        sel = selector(name) if selector else f"{mode}:{name}"
        parts.append(Part(name, sub, sel, tags(name), 1.0, {p: (0, adapter.modules[p].rank) for p in paths},
                          share, running))
    return Split(mode, "union", tuple(parts), ParentInfo.of(adapter, sha256), family)


def split_by_component(adapter: Adapter, sha256: str | None = None) -> Split:
    """One part per top-level module (``text_encoder``, ``text_encoder_2``, ``unet``, ``bert``, ``classifier``...)."""
    return _union_split(adapter, "component", lambda path, m: path.split(".")[0],
                        tags=lambda name: ("component", name), sha256=sha256)


def split_by_block(adapter: Adapter, family: str | None = None, sha256: str | None = None) -> Split:
    """One part per block of ``family`` (default: detected from the paths); see :mod:`lorakit.blocks`.

    With ``family="blora"`` the parts are B-LoRA's ``content`` and ``style`` blocks (tagged so) and ``OTHER``.
    """
    family = family or detect_family(adapter.paths)
    order = list(group_by_block(adapter.paths, family))

    def tags(name: str) -> tuple[str, ...]:
        return (family, name) if name != OTHER else (family, "other")

    return _union_split(adapter, "block", lambda path, m: block_of(path, family), order,
                        selector=lambda name: f"block:{family}:{name}", tags=tags, family=family,
                        sha256=sha256)


def module_type(path: str, m: ModuleLora | None) -> str:
    """Self-attention, cross-attention, MLP/feed-forward, conv, embedding or other, from kind and path.

    Cross-attention: ``attn2`` (SD), ``crossattention`` (BERT decoders), ``encoder_attn`` / ``EncDecAttention``.
    Self-attention: ``attn1``, ``attn``, ``self_attn``, ``attention``. MLP: ``ff``, ``mlp``, ``intermediate``,
    BERT's FFN ``output.dense`` (outside ``attention``), ``fc1``/``fc2``, ``c_fc``.
    """
    if m is not None and m.kind == "embedding":
        return "embedding"
    if m is not None and m.kind in ("conv1d", "conv2d"):
        return "conv"
    segs = path.lower().split(".")
    if {"attn2", "crossattention", "encoder_attn", "encdecattention"} & set(segs):
        return "cross_attn"
    if {"attn1", "attn", "self_attn", "attention", "self_attention", "selfattention"} & set(segs):
        return "self_attn"
    if {"ff", "mlp", "intermediate", "fc1", "fc2", "c_fc", "feed_forward"} & set(segs):
        return "mlp"
    if len(segs) >= 2 and segs[-2:] == ["output", "dense"]:
        return "mlp"
    if m is None and {"embeddings", "embed_tokens", "wte", "wpe"} & set(segs):
        return "embedding"
    return "other"


def split_by_type(adapter: Adapter, sha256: str | None = None) -> Split:
    """One part per module type (see :func:`module_type`), in the order of :data:`MODULE_TYPES`."""
    return _union_split(adapter, "type", module_type, MODULE_TYPES, tags=lambda name: ("type", name),
                        sha256=sha256)


def split_by_selectors(adapter: Adapter, selectors: Mapping[str, str | Selector], rest: str = "rest",
                       sha256: str | None = None) -> Split:
    """Parts named by the user, each taking the modules its selector matches (first matching selector wins).

    Args:
        selectors: part name → selector (``"layer.*.attention.*, !layer.0.*"``, see :class:`Selector`).
        rest: name of the part that takes every module no selector matches.
    """
    if rest in selectors:
        raise LorakitError(f"selector part name {rest!r} is reserved for the unmatched modules")
    parsed = {n: (s if isinstance(s, Selector) else Selector.parse(s)) for n, s in selectors.items()}

    def assign(path: str, m: ModuleLora | None) -> str:
        return next((n for n, s in parsed.items() if s(path)), rest)

    unmatched = "rest: none of " + "; ".join(str(s) for s in parsed.values())
    return _union_split(adapter, "selector", assign, list(parsed),
                        lambda name: str(parsed[name]) if name in parsed else unmatched,
                        tags=lambda name: ("selector",), sha256=sha256)


def split_by_size(adapter: Adapter, max_bytes: int, sha256: str | None = None) -> Split:
    """Shards of at most ``max_bytes`` tensor bytes each, cut at module boundaries, in module order.

    A module (or override) larger than the budget gets a shard of its own, which is then over the budget.
    """
    if max_bytes <= 0:
        raise LorakitError(f"size budget must be positive, got {max_bytes}")
    items = [(p, m.nbytes) for p, m in adapter.modules.items()]
    items += [(f"override:{k}", t.numel() * t.element_size()) for k, t in adapter.overrides.items()]
    shard_of: dict[str, str] = {}
    index, used = 0, 0
    for key, size in items:
        if used and used + size > max_bytes:
            index, used = index + 1, 0
        shard_of[key] = f"shard{index:03d}"
        used += size

    return _union_split(adapter, "size", lambda path, m: shard_of[path], tags=lambda name: ("size",),
                        sha256=sha256, assign_override=lambda key: shard_of[f"override:{key}"])


def _band_cuts(s_count: int, cum: Tensor, bands: Sequence[int] | None,
               energy_cuts: Sequence[float] | None) -> list[int]:
    """Cut points 0 = c0 < … ≤ q for one module; the last band always ends at q (nothing is dropped)."""
    cuts = [0]
    if bands is not None:
        for b in bands[:-1]:
            cuts.append(min(cuts[-1] + b, s_count))
    else:
        for e in energy_cuts or ():
            k = int((cum < e - 1e-12).sum()) + 1
            cuts.append(max(cuts[-1], min(k, s_count)))
    cuts.append(s_count)
    return cuts


def split_by_rank(adapter: Adapter, bands: Sequence[int] | None = None, energy: Sequence[float] | None = None,
                  sha256: str | None = None) -> Split:
    """Energy-ordered rank bands of every module; see the module docstring.

    Args:
        bands: band widths, e.g. ``[4, 4, 8]``; the last band also takes any directions beyond their sum.
        energy: alternatively, cumulative energy shares where bands end, e.g. ``[0.5, 0.9]`` → three bands
            (up to 50 %, up to 90 %, the rest), cut per module.

    Raises:
        LorakitError: neither or both of ``bands`` / ``energy`` given, a width < 1, a share outside (0, 1), or a
            DoRA module (its magnitude does not split along rank).
    """
    if (bands is None) == (energy is None):
        raise LorakitError("rank split needs exactly one of bands=[4, 4, 8] or energy=[0.5, 0.9]")
    if bands is not None and (not bands or any(int(b) < 1 for b in bands)):
        raise LorakitError(f"rank bands must be positive widths, got {list(bands)}")
    if energy is not None and any(not 0 < e < 1 for e in energy):
        raise LorakitError(f"energy cuts must lie strictly between 0 and 1, got {list(energy)}")
    dora = [p for p, m in adapter.modules.items() if m.magnitude is not None]
    if dora:
        raise LorakitError(f"rank-band split is not defined for DoRA modules: {dora[:3]}")
    n_bands = len(bands) if bands is not None else len(energy) + 1  # type: ignore[arg-type]
    band_mods: list[dict[str, ModuleLora]] = [{} for _ in range(n_bands)]
    ranges: list[dict[str, tuple[int, int]]] = [{} for _ in range(n_bands)]
    band_energy = [0.0] * n_bands
    total = 0.0
    for path, m in adapter.modules.items():
        u, s, vh = factor_svd(m)
        cuts = _band_cuts(int(s.shape[0]), energies(s), bands, energy)
        sq = (m.scale ** 2) * (s ** 2)
        total += float(sq.sum())
        for k in range(n_bands):
            lo, hi = cuts[k], cuts[k + 1]
            if hi <= lo:
                continue
            band_mods[k][path] = module_from_svd(m, u[:, lo:hi], s[lo:hi], vh[lo:hi])
            ranges[k][path] = (lo, hi)
            band_energy[k] += float(sq[lo:hi].sum())
    parts, running = [], 0.0
    for k in range(n_bands):
        if not band_mods[k] and not (k == 0 and adapter.overrides):
            continue
        share = band_energy[k] / total if total > 0 else 0.0
        running += share
        label = f"{bands[k]}" if bands is not None else (f"<={energy[k]:g}" if k < len(energy) else "rest")
        sub = replace(adapter, modules=band_mods[k], overrides=dict(adapter.overrides) if k == 0 else {})
        parts.append(Part(f"band{k}", sub, f"rank:{label}", ("rank", f"band{k}"), 1.0, ranges[k], share,
                          min(running, 1.0)))
    return Split("rank", "concat_rank", tuple(parts), ParentInfo.of(adapter, sha256))


def split(adapter: Adapter, mode: str, *, family: str | None = None, selectors: Mapping[str, str] | None = None,
          bands: Sequence[int] | None = None, energy: Sequence[float] | None = None, max_bytes: int | None = None,
          default_weights: Mapping[str, float] | None = None, sha256: str | None = None) -> Split:
    """Split ``adapter`` by ``mode`` (one of :data:`MODES`); the keyword arguments of that mode apply.

    Args:
        default_weights: part name → the strength the part is attached with by default (recorded in the manifest).
        sha256: the parent file's hash, recorded in the manifest.

    Raises:
        LorakitError: an unknown mode, a missing mode argument, or a default weight for a part that does not exist.
    """
    result = _split(adapter, mode, family, selectors, bands, energy, max_bytes, sha256)
    if not default_weights:
        return result
    unknown = sorted(set(default_weights) - set(result.names))
    if unknown:
        raise LorakitError(f"default weights for unknown part(s) {unknown} (parts: {', '.join(result.names)})")
    parts = tuple(replace(p, default_weight=float(default_weights.get(p.name, p.default_weight)))
                  for p in result.parts)
    return replace(result, parts=parts)


def _split(adapter: Adapter, mode: str, family: str | None, selectors: Mapping[str, str] | None,
           bands: Sequence[int] | None, energy: Sequence[float] | None, max_bytes: int | None,
           sha256: str | None) -> Split:
    if mode == "component":
        return split_by_component(adapter, sha256)
    if mode == "block":
        return split_by_block(adapter, family, sha256)
    if mode == "type":
        return split_by_type(adapter, sha256)
    if mode == "selector":
        if not selectors:
            raise LorakitError("selector split needs selectors, e.g. {'attn': 'attn1, attn2'}")
        return split_by_selectors(adapter, selectors, sha256=sha256)
    if mode == "size":
        if max_bytes is None:
            raise LorakitError("size split needs max_bytes")
        return split_by_size(adapter, max_bytes, sha256)
    if mode == "rank":
        return split_by_rank(adapter, bands, energy, sha256)
    raise LorakitError(f"unknown split mode {mode!r} (known: {', '.join(MODES)})")
