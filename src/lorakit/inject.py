"""Turn adapter data into layers of a live model and back: inject, attach, extract, detach, merge.

Wrapping a module never renames a base-model key: a LoRA layer keeps the base layer's ``weight``/``bias``
parameters under the same names, so ``model.state_dict()`` after injection holds every original key unchanged,
plus the adapter keys ``<module>.lora.<name>.A`` / ``.B``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
from torch import nn

from lorakit.adapter import Adapter, ModuleLora
from lorakit.errors import AdapterStateError, AttachError, LorakitError
from lorakit.layers import INITS, LoraFactors, LoraLayer, base_kind, lora_layer_type, wrap_problem
from lorakit.layers.base import Routing
from lorakit.record import AdapterRecord, WrappedModule, get_record, qualname
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
    """The LoRA layer at ``path``, wrapping the base module there first (and recording it) if needed."""
    module = model.get_submodule(path)
    if isinstance(module, LoraLayer):
        return module
    layer_type = lora_layer_type(module)
    problem = wrap_problem(module)
    if layer_type is None or problem is not None:
        raise LorakitError(f"module {path!r}: {problem}")
    layer = layer_type(module)
    _set_submodule(model, path, layer)
    _keep_fused_blocks_off(model, path, layer)
    get_record(model).wrapped[path] = WrappedModule(qualname(type(module)), layer.kind, layer.delegates)
    return layer


def _keep_fused_blocks_off(model: nn.Module, path: str, layer: LoraLayer) -> None:
    """Keep PyTorch's fused transformer kernels from bypassing the adapter at ``path``.

    In eval mode ``nn.TransformerEncoderLayer`` runs one kernel (``torch._transformer_encoder_layer_fwd``) that
    reads its linears' weights directly; PyTorch turns it off for a block whose modules have hooks, so the layer
    gets a no-op pre-hook. ``nn.TransformerEncoder`` would also pack padded batches into nested tensors for that
    kernel; its ``use_nested_tensor`` is switched off (a speed path only: outputs are the same).
    """
    segs = path.split(".")
    hooked = False
    for i in range(len(segs)):
        block = model.get_submodule(".".join(segs[:i]))
        if isinstance(block, nn.TransformerEncoderLayer) and not hooked:
            layer.register_forward_pre_hook(_keep_module_calls)
            hooked = True
        elif isinstance(block, nn.TransformerEncoder):
            block.use_nested_tensor = False


def _keep_module_calls(module: nn.Module, args: tuple) -> None:
    """A no-op forward pre-hook; its presence keeps fused PyTorch blocks calling their submodules."""
    return None


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

    Everything is checked before the model changes: on any error the model is left as it was.

    A module that a target wraps and a ``train`` pattern also covers (RoBERTa's ``classifier.dense`` under
    ``targets=["dense"], train=["classifier"]``) trains both ways: its adapter and its own weight. :func:`extract`
    exports both, the weight as an override, and :func:`attach` puts both back. PiSSA cannot share a module with
    ``train`` (its base weight holds a residual, not the weight to export) and is refused there.

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
        seed: seed for the factor initialisation (default: torch's global RNG). Factors are drawn on the CPU and
            moved, so a seed gives the same factors on every device.

    Returns:
        An :class:`InjectReport` with the wrapped modules and trainable / total parameter counts.

    Raises:
        LorakitError: a bad option, a target that selects nothing or an unwrappable module, a ``train`` pattern
            that matches nothing, an adapter name already in use.
    """
    paths = find_targets(model, targets, layers=layers, exclude=exclude)
    plan = _plan(model, paths, rank=rank, alpha=alpha, dropout=dropout, init=init, dora=dora, ranks=ranks,
                 alphas=alphas, name=name)
    trained = resolve_train(model, train)
    if init == "pissa":
        overlap = [p for p in paths if any(p == t or p.startswith(t + ".") for t in trained)]
        if overlap:
            raise LorakitError(f"PiSSA adapters cannot sit on modules trained fully (train=): {overlap[:3]}")

    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    entry = AdapterRecord(init, tuple(paths))
    for path, (r, a) in plan.items():
        layer = _wrap(model, path)
        factors = layer.new_factors(r, a, init=init, rslora=rslora, dropout=dropout, dora=dora, generator=gen)
        if init == "pissa":
            entry.pissa[path] = (factors.A.detach().clone(), factors.B.detach().clone())
        layer.add_adapter(name, factors)
    record = get_record(model)
    record.adapters[name] = entry
    record.trained[name] = trained
    if freeze:
        freeze_except(model, train=train, adapter=name)
    return InjectReport(name, tuple(paths), *trainable_parameters(model))


