"""Which modules of a model get an adapter: name patterns, presets and layer-index ranges.

A pattern is one of

* an exact module path: ``bert.encoder.layer.0.attention.self.query``;
* a dotted suffix, matched on whole segments: ``query`` or ``attention.self.query`` (``query`` does not match
  ``myquery``);
* a glob over the whole path or a dotted suffix of it: ``layer.*.attention.self.query``; ``*`` and ``?`` stay
  inside one dotted segment, ``**`` spans segments, ``[...]`` is a character class;
* a regular expression over the whole path, written ``re:<regex>``: ``re:.*\\.(query|value)$``;
* a preset: ``all-linear`` (every linear layer except the output head), ``all-conv`` (every Conv1d/Conv2d).

The output head is ``model.get_output_embeddings()`` where the model has one (transformers), else the last
linear layer registered in the model (the classifier of a plain classification model).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

from torch import nn

from lorakit.errors import TargetError
from lorakit.layers import LoraLayer, base_kind, lora_layer_type

PRESETS = ("all-linear", "all-conv")
_GLOB_CHARS = set("*?[")


def matches(pattern: str, path: str) -> bool:
    """Whether module ``path`` matches one name pattern (not a preset)."""
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], path) is not None
    if _GLOB_CHARS & set(pattern):
        return re.fullmatch(r"(?:.*\.)?" + _glob_to_regex(pattern), path) is not None
    return path == pattern or path.endswith("." + pattern)


def _glob_to_regex(pattern: str) -> str:
    """Glob over dotted paths: ``*`` and ``?`` stay inside one segment, ``**`` spans segments, ``[..]`` a class."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
            continue
        if c == "*":
            out.append(r"[^.]*")
        elif c == "?":
            out.append(r"[^.]")
        elif c == "[" and "]" in pattern[i + 1:]:
            j = pattern.index("]", i + 1)
            out.append(pattern[i:j + 1])
            i = j + 1
            continue
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def check_pattern(pattern: str) -> None:
    """Raise :class:`TargetError` for a malformed pattern (bad regex, empty)."""
    if not pattern:
        raise TargetError("empty target pattern")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as e:
            raise TargetError(f"target {pattern!r}: invalid regular expression: {e}") from None


def parse_layers(spec: str | Iterable[int] | None) -> set[int] | None:
    """``"0-2,5"`` or ``[0, 1, 2, 5]`` → ``{0, 1, 2, 5}``; ``None`` means every layer."""
    if spec is None:
        return None
    if not isinstance(spec, str):
        return {int(i) for i in spec}
    out: set[int] = set()
    for part in spec.replace(" ", "").split(","):
        try:
            if "-" in part:
                lo, hi = part.split("-")
                out.update(range(int(lo), int(hi) + 1))
            elif part:
                out.add(int(part))
        except ValueError:
            raise TargetError(f"layers {spec!r}: expected indices and ranges like '0-2,5'") from None
    return out


def layer_indices(model: nn.Module) -> dict[str, int]:
    """Module path → index of the repeated block it lives in (the first ``nn.ModuleList`` on its path)."""
    out: dict[str, int] = {}

    def walk(module: nn.Module, prefix: str, index: int | None) -> None:
        for child_name, child in module.named_children():
            path = f"{prefix}.{child_name}" if prefix else child_name
            idx = index
            if idx is None and isinstance(module, nn.ModuleList) and child_name.isdigit():
                idx = int(child_name)
            if idx is not None:
                out[path] = idx
            walk(child, path, idx)

    walk(model, "", None)
    return out


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output layer, which ``all-linear`` leaves alone."""
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module):
            return head
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear) or (isinstance(m, LoraLayer) and m.kind == "linear"):
            last = m
    return last


def _in_preset(preset: str, module: nn.Module) -> bool:
    kind = base_kind(module)
    if preset == "all-linear":
        return kind in ("linear", "linear_t")
    return kind in ("conv1d", "conv2d")


def find_targets(model: nn.Module, targets: Sequence[str], *, layers: str | Iterable[int] | None = None,
                 exclude: Sequence[str] = ()) -> list[str]:
    """Module paths of ``model`` selected by ``targets``, in the model's registration order.

    Args:
        model: any ``nn.Module``.
        targets: patterns and presets (see the module docstring).
        layers: keep only modules inside these block indices (``"0-2,5"``); modules outside any block are dropped.
        exclude: patterns of modules never to select.

    Raises:
        TargetError: a pattern is malformed, matches nothing, or matches only modules lorakit cannot adapt.
    """
    if isinstance(targets, str):
        targets = [targets]
    if not targets:
        raise TargetError("no target patterns given")
    for p in [*targets, *exclude]:
        if p not in PRESETS:
            check_pattern(p)
    wanted = parse_layers(layers)
    indices = layer_indices(model) if wanted is not None else {}
    head = output_head(model) if "all-linear" in targets else None

    hits: dict[str, list[str]] = {p: [] for p in targets}
    unsupported: dict[str, list[str]] = {p: [] for p in targets}
    chosen: list[str] = []
    for path, module in model.named_modules():
        if not path or any(matches(x, path) for x in exclude):
            continue
        # Inside a LoRA layer (its factor modules) nothing is a target.
        if ".lora." in f".{path}." and _inside_lora(model, path):
            continue
        adaptable = isinstance(module, LoraLayer) or lora_layer_type(module) is not None
        selected = False
        for p in targets:
            if p in PRESETS:
                ok = adaptable and module is not head and _in_preset(p, module)
            else:
                ok = matches(p, path)
            if not ok:
                continue
            if adaptable:
                hits[p].append(path)
                selected = True
            else:
                unsupported[p].append(f"{path} ({type(module).__name__})")
        if selected and (wanted is None or indices.get(path) in wanted):
            chosen.append(path)

    problems = []
    for p in targets:
        if hits[p]:
            continue
        if unsupported[p]:
            shown = ", ".join(unsupported[p][:3]) + (" ..." if len(unsupported[p]) > 3 else "")
            problems.append(f"target {p!r} matches only modules lorakit cannot adapt: {shown}")
        else:
            problems.append(f"target {p!r} matches no module")
    if problems:
        raise TargetError("; ".join(problems))
    if not chosen:
        raise TargetError(f"targets {list(targets)} with layers={layers!r} select no module")
    return chosen


def _inside_lora(model: nn.Module, path: str) -> bool:
    segs = path.split(".")
    for i in range(1, len(segs)):
        if segs[i] == "lora" and isinstance(model.get_submodule(".".join(segs[:i])), LoraLayer):
            return True
    return False


def first_match(path: str, patterns: Mapping[str, object]) -> object | None:
    """The value of the first pattern in ``patterns`` that matches ``path``, or ``None``."""
    for p, value in patterns.items():
        check_pattern(p)
        if matches(p, path):
            return value
    return None
