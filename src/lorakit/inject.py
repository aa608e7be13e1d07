"""Turn adapter data into layers of a live model and back: inject, attach, extract, detach, merge.

Wrapping a module never renames a base-model key: a LoRA layer keeps the base layer's ``weight``/``bias``
parameters under the same names, so ``model.state_dict()`` after injection holds every original key unchanged,
plus the adapter keys ``<module>.lora.<name>.A`` / ``.B``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from lorakit.adapter import Adapter
from lorakit.errors import AdapterStateError, AttachError, LorakitError
from lorakit.layers import LoraFactors, LoraLayer, base_kind, lora_layer_type
from lorakit.targets import find_targets, first_match, matches


@dataclass(frozen=True)
class InjectReport:
    """What :func:`inject` did.

    Attributes:
        name: the adapter name.
        modules: paths of the wrapped modules, in model order.
        trainable_params: parameters with ``requires_grad`` after injection.
        total_params: all parameters of the model, adapters included.
    """

    name: str
    modules: tuple[str, ...]
    trainable_params: int
    total_params: int

    @property
    def trainable_share(self) -> float:
        return self.trainable_params / max(self.total_params, 1)

    def summary(self) -> str:
        return (f"adapter {self.name!r} on {len(self.modules)} modules; trainable {self.trainable_params:,} of "
                f"{self.total_params:,} parameters ({100 * self.trainable_share:.3f}%)")


def lora_layers(model: nn.Module) -> Iterator[tuple[str, LoraLayer]]:
    """Every LoRA layer of ``model`` with its path, in model order."""
    for path, m in model.named_modules():
        if isinstance(m, LoraLayer):
            yield path, m


def _wrap(model: nn.Module, path: str) -> LoraLayer:
    """The LoRA layer at ``path``, wrapping the base module there first if needed."""
    module = model.get_submodule(path)
    if isinstance(module, LoraLayer):
        return module
    layer_type = lora_layer_type(module)
    if layer_type is None:
        raise LorakitError(f"module {path!r} ({type(module).__name__}) cannot carry a LoRA adapter")
    layer = layer_type(module)
    _set_submodule(model, path, layer)
    return layer


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, child = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, child, module)


def inject(model: nn.Module, targets: Sequence[str], *, rank: int = 8, alpha: float | None = None,
           dropout: float = 0.0, rslora: bool = False, init: str = "kaiming", dora: bool = False,
           ranks: Mapping[str, int] | None = None, alphas: Mapping[str, float] | None = None,
           layers: str | Iterable[int] | None = None, exclude: Sequence[str] = (), train: Sequence[str] = (),
           name: str = "default", freeze: bool = True, seed: int | None = None) -> InjectReport:
    """Add a new trainable adapter to the modules of ``model`` that ``targets`` select, in place.

    Args:
        model: any ``nn.Module`` (transformers, diffusers, plain torch).
        targets: module patterns and presets, see :mod:`lorakit.targets`.
        rank: LoRA rank r.
        alpha: scaling numerator; defaults to ``rank`` (scale 1).
        dropout: dropout on the adapter input.
        rslora: scale by alpha/√r (Kalajdzievski 2023).
        init: ``kaiming`` (default), ``gaussian`` or ``pissa``; see :data:`lorakit.layers.INITS`.
        dora: add a DoRA magnitude vector (Liu et al. 2024).
        ranks: pattern → rank for some modules (first matching pattern wins).
        alphas: pattern → alpha for some modules (first matching pattern wins; default: that module's rank).
        layers: keep only modules inside these block indices, e.g. ``"8-11"``.
        exclude: patterns of modules never to adapt.
        train: patterns of modules trained fully alongside the adapter (e.g. a fresh ``classifier``).
        name: adapter name; several adapters can live on one model.
        freeze: set ``requires_grad=False`` on everything but this adapter and the ``train`` modules.
        seed: seed for the factor initialisation (default: torch's global RNG).

    Returns:
        An :class:`InjectReport` with the wrapped modules and trainable / total parameter counts.
    """
    paths = find_targets(model, targets, layers=layers, exclude=exclude)
    if any(name in layer.lora for _, layer in lora_layers(model)):
        raise AdapterStateError(f"model already has an adapter named {name!r}")
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    for path in paths:
        layer = _wrap(model, path)
        r = int(first_match(path, ranks or {}) or rank)
        a = first_match(path, alphas or {})
        a = float(a if a is not None else alpha if alpha is not None else r)
        factors = layer.new_factors(r, a, init=init, rslora=rslora, dropout=dropout, dora=dora,
                                    generator=gen if layer.weight.device.type == "cpu" else None)
        layer.add_adapter(name, factors)
    if freeze:
        freeze_except(model, train=train, adapter=name)
    return InjectReport(name, tuple(paths), *trainable_parameters(model))


def freeze_except(model: nn.Module, train: Sequence[str] = (), adapter: str | None = None) -> None:
    """Set ``requires_grad=False`` everywhere except the factors of ``adapter`` and the modules ``train`` matches.

    With ``adapter=None`` and a classifier pattern in ``train`` this is the head-only baseline.

    Raises:
        LorakitError: a ``train`` pattern that matches no module.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        if adapter is not None and adapter in layer.lora:
            for p in layer.lora[adapter].parameters():
                p.requires_grad_(True)
    if train:
        found = {pat: False for pat in train}
        for path, m in model.named_modules():
            for pat in train:
                if path and matches(pat, path):
                    found[pat] = True
                    for p in m.parameters():
                        p.requires_grad_(True)
        missing = [p for p, ok in found.items() if not ok]
        if missing:
            raise LorakitError(f"train pattern(s) {missing} match no module")


def extract(model: nn.Module, name: str = "default", *, bake_strength: bool = False,
            include_trained: bool = True, base_model: str | None = None, targets: Sequence[str] = (),
            metadata: Mapping[str, str] | None = None) -> Adapter:
    """The adapter ``name`` of a live model, as data (detached copies).

    Args:
        model: a model with LoRA layers.
        name: which adapter.
        bake_strength: fold each layer's run-time strength into alpha.
        include_trained: also return, as ``overrides``, the parameters and buffers of modules trained fully
            (every non-adapter module that owns a parameter with ``requires_grad``).
        base_model, targets, metadata: recorded in the adapter.
    """
    modules = {path: layer.to_data(name, bake_strength) for path, layer in lora_layers(model) if name in layer.lora}
    if not modules:
        raise AdapterStateError(f"model has no adapter named {name!r}")
    overrides = trained_tensors(model) if include_trained else {}
    return Adapter(modules, overrides, base_model=base_model, targets=tuple(targets), metadata=dict(metadata or {}))


def trained_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """State-dict entries (parameters and persistent buffers) of fully trained, non-adapter modules."""
    out: dict[str, torch.Tensor] = {}
    for path, m in model.named_modules():
        if isinstance(m, (LoraFactors, LoraLayer)):
            continue  # adapter factors are data already; a wrapped base weight is frozen by construction
        own = dict(m.named_parameters(recurse=False))
        if not any(p.requires_grad for p in own.values()):
            continue
        prefix = f"{path}." if path else ""
        for key, t in m.state_dict(keep_vars=False).items():
            if "." not in key:  # direct members only; children are visited on their own
                out[prefix + key] = t.detach().clone()
    return out


def attach(model: nn.Module, adapter: Adapter, name: str = "default", *, trainable: bool = False,
           dropout: float = 0.0) -> list[str]:
    """Put adapter data onto a live model as a new adapter ``name``; strict and all-or-nothing.

    Every module of the adapter must exist in the model, be of the adapter's layer kind and have the matching
    weight shape; every override key must name a state-dict entry of the same shape. All mismatches are
    collected and raised together before the model is touched.

    Args:
        model: the base model (possibly already carrying other adapters).
        adapter: the adapter data.
        name: adapter name on the model.
        trainable: whether the new factors require gradients.
        dropout: dropout on the adapter input, for further training.

    Returns:
        The module paths that received the adapter.

    Raises:
        AttachError: listing every missing module, kind or shape mismatch and name clash.
    """
    adapter.validate()
    problems: list[str] = []
    for path, m in adapter.modules.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            problems.append(f"{path!r}: no such module in the model (expected {m.kind} "
                            f"{m.in_features}→{m.out_features})")
            continue
        kind = base_kind(module)
        shape = tuple(module.weight.shape) if kind is not None else None
        if kind is None:
            problems.append(f"{path!r}: {type(module).__name__} cannot carry a LoRA adapter")
        elif kind != m.kind or shape != m.weight_shape:
            problems.append(f"{path!r}: adapter is {m.kind} with weight {m.weight_shape}, model has {kind} "
                            f"with weight {shape}")
        elif isinstance(module, LoraLayer) and name in module.lora:
            problems.append(f"{path!r}: already has an adapter named {name!r}")
    # Look overrides up one by one: a full state_dict() would grow with every adapter already attached.
    state = {key: _state_entry(model, key) for key in adapter.overrides}
    for key, t in adapter.overrides.items():
        if state[key] is None:
            problems.append(f"override {key!r}: no such entry in the model's state_dict")
        elif state[key].shape != t.shape:
            problems.append(f"override {key!r}: adapter has shape {tuple(t.shape)}, model has "
                            f"{tuple(state[key].shape)}")
    if problems:
        raise AttachError(problems)

    for path, m in adapter.modules.items():
        layer = _wrap(model, path)
        factors = layer.factors_from_data(m, dropout=dropout)
        factors.requires_grad_(trainable)
        layer.add_adapter(name, factors)
    with torch.no_grad():
        for key, t in adapter.overrides.items():
            state[key].copy_(t)
    return list(adapter.modules)


def _state_entry(model: nn.Module, key: str) -> torch.Tensor | None:
    """The parameter or buffer that state-dict key ``key`` names, or ``None``."""
    module_path, _, attr = key.rpartition(".")
    try:
        module = model.get_submodule(module_path)
    except AttributeError:
        return None
    return module._parameters.get(attr, module._buffers.get(attr))


def detach(model: nn.Module, name: str | None = None) -> list[str]:
    """Remove adapter ``name`` (default: all) from the model, unmerging it first if merged.

    Layers left with no adapter are replaced by their original base module object. Overrides that an attach
    copied into the model stay (they are base-model weights now). Returns the paths that lost an adapter.
    """
    touched = []
    for path, layer in list(lora_layers(model)):
        names = layer.adapter_names if name is None else [n for n in layer.adapter_names if n == name]
        for n in names:
            layer.remove_adapter(n)
        if names:
            touched.append(path)
        if not layer.lora:
            _set_submodule(model, path, layer.base_layer)
    if name is not None and not touched:
        raise AdapterStateError(f"model has no adapter named {name!r}")
    return touched


def merge(model: nn.Module, names: Iterable[str] | None = None) -> int:
    """Add adapters into the base weights (default: every enabled one); merged ones are skipped (idempotent).

    Each (layer, adapter) pair costs one in-place ``addmm_`` on the base weight (DoRA: a rescale too).
    Returns the number of (layer, adapter) pairs merged by this call.
    """
    chosen = None if names is None else list(names)
    with torch.no_grad():  # once for the whole model rather than once per layer
        return sum(len(layer._merge(_present(layer, chosen))) for layer in _layer_list(model))


def unmerge(model: nn.Module, names: Iterable[str] | None = None) -> int:
    """Subtract merged adapters from the base weights; unmerged ones are skipped (idempotent)."""
    chosen = None if names is None else list(names)
    with torch.no_grad():
        return sum(len(layer._unmerge(_present(layer, chosen))) for layer in _layer_list(model))


def _layer_list(model: nn.Module) -> list[LoraLayer]:
    """The LoRA layers of ``model`` in model order (no paths: cheaper than :func:`lora_layers`)."""
    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def _present(layer: LoraLayer, names: list[str] | None) -> list[str] | None:
    return None if names is None else [n for n in names if n in layer.lora]


def merge_into_base(model: nn.Module, names: Iterable[str] | None = None) -> nn.Module:
    """Bake adapters into the base weights and remove every LoRA layer; returns the plain model (in place).

    Only the chosen adapters (default: every enabled one) are baked in; the others are dropped.
    """
    merge(model, names)
    for path, layer in list(lora_layers(model)):
        for n in layer.adapter_names:
            if layer.lora[n].merged:
                layer.lora[n].merged = False  # keep the merged weight: removing must not subtract it
        for n in layer.adapter_names:
            del layer.lora[n]
        _set_submodule(model, path, layer.base_layer)
    return model


def _factors(model: nn.Module, name: str) -> list[LoraFactors]:
    found = [layer.lora[name] for _, layer in lora_layers(model) if name in layer.lora]
    if not found:
        raise AdapterStateError(f"model has no adapter named {name!r}")
    return found  # type: ignore[return-value]


def adapter_names(model: nn.Module) -> list[str]:
    """Names of the adapters on the model, in order of first appearance."""
    seen: dict[str, None] = {}
    for _, layer in lora_layers(model):
        seen.update(dict.fromkeys(layer.adapter_names))
    return list(seen)


def set_enabled(model: nn.Module, name: str, enabled: bool) -> None:
    """Switch adapter ``name`` on or off everywhere (a merged adapter stays in the weights: unmerge first)."""
    for f in _factors(model, name):
        if f.merged and not enabled:
            raise AdapterStateError(f"adapter {name!r} is merged; unmerge it before disabling")
        f.enabled = enabled


def set_strength(model: nn.Module, name: str, strength: float, paths: Iterable[str] | None = None) -> int:
    """Set the run-time strength of adapter ``name`` (on ``paths`` only, if given); returns layers changed."""
    layers = dict(lora_layers(model))
    chosen = list(layers) if paths is None else list(paths)
    unknown = [p for p in chosen if p not in layers or name not in layers[p].lora]
    if unknown:
        raise AdapterStateError(f"adapter {name!r} is not on module(s) {unknown}")
    count = 0
    for p in chosen:
        if name not in layers[p].lora:
            continue
        f = layers[p].lora[name]
        if f.merged:
            raise AdapterStateError(f"adapter {name!r} is merged on {p!r}; unmerge it before changing strength")
        f.strength = float(strength)
        count += 1
    if count == 0:
        raise AdapterStateError(f"model has no adapter named {name!r}")
    return count


@contextmanager
def disabled(model: nn.Module, names: Iterable[str] | None = None) -> Iterator[nn.Module]:
    """Run the base model: adapters (default: all unmerged) are switched off inside the block."""
    chosen = adapter_names(model) if names is None else list(names)
    before = {(p, n): layer.lora[n].enabled for p, layer in lora_layers(model) for n in chosen if n in layer.lora}
    try:
        for p, layer in lora_layers(model):
            for n in chosen:
                if n in layer.lora and not layer.lora[n].merged:
                    layer.lora[n].enabled = False
        yield model
    finally:
        for p, layer in lora_layers(model):
            for n in chosen:
                if (p, n) in before:
                    layer.lora[n].enabled = before[(p, n)]


@contextmanager
def mixed_batch(model: nn.Module, sample_adapters: Sequence[str | None]) -> Iterator[nn.Module]:
    """Run one batch whose samples use different adapters: ``sample_adapters[i]`` names sample i's adapter.

    ``None`` runs a sample on the base model alone. Every LoRA layer computes its base output once for the whole
    batch and each adapter's low-rank term only for its own samples; group samples by adapter (contiguous runs)
    to avoid gather/scatter copies. Adapters may have different ranks; each keeps its own strength.

    Raises:
        AdapterStateError: an unknown adapter name, or an adapter merged into the base weights (it would apply to
            every sample).
    """
    names = adapter_names(model)
    unknown = sorted({n for n in sample_adapters if n is not None and n not in names})
    if unknown:
        raise AdapterStateError(f"unknown adapter(s) {unknown} in the mixed batch (model has {names})")
    merged = sorted({n for _, layer in lora_layers(model) for n, f in layer.lora.items() if f.merged})
    if merged:
        raise AdapterStateError(f"adapter(s) {merged} are merged; unmerge before running a mixed batch")
    routing: dict[str, slice | torch.Tensor] = {}
    for n in dict.fromkeys(x for x in sample_adapters if x is not None):
        rows = [i for i, x in enumerate(sample_adapters) if x == n]
        contiguous = rows == list(range(rows[0], rows[-1] + 1))
        routing[n] = slice(rows[0], rows[-1] + 1) if contiguous else torch.tensor(rows)
    layers = [layer for _, layer in lora_layers(model)]
    try:
        for layer in layers:
            layer.routing = {n: (r if isinstance(r, slice) else r.to(layer.weight.device)) for n, r in routing.items()}
        yield model
    finally:
        for layer in layers:
            layer.routing = None


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
