"""What every LoRA layer shares: named adapters, scales, enable/disable, DoRA, merge and unmerge.

A LoRA layer takes the place of one base layer in a live model. It keeps the base layer's own ``weight`` and
``bias`` parameters (the very same objects) under the same attribute names, so the model's ``state_dict()`` keys
of the base stay valid; the adapters add keys under ``<module>.lora.<adapter name>.{A,B,magnitude}``.

Per adapter the layer computes (Hu et al. 2021, eq. 3)

    h = base(x) + s · B(A(dropout(x))),     s = strength · alpha / r

with ``s = strength · alpha / r``, and for DoRA (Liu et al. 2024, §4.3, with the norm detached as the paper
recommends), on the weight W' that the adapters stacked before it give

    h = base(x) + t · [(m/‖W' + s·BA‖ − 1) · W' x + m/‖W' + s·BA‖ · s · B(A(dropout(x)))],   s = alpha / r

where the strength t interpolates from the layer without the adapter (t = 0) to DoRA's weight (t = 1).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.adapter import ModuleLora, lora_scale
from lorakit.errors import AdapterStateError, LorakitError

#: Factor initialisations: ``kaiming`` (uniform A as nn.Linear does, zero B), ``gaussian`` (A ~ N(0, 1/r), zero B),
#: ``pissa`` (principal singular vectors of W; the base weight keeps the residual, Meng et al. 2024).
INITS = ("kaiming", "gaussian", "pissa")


class LoraFactors(nn.Module):
    """One named adapter on one layer: its factors and its run-time state.

    Args:
        A: (r, in) or (r, in, *kernel).
        B: (out, r).
        alpha: scaling numerator.
        rslora: scale by alpha/√r instead of alpha/r.
        dropout: dropout probability on the adapter's input.
        magnitude: DoRA magnitude (out,), or ``None``.
    """

    def __init__(self, A: Tensor, B: Tensor, alpha: float, rslora: bool = False, dropout: float = 0.0,
                 magnitude: Tensor | None = None):
        super().__init__()
        self.A = nn.Parameter(A)
        self.B = nn.Parameter(B)
        self.magnitude = None if magnitude is None else nn.Parameter(magnitude)
        self.alpha = float(alpha)
        self.rslora = rslora
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.strength = 1.0
        """Run-time multiplier of this adapter's update (0 switches it off without removing it)."""
        self.enabled = True
        self.merged = False
        self._dora_merge_scale: Tensor | None = None  # m/‖W+ΔW‖ at merge time, needed to unmerge DoRA

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def dropout_p(self) -> float:
        """The dropout probability in effect now (0 in eval mode)."""
        return self.dropout.p if isinstance(self.dropout, nn.Dropout) and self.dropout.training else 0.0

    @property
    def base_scale(self) -> float:
        """``alpha/r`` (or ``alpha/√r``), without the run-time strength."""
        return lora_scale(self.alpha, self.rank, self.rslora)

    @property
    def scale(self) -> float:
        return self.strength * self.base_scale

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha:g}, rslora={self.rslora}, dora={self.magnitude is not None}, "
                f"strength={self.strength:g}, enabled={self.enabled}, merged={self.merged}")


@dataclass(frozen=True)
class Routing:
    """The samples of a mixed batch, by adapter.

    Attributes:
        size: the batch size, the length of the per-sample adapter list.
        rows: adapter name → its samples, a slice (contiguous) or a LongTensor of indices into dim 0.
    """

    size: int
    rows: dict[str, slice | Tensor]