def _plan(model: nn.Module, paths: Sequence[str], *, rank: int, alpha: float | None, dropout: float, init: str,
          dora: bool, ranks: Mapping[str, int] | None, alphas: Mapping[str, float] | None, name: str
          ) -> dict[str, tuple[int, float]]:
    """Each path's (rank, alpha), after checking every option and module; raises before any change."""
    problems: list[str] = []
    if init not in INITS:
        problems.append(f"unknown init {init!r} (known: {', '.join(INITS)})")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        problems.append(f"dropout must be in [0, 1), got {dropout!r}")
    if any(name in layer.lora for _, layer in lora_layers(model)) or name in get_record(model).adapters:
        raise AdapterStateError(f"model already has an adapter named {name!r}")
    plan: dict[str, tuple[int, float]] = {}
    for path in paths:
        module = model.get_submodule(path)
        problem = wrap_problem(module)
        if problem is not None:
            problems.append(f"{path!r}: {problem}")
            continue
        r = first_match(path, ranks or {})
        r = rank if r is None else r
        a = first_match(path, alphas or {})
        a = alpha if a is None else a
        a = r if a is None else a
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            problems.append(f"{path!r}: rank must be an integer ≥ 1, got {r!r}")
            continue
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not math.isfinite(a) or a <= 0:
            problems.append(f"{path!r}: alpha must be a finite number > 0, got {a!r}")
            continue
        if dora and base_kind(module) == "embedding":
            problems.append(f"{path!r}: DoRA is not supported on embedding layers")
        plan[path] = (int(r), float(a))
    if problems:
        raise LorakitError("cannot inject: " + "; ".join(problems))
    return plan


def resolve_train(model: nn.Module, train: Sequence[str]) -> tuple[str, ...]:
    """The module paths ``train`` patterns select (outermost matches only), in model order.

    Raises:
        LorakitError: a pattern that matches no module.
    """
    found = {pat: False for pat in train}
    chosen: list[str] = []
    for path, m in _base_modules(model):
        if not path:
            continue
        hit = [pat for pat in train if matches(pat, path)]
        for pat in hit:
            found[pat] = True
        if hit and not any(path.startswith(c + ".") for c in chosen):
            chosen.append(path)
    missing = [p for p, ok in found.items() if not ok]
    if missing:
        raise LorakitError(f"train pattern(s) {missing} match no module")
    return tuple(chosen)


def _base_modules(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, nn.Module]]:
    """``named_modules()`` without the adapter factors (a LoRA layer's ``lora`` dict and what it holds)."""
    yield prefix, module
    for child_name, child in module._modules.items():
        if child is None or (isinstance(module, LoraLayer) and child is module.lora):
            continue
        yield from _base_modules(child, f"{prefix}.{child_name}" if prefix else child_name)


def freeze_except(model: nn.Module, train: Sequence[str] = (), adapter: str | None = None) -> None:
    """Set ``requires_grad=False`` everywhere except the factors of ``adapter`` and the modules ``train`` matches.

    With ``adapter=None`` and a classifier pattern in ``train`` this is the head-only baseline. The resolved
    ``train`` modules are recorded (for ``adapter``, or for no adapter), so :func:`extract` and
    :func:`trained_tensors` know what was trained without reading ``requires_grad``. A ``train`` module that also
    carries adapters trains its own tensors only, never other adapters' factors.

    Raises:
        LorakitError: a ``train`` pattern that matches no module (nothing is changed then).
    """
    trained = resolve_train(model, train)
    for p in model.parameters():
        p.requires_grad_(False)
    for _, layer in lora_layers(model):
        if adapter is not None and adapter in layer.lora:
            for p in layer.lora[adapter].parameters():
                p.requires_grad_(True)
    for t in _own_tensors(model, trained, params_only=True).values():
        t.requires_grad_(True)
    get_record(model).trained[adapter] = trained


def _own_tensors(model: nn.Module, roots: Iterable[str], params_only: bool = False) -> dict[str, torch.Tensor]:
    """State-dict key → tensor for the parameters (and persistent buffers) under ``roots``, adapter factors
    excluded: a wrapped module's own weight and bias keep their base keys."""
    out: dict[str, torch.Tensor] = {}
    for root in roots:
        for sub, m in _base_modules(model.get_submodule(root), root):
            for key, p in m._parameters.items():
                if p is not None:
                    out[f"{sub}.{key}"] = p
            if not params_only:
                for key, b in m._buffers.items():
                    if b is not None and key not in m._non_persistent_buffers_set:
                        out[f"{sub}.{key}"] = b
    return out


