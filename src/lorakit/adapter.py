"""Adapter data: a LoRA as a plain value, with no ``nn.Module`` in sight.

An :class:`Adapter` maps module paths of a base model (``"encoder.layer.0.attention.self.query"``) to the low-rank
factors of that module (:class:`ModuleLora`). The weight update of one module is

    ΔW = scale · B · A,        scale = alpha / r   (or alpha / √r with rsLoRA, Kalajdzievski 2023)

with ``A``: (r, in) — or a conv kernel (r, in, *k) — and ``B``: (out, r). Everything that works on files (read,
write, convert, split, join, compose, resize) is a pure function from adapter data to adapter data: the methods
here return new values and never modify ``self`` or their arguments.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from lorakit.errors import AdapterValidationError

#: Layer kinds, named after the base layer the factors belong to. ``linear_t`` is transformers' ``Conv1D`` (GPT-2),
#: a linear layer whose weight is stored transposed as (in, out).
KINDS = ("linear", "linear_t", "conv1d", "conv2d", "embedding")
_A_NDIM = {"linear": 2, "linear_t": 2, "embedding": 2, "conv1d": 3, "conv2d": 4}


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The factor in front of ``B·A``: ``alpha/r``, or ``alpha/√r`` for rank-stabilised LoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def all_finite(t: Tensor) -> bool:
    """Whether a floating tensor holds no NaN or inf: one min/max reduction (NaN propagates through both), several
    times cheaper than ``isfinite(t).all()`` on the small factors that every read and attach checks."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t.detach())
    return math.isfinite(float(lo)) and math.isfinite(float(hi))