class LoraLayer(nn.Module):
    """Base class of the runtime LoRA layers; subclasses give the low-rank path and the shape helpers.

    The layer keeps the base module's own parameters, buffers and children (the very same objects) under the
    same names, so the model's ``state_dict()`` keys stay valid, and the base module object itself
    (unregistered, since its tensors are ours) so that it can be called and put back by :meth:`base_layer`.
    The base output is always the base module's own: the plain path calls ``base(x)``; the fused path
    (:mod:`lorakit.layers.fast`) is taken only for an exactly registered type with no hooks, whose forward it
    reproduces op for op.

    Subclasses set :attr:`kind` and implement :meth:`lora_forward`, :meth:`weight_forward` and the shape helpers.
    """

    kind: str
    weight: nn.Parameter
    bias: nn.Parameter | None
    #: Let layers that have one use their fused autograd function (see :mod:`lorakit.layers.fast`).
    use_fast_path: bool = True
    #: Whether this layer kind implements :meth:`fast_forward`.
    has_fast_path: bool = False

    def __init__(self, base: nn.Module):
        problem = self.wrap_problem(base)
        if problem is not None:
            raise LorakitError(problem)
        super().__init__()
        # Register the base's own tensors and children under their names first, so state_dict() lists the base
        # keys in the base's order, then the adapter keys.
        for name, p in base._parameters.items():
            self.register_parameter(name, p)
        for name, b in base._buffers.items():
            self.register_buffer(name, b, persistent=name not in base._non_persistent_buffers_set)
        for name, child in base._modules.items():
            self.add_module(name, child)
        if "bias" not in self._parameters:
            self.bias = None
        self.lora = nn.ModuleDict()
        self.routing: Routing | None = None
        """Per-sample adapters for a mixed batch (see :func:`lorakit.mixed_batch`)."""
        object.__setattr__(self, "_base", base)
        from lorakit.layers import LAYER_TYPES  # the registry lives beside the layer classes

        #: Whether the base is a subclass of the registered type (its own forward may differ), see :attr:`delegates`.
        self.subclassed = type(base) not in LAYER_TYPES

    @classmethod
    def wrap_problem(cls, base: nn.Module) -> str | None:
        """Why this layer class cannot wrap ``base`` (one line), or ``None``. Checked before anything changes."""
        if "lora" in base._modules or "lora" in base._parameters:
            return f"{type(base).__name__} already has a member named 'lora'"
        if not isinstance(getattr(base, "weight", None), torch.Tensor):
            return f"{type(base).__name__} has no weight tensor"
        return None

    @property
    def delegates(self) -> bool:
        """Whether the fused path must not stand in for ``base(x)``: a subclass, or hooks on the base module."""
        base = self._base  # type: ignore[attr-defined]
        return self.subclassed or bool(base._forward_hooks or base._forward_pre_hooks)

    # -- what subclasses provide ------------------------------------------------------------------------------

    def lora_forward(self, f: LoraFactors, x: Tensor) -> Tensor:
        """``B(A(x))`` without the scale."""
        raise NotImplementedError

    def weight_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        """The base layer's op with another weight and no bias (DoRA's ``W·x`` on a dropped-out input)."""
        raise NotImplementedError

    def fast_forward(self, x: Tensor, f: LoraFactors) -> Tensor:
        """``base(x) + s·B(A(dropout(x)))`` through a fused autograd function (layers with ``has_fast_path``)."""
        raise NotImplementedError

    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return ()

    #: Axis of ``weight`` that indexes output units (1 for the transposed GPT-2 ``Conv1D``).
    weight_out_dim = 0
    #: Axis of the layer's output that indexes output units, counted from the end for linear layers.
    output_channel_dim = -1

    # -- the base module ----------------------------------------------------------------------------------------

    def base_forward(self, x: Tensor) -> Tensor:
        """The base module's own forward (hooks included), on the shared parameters."""
        self._sync_base()
        return self._base(x)  # type: ignore[attr-defined]

    def _sync_base(self) -> None:
        """Point the base module at this layer's tensors (``load_state_dict(assign=True)`` or a buffer move may
        have replaced them here)."""
        base = self._base  # type: ignore[attr-defined]
        for store, ours in ((base._parameters, self._parameters), (base._buffers, self._buffers)):
            for name in store:
                if store[name] is not ours[name]:
                    store[name] = ours[name]

    def _apply(self, fn, recurse=True):  # noqa: ANN001 - nn.Module's signature
        # .to()/.half() may give the buffers new tensor objects here; the base module must see the same ones.
        out = super()._apply(fn, recurse)
        self._sync_base()
        return out

    @property
    def base_layer(self) -> nn.Module:
        """The original base module, its tensors pointing at this layer's (possibly merged) ones."""
        self._sync_base()
        return self._base  # type: ignore[attr-defined]

    # -- the forward ------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if self.routing is not None:
            return self.mixed_forward(x, self.routing)
        fast = self._fast_path_factors(x)
        if fast is not None:
            return self.fast_forward(x, fast)
        out = self.base_forward(x)
        active = self.active_factors()
        # DoRA normalises the weight it sits on: W plus every term stacked before it (Liu et al. 2024, eq. 5), so
        # the forward tracks that effective weight, and only when a DoRA adapter comes later.
        last_dora = max((i for i, f in enumerate(active) if f.magnitude is not None), default=-1)
        weight = self.weight
        for i, f in enumerate(active):
            if f.magnitude is None:
                out = out + f.scale * self.lora_forward(f, f.dropout(x))
                if i < last_dora:
                    weight = weight + self.factor_delta(f)
            else:
                update, weight = self._dora_update(f, x, out, weight, need_weight=i < last_dora)
                out = out + update
        return out

    def mixed_forward(self, x: Tensor, routing: Routing) -> Tensor:
        """One forward over a batch whose samples use different adapters (or none).

        The base forward runs once over the whole batch; each adapter then adds its low-rank term to its own
        samples only (a view when they are contiguous, a gather/scatter otherwise), as in multi-LoRA serving
        (Punica, S-LoRA).

        Args:
            x: (N, ...) with the samples on dim 0; N must equal the length of the batch's adapter list.
            routing: the samples of each adapter.

        Raises:
            AdapterStateError: the batch size is not the length of the adapter list.
        """
        if x.shape[0] != routing.size:
            raise AdapterStateError(f"mixed batch: {routing.size} adapter name(s) given for a batch of "
                                    f"{x.shape[0]} sample(s)")
        base_out = self.base_forward(x)
        dora = any(name in self.lora and self.lora[name].magnitude is not None for name in routing.rows)
        # DoRA reads base_out (W·x) for backward: accumulate into a copy then, so autograd keeps the original.
        out = base_out.clone() if dora and torch.is_grad_enabled() else base_out
        for name, rows in routing.rows.items():
            f = self.lora[name] if name in self.lora else None
            if f is None or not f.enabled:
                continue
            xs = x[rows]
            # The scale rides on the accumulation (alpha) rather than costing a scaled copy of the update.
            if f.magnitude is None:
                update, alpha = self.lora_forward(f, f.dropout(xs)), f.scale
            else:
                (update, _), alpha = self._dora_update(f, xs, base_out[rows], self.weight, need_weight=False), 1.0
            if isinstance(rows, slice):
                out[rows].add_(update, alpha=alpha)
            else:
                out = out.index_add(0, rows, update, alpha=alpha)
        return out

    def _dora_update(self, f: LoraFactors, x: Tensor, out: Tensor, weight: Tensor, need_weight: bool
                     ) -> tuple[Tensor, Tensor]:
        """DoRA's addition to ``out`` (the output so far, ``W'·x + b`` with ``W'`` = ``weight``), and the weight
        after it.

        With strength t the layer moves t of the way from ``W'`` to DoRA's weight (as ComfyUI applies DoRA
        strengths), so t = 0 is the layer without this adapter:
        ``t·[(m/‖W'+ΔW‖ − 1)·W'x + m/‖W'+ΔW‖·ΔW·x]``, ΔW = (alpha/r)·B·A.
        """
        low = self.factor_delta(f, with_strength=False)
        mag_scale = f.magnitude / self._weight_norm(weight + low).detach()
        shape = [1] * out.ndim
        shape[self.output_channel_dim] = -1
        mag = mag_scale.view(shape)
        xd = f.dropout(x)
        # With dropout active, W'·x must be recomputed on the dropped input (as in PEFT); else reuse out − bias.
        if isinstance(f.dropout, nn.Identity) or not self.training:
            wx = out if self.bias is None else out - self.bias.view(shape)
        else:
            wx = self.weight_forward(xd, weight)
        update = (mag - 1) * wx + mag * f.base_scale * self.lora_forward(f, xd)
        if f.strength != 1.0:
            update = f.strength * update
        if not need_weight:
            return update, weight
        wshape = [1] * weight.ndim
        wshape[self.weight_out_dim] = -1
        dora_w = (weight + low) * mag_scale.view(wshape)
        return update, weight + f.strength * (dora_w - weight)

    def _fast_path_factors(self, x: Tensor) -> LoraFactors | None:
        """The one adapter a fused autograd function (:mod:`lorakit.layers.fast`) can run, or ``None``.

        The fused functions need: an exactly registered base type with no hooks (they stand in for its forward), a
        single active plain-LoRA adapter (no DoRA), a frozen base weight and bias, the base dtype for x, no mixed
        batch, and no autocast (whose casts the plain path leaves to PyTorch).
        """
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        if not (self.use_fast_path and self.has_fast_path and frozen and self.routing is None) or self.delegates:
            return None
        active = self.active_factors()
        if len(active) != 1 or active[0].magnitude is not None or x.dtype != self.weight.dtype:
            return None
        if torch.is_autocast_enabled(x.device.type):
            return None
        return active[0]

    def _weight_norm(self, w: Tensor) -> Tensor:
        """Per-output-unit L2 norm of a weight in this layer's layout, shape (out,)."""
        reduce = [d for d in range(w.ndim) if d != self.weight_out_dim]
        return w.norm(p=2, dim=reduce)

    # -- adapters ---------------------------------------------------------------------------------------------

    @property
    def adapter_names(self) -> list[str]:
        return list(self.lora.keys())

    def factors(self, name: str) -> LoraFactors:
        if name not in self.lora:
            raise AdapterStateError(f"no adapter named {name!r} on this layer (has: {self.adapter_names})")
        return self.lora[name]  # type: ignore[return-value]

    def active_factors(self) -> list[LoraFactors]:
        return [f for f in self.lora.values() if f.enabled and not f.merged]  # type: ignore[union-attr]

    def add_adapter(self, name: str, f: LoraFactors) -> None:
        if name in self.lora:
            raise AdapterStateError(f"adapter {name!r} is already on this layer")
        want_a = (f.rank, self.in_features, *self.kernel_size)
        if tuple(f.A.shape) != want_a or tuple(f.B.shape) != (self.out_features, f.rank):
            raise LorakitError(f"adapter {name!r}: factors A {tuple(f.A.shape)}, B {tuple(f.B.shape)} do not fit a "
                               f"{self.kind} layer {self.in_features}→{self.out_features} (want A {want_a})")
        dev = self.weight.device
        # Module.to walks every parameter; attaching many adapters should not pay for it when nothing moves.
        self.lora[name] = f if all(p.device == dev for p in f.parameters()) else f.to(device=dev)

    def remove_adapter(self, name: str) -> LoraFactors:
        f = self.factors(name)
        if f.merged:
            self.unmerge([name])
        del self.lora[name]
        return f

    def new_factors(self, rank: int, alpha: float, *, init: str = "kaiming", rslora: bool = False,
                    dropout: float = 0.0, dora: bool = False, generator: torch.Generator | None = None
                    ) -> LoraFactors:
        """Fresh factors for this layer; ``kaiming`` and ``gaussian`` leave the layer's output unchanged.

        ``pissa`` moves the top-``rank`` singular part of the base weight into the factors and leaves the residual
        in the base weight (the layer's output is unchanged up to rounding).
        """
        if init not in INITS:
            raise LorakitError(f"unknown init {init!r} (known: {', '.join(INITS)})")
        if rank < 1:
            raise LorakitError(f"rank must be ≥ 1, got {rank}")
        if dora and self.kind == "embedding":
            raise LorakitError("DoRA is not supported on embedding layers")
        dev, dtype = self.weight.device, self.weight.dtype
        a_shape = (rank, self.in_features, *self.kernel_size)
        # Drawn on the CPU, then moved: a seeded generator gives the same factors on every device.
        A = torch.empty(a_shape, dtype=dtype)
        B = torch.zeros(self.out_features, rank, dtype=dtype)
        if init == "pissa":
            A, B = self._pissa(rank, lora_scale(alpha, rank, rslora))
        elif self.kind == "embedding":
            # Embedding rows are looked up, not multiplied: zero A and random B keep ΔW = 0 (as PEFT does).
            A.zero_()
            B.normal_(generator=generator)
        elif init == "kaiming":
            bound = 1.0 / math.sqrt(A[0].numel())  # kaiming_uniform_(a=√5), as nn.Linear initialises its weight
            A.uniform_(-bound, bound, generator=generator)
        else:
            A.normal_(0.0, 1.0 / rank, generator=generator)
        A, B = A.to(dev), B.to(dev)
        magnitude = None
        if dora:
            with torch.no_grad():
                low = (B @ A.flatten(1)) * lora_scale(alpha, rank, rslora)
                magnitude = self._weight_norm(self.weight + self._to_layout(low)).detach().clone()
        return LoraFactors(A, B, alpha, rslora=rslora, dropout=dropout, magnitude=magnitude)

    @torch.no_grad()
    def _pissa(self, rank: int, scale: float) -> tuple[Tensor, Tensor]:
        w2d = self._from_layout(self.weight).float()  # (out, in·k)
        U, S, Vh = torch.linalg.svd(w2d, full_matrices=False)
        root = (S[:rank] / scale).sqrt()
        B = U[:, :rank] * root
        A = root[:, None] * Vh[:rank]
        self.weight.sub_(self._to_layout(scale * (B @ A)).to(self.weight.dtype))
        dtype = self.weight.dtype
        return A.reshape(rank, self.in_features, *self.kernel_size).to(dtype), B.to(dtype)

    def _from_layout(self, w: Tensor) -> Tensor:
        """A weight in this layer's layout → (out, in·k)."""
        return w.T if self.weight_out_dim == 1 else w.flatten(1)

    def _to_layout(self, d2: Tensor) -> Tensor:
        """(out, in·k) → this layer's weight layout."""
        return d2.T if self.weight_out_dim == 1 else d2.view_as(self.weight)

    def factor_delta(self, f: LoraFactors, with_strength: bool = True) -> Tensor:
        """``s·B·A`` of one adapter in the base weight's layout (differentiable); ``s`` without the strength if
        ``with_strength`` is false."""
        return self._to_layout((f.B @ f.A.flatten(1)) * (f.scale if with_strength else f.base_scale))

    # -- data <-> layer ---------------------------------------------------------------------------------------

    def to_data(self, name: str, bake_strength: bool = False) -> ModuleLora:
        """The adapter ``name`` as data (detached copies). ``bake_strength`` folds the strength into alpha."""
        f = self.factors(name)
        if bake_strength and f.magnitude is not None and f.strength != 1.0:
            raise AdapterStateError(f"adapter {name!r}: a DoRA strength ({f.strength:g}) is not a change of alpha "
                                    f"and cannot be baked into the file; merge it instead")
        alpha = f.alpha * f.strength if bake_strength else f.alpha
        mag = None if f.magnitude is None else f.magnitude.detach().clone()
        return ModuleLora(A=f.A.detach().clone(), B=f.B.detach().clone(), alpha=alpha, kind=self.kind,
                          rslora=f.rslora, magnitude=mag)

    def factors_from_data(self, m: ModuleLora, dropout: float = 0.0) -> LoraFactors:
        """Layer factors holding copies of ``m``'s tensors in this layer's dtype and on its device (a float32 file
        on a bf16 model gives bf16 factors: the factor policy of :mod:`lorakit.record`)."""
        dev = self.weight.device
        dtype = self.weight.dtype if self.weight.is_floating_point() else m.A.dtype

        def copy(t: Tensor) -> Tensor:
            return t.detach().to(device=dev, dtype=dtype, copy=True)

        mag = None if m.magnitude is None else copy(m.magnitude)
        return LoraFactors(copy(m.A), copy(m.B), m.alpha, rslora=m.rslora, dropout=dropout, magnitude=mag)

    # -- merge ------------------------------------------------------------------------------------------------

    def merge(self, names: Iterable[str] | None = None) -> list[str]:
        """Add the named (default: all enabled) adapters into the base weight; already merged ones are skipped.

        Returns the names merged by this call.
        """
        with torch.no_grad():
            return self._merge(names)

    def unmerge(self, names: Iterable[str] | None = None) -> list[str]:
        """Subtract merged adapters from the base weight, in reverse merge order; unmerged ones are skipped."""
        with torch.no_grad():
            return self._unmerge(names)

    # The bodies below run once per (layer, adapter) in a model-wide merge, so they avoid repeated module attribute
    # look-ups (nn.Module.__getattr__) and keep the per-call Python work small next to the one addmm_ they issue.

    def _merge(self, names: Iterable[str] | None) -> list[str]:
        done = []
        pairs = self.lora.items() if names is None else [(n, self.factors(n)) for n in names]
        if self.subclassed and not self.weight.is_floating_point():  # registered types hold float weights
            raise AdapterStateError(f"cannot merge into a {self.weight.dtype} weight ({type(self._base).__name__}); "
                                    f"run the adapter unmerged")
        for name, f in pairs:
            if f.merged or (names is None and not f.enabled):
                continue
            if f.magnitude is None:
                self._add_lowrank_(f, 1.0)
            else:
                # W ← W + t·(m/‖W+ΔW‖ ⊙ (W+ΔW) − W), the forward's strength rule (see _dora_update).
                low = self.factor_delta(f, with_strength=False).to(self.weight.dtype)
                mag = (f.magnitude / self._weight_norm(self.weight + low)).view(self._out_shape())
                f._dora_merge_scale = mag
                t = f.strength
                self.weight.mul_(1 - t + t * mag).add_(t * mag * low)
            f.merged = True
            done.append(name)
        return done

    def _unmerge(self, names: Iterable[str] | None) -> list[str]:
        done = []
        pairs = list(self.lora.items()) if names is None else [(n, self.factors(n)) for n in names]
        for name, f in reversed(pairs):
            if not f.merged:
                continue
            if f.magnitude is None:
                self._add_lowrank_(f, -1.0)
            else:
                mag, t = f._dora_merge_scale, f.strength
                low = self.factor_delta(f, with_strength=False).to(self.weight.dtype)
                self.weight.sub_(t * mag * low).div_(1 - t + t * mag)
                f._dora_merge_scale = None
            f.merged = False
            done.append(name)
        return done

    def _add_lowrank_(self, f: LoraFactors, sign: float) -> None:
        """``W += sign·s·B·A`` as one in-place addmm on the (out, in·k) view of W, with no ΔW temporary."""
        w = self.weight
        w2 = w.T if self.weight_out_dim == 1 else w.view(w.shape[0], -1)
        A, B = f.A, f.B
        if A.dtype != w.dtype:
            A, B = A.to(w.dtype), B.to(w.dtype)
        w2.addmm_(B, A.flatten(1), alpha=sign * f.scale)

    def _out_shape(self) -> list[int]:
        """A broadcast shape that puts a per-output-unit vector along the weight's output axis."""
        shape = [1] * self.weight.ndim
        shape[self.weight_out_dim] = -1
        return shape

    def extra_repr(self) -> str:
        return f"{self.kind}, in={self.in_features}, out={self.out_features}"


def linear_lora(x: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """``x·Aᵀ·Bᵀ``: x (..., in), A (r, in), B (out, r) → (..., out)."""
    return F.linear(F.linear(x, A), B)
