"""What every LoRA layer shares: named adapters, scales, enable/disable, DoRA, merge and unmerge.

A LoRA layer takes the place of one base layer in a live model. It keeps the base layer's own ``weight`` and
``bias`` parameters (the very same objects) under the same attribute names, so the model's ``state_dict()`` keys
of the base stay valid; the adapters add keys under ``<module>.lora.<adapter name>.{A,B,magnitude}``.

Per adapter the layer computes (Hu et al. 2021, eq. 3)

    h = base(x) + s · B(A(dropout(x))),     s = strength · alpha / r

and for DoRA (Liu et al. 2024, §4.3, with the norm detached as the paper recommends)

    h = base(x) + (m/‖W + s·BA‖ − 1) · W x + m/‖W + s·BA‖ · s · B(A(dropout(x)))
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.adapter import ModuleLora, dora_weight, lora_scale
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
    def scale(self) -> float:
        return self.strength * lora_scale(self.alpha, self.rank, self.rslora)

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, alpha={self.alpha:g}, rslora={self.rslora}, dora={self.magnitude is not None}, "
                f"strength={self.strength:g}, enabled={self.enabled}, merged={self.merged}")


class LoraLayer(nn.Module):
    """Base class of the runtime LoRA layers; subclasses give the base layer's forward and the low-rank path.

    Subclasses set :attr:`kind` and implement :meth:`base_forward`, :meth:`lora_forward` and the shape helpers.
    The original base module object is kept (unregistered, since its parameters are ours) so that
    :meth:`unwrap` can put the very same object back.
    """

    kind: str
    weight: nn.Parameter
    bias: nn.Parameter | None
    #: Let layers that have one use their fused autograd function (see :mod:`lorakit.layers.fast`).
    use_fast_path: bool = True
    #: Whether this layer kind implements :meth:`fast_forward`.
    has_fast_path: bool = False

    def __init__(self, base: nn.Module):
        super().__init__()
        self.weight = base.weight
        self.bias = getattr(base, "bias", None)
        self.lora = nn.ModuleDict()
        self.routing: dict[str, slice | Tensor] | None = None
        """Per-sample adapters for a mixed batch: adapter name → its samples (see :func:`lorakit.mixed_batch`)."""
        object.__setattr__(self, "_base", base)

    # -- what subclasses provide ------------------------------------------------------------------------------

    def base_forward(self, x: Tensor) -> Tensor:
        """Exactly the base layer's forward, with the (shared) base parameters."""
        raise NotImplementedError

    def lora_forward(self, f: LoraFactors, x: Tensor) -> Tensor:
        """``B(A(x))`` without the scale."""
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

    # -- the forward ------------------------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        if self.routing is not None:
            return self.mixed_forward(x, self.routing)
        fast = self._fast_path_factors(x)
        if fast is not None:
            return self.fast_forward(x, fast)
        out = self.base_forward(x)
        for f in self.active_factors():
            if f.magnitude is None:
                out = out + f.scale * self.lora_forward(f, f.dropout(x))
            else:
                out = out + self._dora_update(f, x, out)
        return out

    def mixed_forward(self, x: Tensor, routing: dict[str, slice | Tensor]) -> Tensor:
        """One forward over a batch whose samples use different adapters (or none).

        The base GEMM runs once over the whole batch; each adapter then adds its low-rank term to its own samples
        only (a view when they are contiguous, a gather/scatter otherwise), as in multi-LoRA serving (Punica,
        S-LoRA).

        Args:
            x: (N, ...) with the samples on dim 0.
            routing: adapter name → its samples, a slice or a LongTensor of indices into dim 0.
        """
        out = self.base_forward(x)
        for name, rows in routing.items():
            f = self.lora[name] if name in self.lora else None
            if f is None or not f.enabled:
                continue
            xs = x[rows]
            # The scale rides on the accumulation (alpha) rather than costing a scaled copy of the update.
            if f.magnitude is None:
                update, alpha = self.lora_forward(f, f.dropout(xs)), f.scale
            else:
                update, alpha = self._dora_update(f, xs, out[rows]), 1.0
            if isinstance(rows, slice):
                out[rows].add_(update, alpha=alpha)
            else:
                out = out.index_add(0, rows, update, alpha=alpha)
        return out

    def _dora_update(self, f: LoraFactors, x: Tensor, base_out: Tensor) -> Tensor:
        """DoRA's addition to ``base(x)``: rescale the base direction and add the scaled low-rank path."""
        low = self.factor_delta(f)
        mag_scale = (f.magnitude / self._weight_norm(self.weight + low).detach())
        shape = [1] * base_out.ndim
        shape[self.output_channel_dim] = -1
        mag_scale = mag_scale.view(shape)
        xd = f.dropout(x)
        # With dropout active, W·x must be recomputed on the dropped input (as in PEFT); else reuse base(x) − bias.
        if isinstance(f.dropout, nn.Identity) or not self.training:
            wx = base_out if self.bias is None else base_out - self.bias.view(shape)
        else:
            wx = self.base_forward_nobias(xd)
        return (mag_scale - 1) * wx + mag_scale * f.scale * self.lora_forward(f, xd)

    def base_forward_nobias(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _fast_path_factors(self, x: Tensor) -> LoraFactors | None:
        """The one adapter a fused autograd function (:mod:`lorakit.layers.fast`) can run, or ``None``.

        The fused functions need: a single active plain-LoRA adapter (no DoRA), a frozen base weight and bias,
        the base dtype for x, no mixed batch, and no autocast (whose casts the plain path leaves to PyTorch).
        """
        frozen = not self.weight.requires_grad and (self.bias is None or not self.bias.requires_grad)
        if not (self.use_fast_path and self.has_fast_path and frozen and self.routing is None):
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
        dev, dtype = self.weight.device, self.weight.dtype
        a_shape = (rank, self.in_features, *self.kernel_size)
        A = torch.empty(a_shape, device=dev, dtype=dtype)
        B = torch.zeros(self.out_features, rank, device=dev, dtype=dtype)
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
        magnitude = None
        if dora:
            if self.kind == "embedding":
                raise LorakitError("DoRA is not supported on embedding layers")
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

    def factor_delta(self, f: LoraFactors) -> Tensor:
        """``s·B·A`` of one adapter in the base weight's layout (differentiable)."""
        return self._to_layout((f.B @ f.A.flatten(1)) * f.scale)

    # -- data <-> layer ---------------------------------------------------------------------------------------

    def to_data(self, name: str, bake_strength: bool = False) -> ModuleLora:
        """The adapter ``name`` as data (detached copies). ``bake_strength`` folds the strength into alpha."""
        f = self.factors(name)
        alpha = f.alpha * f.strength if bake_strength else f.alpha
        mag = None if f.magnitude is None else f.magnitude.detach().clone()
        return ModuleLora(A=f.A.detach().clone(), B=f.B.detach().clone(), alpha=alpha, kind=self.kind,
                          rslora=f.rslora, magnitude=mag)

    def factors_from_data(self, m: ModuleLora, dropout: float = 0.0) -> LoraFactors:
        """Layer factors holding copies of ``m``'s tensors, on this layer's device."""
        dev = self.weight.device
        mag = None if m.magnitude is None else m.magnitude.detach().clone().to(dev)
        return LoraFactors(m.A.detach().clone().to(dev), m.B.detach().clone().to(dev), m.alpha, rslora=m.rslora,
                           dropout=dropout, magnitude=mag)

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
        for name, f in pairs:
            if f.merged or (names is None and not f.enabled):
                continue
            if f.magnitude is None:
                self._add_lowrank_(f, 1.0)
            else:
                low = self.factor_delta(f).to(self.weight.dtype)
                merged = dora_weight(self.weight, low, f.magnitude, self.kind)
                f._dora_merge_scale = f.magnitude / self._weight_norm(self.weight + low)
                self.weight.copy_(merged)
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
                shape = [1] * self.weight.ndim
                shape[self.weight_out_dim] = -1
                low = self.factor_delta(f).to(self.weight.dtype)
                self.weight.div_(f._dora_merge_scale.view(shape)).sub_(low)
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

    @property
    def base_layer(self) -> nn.Module:
        """The original base module, its parameters pointing at this layer's (possibly merged) weight."""
        base = self._base  # type: ignore[attr-defined]
        base.weight = self.weight
        if self.bias is not None:
            base.bias = self.bias
        return base

    def extra_repr(self) -> str:
        return f"{self.kind}, in={self.in_features}, out={self.out_features}"


def linear_lora(x: Tensor, A: Tensor, B: Tensor) -> Tensor:
    """``x·Aᵀ·Bᵀ``: x (..., in), A (r, in), B (out, r) → (..., out)."""
    return F.linear(F.linear(x, A), B)