def extract(model: nn.Module, name: str = "default", *, bake_strength: bool = False,
            include_trained: bool = True, base_model: str | None = None, targets: Sequence[str] = (),
            metadata: Mapping[str, str] | None = None) -> Adapter:
    """The adapter ``name`` of a live model, as data (detached copies).

    What goes in is read from the injection record (:mod:`lorakit.record`): the wrapped modules' factors; for a
    PiSSA adapter, the update against the *original* base weight (rank 2r: the trained factors next to the
    initial ones with a minus sign, so attaching the file to the unmodified base reproduces the trained model);
    and, with ``include_trained``, the tensors of the modules trained fully with it and the overrides an attach
    brought, as ``overrides``. The record itself goes into ``metadata["lorakit.injection"]`` (JSON).

    Args:
        model: a model with LoRA layers.
        name: which adapter.
        bake_strength: fold each layer's run-time strength into alpha.
        include_trained: also return the fully trained modules' tensors and the attached overrides.
        base_model, targets, metadata: recorded in the adapter.

    Raises:
        AdapterStateError: no such adapter; a fully trained module with merged adapters (its weight would carry
            their updates: unmerge first).
    """
    record = get_record(model)
    modules = {path: layer.to_data(name, bake_strength) for path, layer in lora_layers(model) if name in layer.lora}
    if not modules:
        raise AdapterStateError(f"model has no adapter named {name!r}")
    entry = record.adapters.get(name)
    for path, (A0, B0) in (entry.pissa.items() if entry is not None else ()):
        layer = model.get_submodule(path)
        strength = layer.lora[name].strength if bake_strength else 1.0
        modules[path] = _against_original(layer.to_data(name), A0, B0, strength)
    overrides = {}
    if include_trained:
        overrides = _trained_copy(model, record.trained.get(name, ()))
        if entry is not None:
            overrides.update({k: _state_entry(model, k).detach().clone() for k in entry.overrides
                              if _state_entry(model, k) is not None})
    meta = {**dict(metadata or {}), INJECTION_KEY: json.dumps(record.header(name), sort_keys=True)}
    return Adapter(modules, overrides, base_model=base_model, targets=tuple(targets), metadata=meta)


#: The metadata key under which :func:`extract` writes the injection record.
INJECTION_KEY = "lorakit.injection"


def _against_original(m: ModuleLora, A0: torch.Tensor, B0: torch.Tensor, strength: float) -> ModuleLora:
    """A PiSSA module (unbaked ``m``, initial factors ``A₀``, ``B₀``) as a LoRA against the original weight.

    PiSSA leaves ``W_res = W − s·B₀A₀`` in the base, so the trained layer computes
    ``W_res + t·s·B·A = W + s·(t·B·A − B₀A₀)``: factors ``[t·B, −B₀]`` and ``[A; A₀]`` of rank 2r, with an alpha
    that keeps the scale s (alpha/r = 2·alpha/2r exactly; alpha/√r = √2·alpha/√(2r)). Exact up to the rounding
    of ``W_res`` itself.
    """
    B = torch.cat([m.B * strength if strength != 1.0 else m.B, -B0.to(m.B.dtype)], dim=1)
    A = torch.cat([m.A, A0.to(m.A.dtype)], dim=0)
    return replace(m, A=A, B=B, alpha=m.alpha * (math.sqrt(2.0) if m.rslora else 2.0))


def _trained_copy(model: nn.Module, roots: Iterable[str]) -> dict[str, torch.Tensor]:
    roots = list(roots)
    for root in roots:
        for sub, m in model.get_submodule(root).named_modules(prefix=root):
            if isinstance(m, LoraLayer) and any(f.merged for f in m.lora.values()):
                raise AdapterStateError(f"{sub!r} is trained fully and has merged adapters; unmerge before "
                                        f"extracting its weight")
    return {k: t.detach().clone() for k, t in _own_tensors(model, roots).items()}


def trained_tensors(model: nn.Module, adapters: Iterable[str | None] | None = None) -> dict[str, torch.Tensor]:
    """State-dict entries (parameters and persistent buffers, e.g. BatchNorm statistics) of the modules trained
    fully, as recorded by :func:`inject` / :func:`freeze_except` (copies).

    Args:
        model: the model.
        adapters: only the modules trained with these adapters (``None`` in it: those trained with no adapter,
            the head-only case); default: every recorded module.
    """
    trained = get_record(model).trained
    chosen = trained if adapters is None else {a: trained[a] for a in adapters if a in trained}
    return _trained_copy(model, dict.fromkeys(p for paths in chosen.values() for p in paths))


