"""The injection record: the facts :func:`lorakit.inject` and :func:`lorakit.attach` established about a model.

Which modules were wrapped (and the exact base type each wrapper was built for), which modules train fully, how
each adapter was initialised, which state entries an attach overwrote and the order the adapters stack in are
written once, when they happen, on the root module. ``extract``, ``trained_tensors``, ``freeze_except``,
checkpoints and merges read this record instead of guessing from ``isinstance`` or ``requires_grad`` (a freshly
loaded Hugging Face model has ``requires_grad=True`` everywhere, which says nothing about what was trained).

The record is plain Python state in the root module's ``__dict__``: it is not part of ``state_dict()`` and never
renames a key. :meth:`InjectionRecord.header` is its JSON form, written into saved adapters.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

_ATTR = "_lorakit_record"

#: How factors are placed: ``base`` means they take the dtype and device of the base weight they sit on.
FACTOR_POLICY = "base"


@dataclass
class WrappedModule:
    """One wrapped module.

    Attributes:
        base_type: the exact class of the base module, ``module.qualname``.
        kind: the adapter kind (see :data:`lorakit.adapter.KINDS`).
        delegates: whether the wrapper calls the base module's own forward (a subclass or a module with hooks)
            rather than the equivalent functional op on its weight.
    """

    base_type: str
    kind: str
    delegates: bool


@dataclass
class AdapterRecord:
    """How one named adapter came onto the model.

    Attributes:
        init: ``kaiming``, ``gaussian`` or ``pissa`` for :func:`lorakit.inject`, ``attached`` for
            :func:`lorakit.attach`.
        modules: the wrapped paths carrying this adapter, in model order.
        overrides: state-dict keys an attach copied into the model (exported again by ``extract``).
        pissa: for PiSSA, each path's initial factors ``(A₀, B₀)``: the base weight there holds ``W − s·B₀A₀``,
            so the adapter is exported as a delta against the original ``W``, and detaching restores ``W``.
    """

    init: str
    modules: tuple[str, ...]
    overrides: tuple[str, ...] = ()
    pissa: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


@dataclass
class InjectionRecord:
    """Everything lorakit did to one model.

    Attributes:
        wrapped: wrapped module path → :class:`WrappedModule`.
        trained: adapter name (``None``: no adapter, the head-only case) → paths of the modules trained fully with
            it (``train=`` patterns, resolved).
        adapters: adapter name → :class:`AdapterRecord`, in stacking order (the order their terms are added).
        factor_policy: see :data:`FACTOR_POLICY`.
    """

    wrapped: dict[str, WrappedModule] = field(default_factory=dict)
    trained: dict[str | None, tuple[str, ...]] = field(default_factory=dict)
    adapters: dict[str, AdapterRecord] = field(default_factory=dict)
    factor_policy: str = FACTOR_POLICY

    def header(self, name: str | None = None) -> dict[str, Any]:
        """The JSON-ready form written into a saved adapter (no tensors); ``name`` limits it to one adapter."""
        names = list(self.adapters) if name is None else [name]
        chosen = {n: self.adapters[n] for n in names if n in self.adapters}
        paths = dict.fromkeys(p for a in chosen.values() for p in a.modules)
        return {"wrapped": {p: self.wrapped[p].base_type for p in paths if p in self.wrapped},
                "trained": sorted({p for n in [*names, None] for p in self.trained.get(n, ())}),
                "factor_policy": self.factor_policy,
                "adapters": {n: {"init": a.init, "modules": len(a.modules)} for n, a in chosen.items()},
                "order": list(self.adapters)}


def get_record(model: nn.Module) -> InjectionRecord:
    """The record of ``model`` (an empty one, stored on the model, if nothing was injected yet)."""
    rec = model.__dict__.get(_ATTR)
    if rec is None:
        rec = InjectionRecord()
        model.__dict__[_ATTR] = rec
    return rec


def qualname(cls: type) -> str:
    """``module.QualName`` of a class: the identity of a base type in the record."""
    return f"{cls.__module__}.{cls.__qualname__}"
