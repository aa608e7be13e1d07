"""Pieces every foreign dialect shares: the lossiness rule, exact alpha tensors, and lorakit's own hints.

**Lossiness.** A dialect that cannot express part of an adapter (per-module rsLoRA in kohya, full-module overrides
in diffusers...) makes the writer collect every such part and raise :class:`NotRepresentableError` listing them, or,
with ``lossy=True``, emit one ``warnings.warn`` listing them and write the rest. Nothing is dropped silently.

**Hints.** Foreign files carry a string-metadata entry :data:`EXTRAS_KEY` (JSON) with what the dialect has no place
for but lorakit needs for an exact round trip: layer kinds that the tensor shapes cannot tell (``linear_t``), the
exact path of each kohya name, the adapter's base model, targets and user metadata. Other tools ignore it; a file
without it is read by the dialect's own rules.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from lorakit.adapter import KINDS
from lorakit.errors import FileFormatError, LorakitError
from lorakit.formats import checked
from lorakit.formats.checked import Map, Obj, Opt, Str

#: String-metadata key of lorakit's hints in foreign files.
EXTRAS_KEY = "lorakit.extras"
#: Pipeline components a hint's ``root`` may name (kohya's and diffusers').
ROOTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
#: What lorakit's hints may hold; every field is optional (a file without hints is read by the dialect's rules).
EXTRAS_SCHEMA = Obj(optional={
    "kinds": Map(Str(choices=KINDS)), "targets": checked.List(Str()), "metadata": Map(Str()),
    "order": checked.List(Str(), unique=True), "override_order": checked.List(Str(), unique=True),
    "paths": Map(Str(nonempty=True)), "root": Opt(Str(choices=ROOTS)), "base_model": Opt(Str())})
#: dtypes lorakit computes LoRA factors in; float8 and integer factors are refused on read.
FACTOR_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz",
                                            "float8_e8m0fnu") if hasattr(torch, n))


class NotRepresentableError(LorakitError):
    """Part of an adapter has no form in the target dialect; the message lists every such part."""

    def __init__(self, dialect: str, problems: Sequence[str]):
        self.dialect = dialect
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} part(s) of the adapter cannot be written as {dialect} "
                         f"(pass lossy=True / --lossy to write without them):\n{lines}")


class LossyConversionWarning(UserWarning):
    """A lossy conversion dropped or approximated the listed parts."""


def report_loss(dialect: str, problems: Sequence[str], lossy: bool) -> None:
    """Raise :class:`NotRepresentableError` for ``problems``, or warn once listing them when ``lossy``."""
    if not problems:
        return
    if not lossy:
        raise NotRepresentableError(dialect, problems)
    warnings.warn(f"lossy conversion to {dialect}: " + "; ".join(problems), LossyConversionWarning, stacklevel=3)


def alpha_tensor(alpha: float) -> Tensor:
    """A 0-d tensor holding ``alpha`` exactly: float32 when that is exact, else float64."""
    t = torch.tensor(alpha, dtype=torch.float32)
    return t if float(t) == alpha else torch.tensor(alpha, dtype=torch.float64)


def alpha_value(t: Tensor, source: str, key: str) -> float:
    """The float in a 1-element alpha tensor.

    Raises:
        FileFormatError: the tensor holds more than one value or a non-finite one.
    """
    if t.numel() != 1:
        raise FileFormatError(source, f"{key!r}: alpha must hold one value, got shape {tuple(t.shape)}")
    if t.dtype == torch.bool or t.dtype in _FLOAT8 or t.is_complex():
        raise FileFormatError(source, f"{key!r}: alpha must be a float or integer tensor, got {t.dtype}")
    value = float(t.reshape(()).double())
    if value != value or value in (float("inf"), float("-inf")):
        raise FileFormatError(source, f"{key!r}: alpha is {value}")
    return value


def json_number(x: float) -> int | float:
    """``x`` as an int when integral (``16`` rather than ``16.0`` in configs), else the float itself."""
    return int(x) if float(x).is_integer() and abs(x) < 2**53 else float(x)


def pack_extras(extras: Mapping) -> dict[str, str]:
    """The string-metadata entry holding lorakit's hints (empty values left out)."""
    kept = {k: v for k, v in extras.items() if v not in (None, {}, [], ())}
    return {EXTRAS_KEY: json.dumps(kept, sort_keys=True)} if kept else {}


def unpack_extras(metadata: Mapping[str, str], source: str) -> dict:
    """lorakit's hints from a file's string metadata ({} if none).

    Raises:
        FileFormatError: the entry is present but not a JSON object.
    """
    raw = metadata.get(EXTRAS_KEY)
    if raw is None:
        return {}
    return checked.load(raw, EXTRAS_SCHEMA, source, f"metadata {EXTRAS_KEY!r}")


def factor_problems(name: str, t: Tensor, ndims: Sequence[int]) -> list[str]:
    """Why tensor ``name`` cannot be a LoRA factor (empty when it can).

    Checked before any arithmetic touches it: the number of dims (a 0-d tensor has no rank), every dim ≥ 1 (an
    empty rank-10⁶ factor would pass a bytes check yet make r×r Gram matrices huge), a dtype lorakit computes in.
    """
    if t.ndim not in ndims:
        want = " or ".join(map(str, ndims))
        return [f"{name}: expected {want} dims, got shape {tuple(t.shape)}"]
    if any(s == 0 for s in t.shape):
        return [f"{name}: shape {tuple(t.shape)} has a zero-size dimension"]
    if t.dtype not in FACTOR_DTYPES:
        return [f"{name}: dtype {str(t.dtype).removeprefix('torch.')} is not a factor dtype lorakit can use "
                f"(float16, bfloat16, float32, float64)"]
    return []


def override_problems(name: str, t: Tensor) -> list[str]:
    """Why tensor ``name`` cannot be a full-tensor override: float8 (no finiteness check or arithmetic on it)."""
    if t.dtype in _FLOAT8:
        return [f"{name}: dtype {str(t.dtype).removeprefix('torch.')} is not supported for full tensors"]
    return []


def tensor_set_problems(expected: Sequence[str], found: Sequence[str]) -> list[str]:
    """The differences between the tensors a header declares and those a file holds, as one message each way."""
    want, have = set(expected), set(found)
    out = []
    if want - have:
        out.append(f"tensor(s) declared but missing from the file: {_listed(sorted(want - have))}")
    if have - want:
        out.append(f"tensor(s) in the file but not declared: {_listed(sorted(have - want))}")
    return out


def _listed(keys: Sequence[str], n: int = 8) -> str:
    shown = ", ".join(repr(k) for k in keys[:n])
    return shown + (f" and {len(keys) - n} more" if len(keys) > n else "")


def kind_from_shape(a: Tensor, hinted: str | None) -> str:
    """Layer kind of a module from its down factor's rank of dims, unless lorakit left a hint."""
    if hinted:
        return hinted
    return {3: "conv1d", 4: "conv2d"}.get(a.ndim, "linear")


def shape_kind_hints(modules: Mapping) -> dict[str, str]:
    """Per-module kind hints needed where the factor shapes do not tell the kind (linear_t, embedding)."""
    return {p: m.kind for p, m in modules.items() if m.kind != kind_from_shape(m.A, None)}


def in_order(items: Mapping[str, object], order: Sequence[str] | None) -> dict:
    """``items`` in the order a lorakit hint recorded (files sort their keys); unchanged if the hint does not fit."""
    if not order or set(order) != set(items) or len(order) != len(items):
        return dict(items)
    return {k: items[k] for k in order}
