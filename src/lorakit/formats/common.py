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

from lorakit.errors import FileFormatError, LorakitError

#: String-metadata key of lorakit's hints in foreign files.
EXTRAS_KEY = "lorakit.extras"


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
    try:
        extras = json.loads(raw)
    except json.JSONDecodeError as e:
        raise FileFormatError(source, f"metadata {EXTRAS_KEY!r}: not valid JSON ({e})") from None
    if not isinstance(extras, dict):
        raise FileFormatError(source, f"metadata {EXTRAS_KEY!r}: expected a JSON object")
    return extras


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