@dataclass(frozen=True, eq=False)
class ModuleLora:
    """The LoRA factors of one module.

    Attributes:
        A: down projection, (r, in) for linear kinds and embeddings (in = vocabulary size), (r, in, *kernel) for
            convolutions.
        B: up projection, (out, r).
        alpha: scaling numerator; the update is ``alpha/r · B·A``. A strength is applied here, never to the factors.
        kind: base layer kind, one of :data:`KINDS`.
        rslora: scale by ``alpha/√r`` instead of ``alpha/r``.
        magnitude: DoRA magnitude vector (out,), or ``None`` for plain LoRA (Liu et al. 2024, eq. 5).
    """

    A: Tensor
    B: Tensor
    alpha: float
    kind: str = "linear"
    rslora: bool = False
    magnitude: Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(int(k) for k in self.A.shape[2:])

    @property
    def scale(self) -> float:
        return lora_scale(self.alpha, self.rank, self.rslora)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the base layer's weight, in that layer's own layout."""
        out, inp = self.out_features, self.in_features
        if self.kind == "linear_t":
            return (inp, out)
        if self.kind == "embedding":
            return (inp, out)  # (num_embeddings, embedding_dim)
        return (out, inp, *self.kernel_size)

    def tensors(self) -> dict[str, Tensor]:
        """The factor tensors by role (``A``, ``B`` and, for DoRA, ``magnitude``)."""
        out = {"A": self.A, "B": self.B}
        if self.magnitude is not None:
            out["magnitude"] = self.magnitude
        return out

    @property
    def numel(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def lowrank_delta(self) -> Tensor:
        """``scale · B·A`` in the base weight's layout: (out, in), (in, out) for ``linear_t``, (num, dim) for
        embeddings, (out, in, *k) for convolutions. Ignores the DoRA magnitude (see :meth:`delta`)."""
        d = (self.B @ self.A.flatten(1)) * self.scale  # (out, in·k)
        if self.kind in ("linear_t", "embedding"):
            return d.T
        return d.view(self.out_features, self.in_features, *self.kernel_size)

    def delta_norm(self) -> float:
        """Frobenius norm of ``scale·B·A`` from the r×r Gram matrices, without forming B·A.

        ‖BA‖²_F = tr(AᵀBᵀBA) = Σ (BᵀB) ⊙ (AAᵀ), which costs O((in+out)·r²). When r exceeds out or in·k (a
        composed or hostile file), B·A itself is the smaller matrix, so memory stays bounded by the factors' size.
        """
        a = self.A.flatten(1).double()
        b = self.B.double()
        if self.rank > min(b.shape[0], a.shape[1]):
            return abs(self.scale) * float(torch.linalg.matrix_norm(b @ a))
        sq = ((b.T @ b) * (a @ a.T)).sum().clamp_min(0)
        return abs(self.scale) * float(sq.sqrt())

    def delta(self, base_weight: Tensor | None = None) -> Tensor:
        """The weight update this module adds to its base weight, in the base layer's layout.

        Args:
            base_weight: the base layer's weight; required for DoRA, whose update depends on it.
        """
        low = self.lowrank_delta()
        if self.magnitude is None:
            return low
        if base_weight is None:
            raise AdapterValidationError(["DoRA module needs the base weight to compute its delta"])
        return dora_weight(base_weight, low, self.magnitude, self.kind) - base_weight

    def with_alpha(self, alpha: float) -> ModuleLora:
        return replace(self, alpha=float(alpha))

    def to(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> ModuleLora:
        mag = None if self.magnitude is None else self.magnitude.to(device=device, dtype=dtype)
        return replace(self, A=self.A.to(device=device, dtype=dtype), B=self.B.to(device=device, dtype=dtype),
                       magnitude=mag)

    def problems(self, path: str) -> list[str]:
        """Everything inconsistent about this module, each message naming ``path``; empty when valid."""
        out: list[str] = []
        if self.kind not in KINDS:
            return [f"{path}: unknown layer kind {self.kind!r} (known: {', '.join(KINDS)})"]
        a, b = self.A, self.B
        if a.ndim != _A_NDIM[self.kind]:
            out.append(f"{path}.A: expected {_A_NDIM[self.kind]} dims for a {self.kind} module, got shape "
                       f"{tuple(a.shape)}")
        if b.ndim != 2:
            out.append(f"{path}.B: expected shape (out, r), got {tuple(b.shape)}")
        elif a.ndim >= 1 and b.shape[1] != a.shape[0]:
            out.append(f"{path}: rank mismatch, A has {a.shape[0]} rows but B has {b.shape[1]} columns "
                       f"(A {tuple(a.shape)}, B {tuple(b.shape)})")
        if a.ndim >= 1 and a.shape[0] == 0:
            out.append(f"{path}: rank is 0")
        for role, t in self.tensors().items():
            if not t.is_floating_point():
                out.append(f"{path}.{role}: expected a floating dtype, got {t.dtype}")
            elif not all_finite(t):
                out.append(f"{path}.{role}: contains NaN or inf")
        if a.dtype != b.dtype:
            out.append(f"{path}: A is {a.dtype} but B is {b.dtype}")
        if not math.isfinite(self.alpha):
            out.append(f"{path}: alpha is {self.alpha}")
        if self.magnitude is not None:
            if self.kind == "embedding":
                out.append(f"{path}.magnitude: DoRA is not defined for embeddings")
            elif b.ndim == 2 and tuple(self.magnitude.shape) != (b.shape[0],):
                out.append(f"{path}.magnitude: expected shape ({b.shape[0]},), got {tuple(self.magnitude.shape)}")
        return out


def dora_weight(base_weight: Tensor, lowrank_delta: Tensor, magnitude: Tensor, kind: str) -> Tensor:
    """DoRA's adapted weight ``m · (W + ΔW) / ‖W + ΔW‖`` with the norm taken per output unit (Liu et al. 2024).

    Args:
        base_weight: W in the base layer's layout.
        lowrank_delta: ``scale·B·A`` in the same layout.
        magnitude: m, (out,).
        kind: layer kind, which tells where the output axis is.
    """
    w = base_weight + lowrank_delta
    out_dim = 1 if kind == "linear_t" else 0
    reduce = [d for d in range(w.ndim) if d != out_dim]
    norm = w.norm(p=2, dim=reduce, keepdim=True)
    shape = [1] * w.ndim
    shape[out_dim] = -1
    return w * (magnitude.view(shape) / norm)


@dataclass(frozen=True, eq=False)
class Adapter:
    """A LoRA adapter as data.

    Attributes:
        modules: module path in the base model → its factors.
        overrides: base-model state-dict key → a full tensor that replaces it (modules trained fully alongside the
            LoRA, such as a fresh classifier head).
        base_model: identity of the base model the adapter was trained on (hub id, path or free text).
        targets: the target patterns the adapter was injected with, for the record.
        metadata: free-form user metadata, string to string (safetensors metadata is strings only).
    """

    modules: Mapping[str, ModuleLora]
    overrides: Mapping[str, Tensor] = field(default_factory=dict)
    base_model: str | None = None
    targets: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.modules)

    def __iter__(self):
        return iter(self.modules)

    def __getitem__(self, path: str) -> ModuleLora:
        return self.modules[path]

    @property
    def paths(self) -> list[str]:
        return list(self.modules)

    @property
    def total_rank(self) -> int:
        return sum(m.rank for m in self.modules.values())

    @property
    def num_params(self) -> int:
        return sum(m.numel for m in self.modules.values()) + sum(t.numel() for t in self.overrides.values())

    @property
    def nbytes(self) -> int:
        return (sum(m.nbytes for m in self.modules.values())
                + sum(t.numel() * t.element_size() for t in self.overrides.values()))

    @property
    def dtype(self) -> torch.dtype | None:
        """The common dtype of the factors, or ``None`` if empty or mixed."""
        dtypes = {t.dtype for m in self.modules.values() for t in m.tensors().values()}
        return dtypes.pop() if len(dtypes) == 1 else None

    def delta(self, path: str, base_weight: Tensor | None = None) -> Tensor:
        """The weight update of module ``path`` in its base layer's layout (see :meth:`ModuleLora.delta`)."""
        return self.modules[path].delta(base_weight)

    def scaled(self, factor: float, paths: Iterable[str] | None = None) -> Adapter:
        """A copy whose updates are multiplied by ``factor`` (on ``paths`` only, if given).

        The factor goes into alpha alone, so the factors stay bit-identical. For DoRA modules alpha scales the
        direction update, not the whole delta (the magnitude is kept).
        """
        chosen = set(self.modules if paths is None else paths)
        self._check_paths(chosen)
        mods = {p: (m.with_alpha(m.alpha * factor) if p in chosen else m) for p, m in self.modules.items()}
        return replace(self, modules=mods)

    def cast(self, dtype: torch.dtype) -> Adapter:
        """A copy with every factor and override cast to ``dtype`` (floating tensors only)."""
        if not dtype.is_floating_point:
            raise AdapterValidationError([f"cannot cast an adapter to non-floating dtype {dtype}"])
        mods = {p: m.to(dtype) for p, m in self.modules.items()}
        over = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in self.overrides.items()}
        return replace(self, modules=mods, overrides=over)

    def select(self, paths: Iterable[str], keep_overrides: bool = True) -> Adapter:
        """A copy with only the modules in ``paths`` (in this adapter's order)."""
        chosen = set(paths)
        self._check_paths(chosen)
        mods = {p: m for p, m in self.modules.items() if p in chosen}
        return replace(self, modules=mods, overrides=dict(self.overrides) if keep_overrides else {})

    def problems(self) -> list[str]:
        out: list[str] = []
        for path, mod in self.modules.items():
            if not path or any(seg == "" for seg in path.split(".")):
                out.append(f"invalid module path {path!r}")
            out.extend(mod.problems(path))
        for key, t in self.overrides.items():
            if t.is_floating_point() and not all_finite(t):
                out.append(f"override {key}: contains NaN or inf")
        for k, v in self.metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                out.append(f"metadata {k!r}: keys and values must be strings, got {type(v).__name__}")
        return out

    def validate(self, source: str | None = None) -> Adapter:
        """Return ``self`` if consistent, else raise :class:`AdapterValidationError` listing every problem."""
        problems = self.problems()
        if problems:
            raise AdapterValidationError(problems, source)
        return self

    def _check_paths(self, paths: set[str]) -> None:
        unknown = sorted(paths - set(self.modules))
        if unknown:
            raise AdapterValidationError([f"module {p!r} is not in this adapter" for p in unknown])


def adapters_equal(a: Adapter, b: Adapter) -> bool:
    """Exact (bitwise) equality of two adapters: same modules in the same order, factors, alphas and metadata."""

    def same(x: Tensor | None, y: Tensor | None) -> bool:
        if x is None or y is None:
            return x is y
        return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)

    if list(a.modules) != list(b.modules) or list(a.overrides) != list(b.overrides):
        return False
    for p, ma in a.modules.items():
        mb = b.modules[p]
        if (ma.alpha, ma.kind, ma.rslora) != (mb.alpha, mb.kind, mb.rslora):
            return False
        if not (same(ma.A, mb.A) and same(ma.B, mb.B) and same(ma.magnitude, mb.magnitude)):
            return False
    if not all(same(t, b.overrides[k]) for k, t in a.overrides.items()):
        return False
    return (a.base_model, tuple(a.targets), dict(a.metadata)) == (b.base_model, tuple(b.targets), dict(b.metadata))