def attach(model: nn.Module, adapter: Adapter, name: str = "default", *, trainable: bool = False,
           dropout: float = 0.0) -> list[str]:
    """Put adapter data onto a live model as a new adapter ``name``; strict and all-or-nothing.

    Every module of the adapter must exist in the model, be of the adapter's layer kind and have the matching
    weight shape; every override key must name a state-dict entry of the same shape. All mismatches are
    collected and raised together before the model is touched. Factors take the dtype and device of the base
    weight they sit on.

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
    if name in get_record(model).adapters:
        problems.append(f"the model already has an adapter named {name!r}")
    for path, m in adapter.modules.items():
        try:
            module = model.get_submodule(path)
        except AttributeError:
            problems.append(f"{path!r}: no such module in the model (expected {m.kind} "
                            f"{m.in_features}→{m.out_features})")
            continue
        kind = base_kind(module)
        problem = wrap_problem(module)
        shape = tuple(module.weight.shape) if kind is not None and problem is None else None
        if problem is not None:
            problems.append(f"{path!r}: {problem}")
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
    get_record(model).adapters[name] = AdapterRecord("attached", tuple(adapter.modules), tuple(adapter.overrides))
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

    Layers left with no adapter are replaced by their original base module object. A PiSSA adapter gives its
    principal part back to the base weight, so the base is the original again. Overrides that an attach copied
    into the model stay (they are base-model weights now). Returns the paths that lost an adapter.
    """
    present = adapter_names(model)
    if name is not None and name not in present:
        raise AdapterStateError(f"model has no adapter named {name!r}")
    touched = []
    for path, layer in list(lora_layers(model)):
        names = layer.adapter_names if name is None else [n for n in layer.adapter_names if n == name]
        for n in names:
            _restore_pissa(model, path, layer, n, layer.remove_adapter(n))
        if names:
            touched.append(path)
    for n in present if name is None else [name]:
        _forget(model, n)
    _unwrap_empty(model)
    return touched


def _restore_pissa(model: nn.Module, path: str, layer: LoraLayer, name: str, f: LoraFactors) -> None:
    """Add a removed PiSSA adapter's initial principal part ``s·B₀A₀`` back into the base weight."""
    entry = get_record(model).adapters.get(name)
    if entry is None or path not in entry.pissa:
        return
    A0, B0 = entry.pissa[path]
    with torch.no_grad():
        layer.weight.add_(layer._to_layout((B0 @ A0.flatten(1)) * f.base_scale).to(layer.weight.dtype))


def _forget(model: nn.Module, name: str) -> None:
    record = get_record(model)
    record.adapters.pop(name, None)
    record.trained.pop(name, None)


def _unwrap_empty(model: nn.Module) -> None:
    """Put the base module back where a LoRA layer has no adapter left, and drop it from the record."""
    record = get_record(model)
    for path, layer in list(lora_layers(model)):
        if not layer.lora:
            _set_submodule(model, path, layer.base_layer)
            record.wrapped.pop(path, None)


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
    present = adapter_names(model)
    for path, layer in list(lora_layers(model)):
        for n in layer.adapter_names:
            if layer.lora[n].merged:
                layer.lora[n].merged = False  # keep the merged weight: removing must not subtract it
            else:
                _restore_pissa(model, path, layer, n, layer.lora[n])  # dropped, so its principal part goes back to the base
        for n in layer.adapter_names:
            del layer.lora[n]
    for n in present:
        _forget(model, n)
    _unwrap_empty(model)
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
    """Set the run-time strength of adapter ``name`` (on ``paths`` only, if given); returns layers changed.

    All-or-nothing: every path, the value and the merged state are checked before any layer changes.
    """
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise AdapterStateError(f"strength must be a finite number, got {strength!r}")
    layers = dict(lora_layers(model))
    if paths is None:
        chosen = [p for p, layer in layers.items() if name in layer.lora]
        if not chosen:
            raise AdapterStateError(f"model has no adapter named {name!r}")
    else:
        chosen = list(paths)
        unknown = [p for p in chosen if p not in layers or name not in layers[p].lora]
        if unknown:
            raise AdapterStateError(f"adapter {name!r} is not on module(s) {unknown}")
    merged = [p for p in chosen if layers[p].lora[name].merged]
    if merged:
        raise AdapterStateError(f"adapter {name!r} is merged on {merged[:3]}; unmerge it before changing strength")
    for p in chosen:
        layers[p].lora[name].strength = float(strength)
    return len(chosen)


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

    ``None`` runs a sample on the base model alone. The batch must have exactly ``len(sample_adapters)`` samples
    (checked in every layer's forward). Every LoRA layer computes its base output once for the whole
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
    rows: dict[str, slice | torch.Tensor] = {}
    for n in dict.fromkeys(x for x in sample_adapters if x is not None):
        idx = [i for i, x in enumerate(sample_adapters) if x == n]
        contiguous = idx == list(range(idx[0], idx[-1] + 1))
        rows[n] = slice(idx[0], idx[-1] + 1) if contiguous else torch.tensor(idx)
    layers = [layer for _, layer in lora_layers(model)]
    try:
        for layer in layers:
            dev = layer.weight.device
            layer.routing = Routing(len(sample_adapters),
                                    {n: (r if isinstance(r, slice) else r.to(dev)) for n, r in rows.items()})
        yield model
    finally:
        for layer in layers:
            layer.routing = None


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
