"""Which modules of a model get an adapter: name patterns, presets and layer-index ranges.

A pattern is one of

* an exact module path: ``bert.encoder.layer.0.attention.self.query``;
* a dotted suffix, matched on whole segments: ``query`` or ``attention.self.query`` (``query`` does not match
  ``myquery``);
* a glob over the whole path or a dotted suffix of it: ``layer.*.attention.self.query``; ``*`` and ``?`` stay
  inside one dotted segment, ``**`` spans segments, ``[...]`` is a character class;
* a regular expression over the whole path, written ``re:<regex>``: ``re:.*\\.(query|value)$``;
* a preset: ``all-linear`` (every linear layer except the output head and the output projections of
  ``nn.MultiheadAttention``), ``all-conv`` (every Conv1d/Conv2d).

The output head (see :func:`output_head`) follows PEFT's ``all-linear`` rule: on a transformers model it is the
output embedding (``lm_head``), else a sequence-classification head at ``model.score`` / ``model.classifier``,
else none (a headless ``BertModel``'s ``pooler.dense`` is an ordinary layer); on any other model it is the last
linear layer registered (the classifier of a plain classification model).

``nn.MultiheadAttention`` never calls its ``out_proj``'s forward: ``F.multi_head_attention_forward`` reads
``out_proj.weight`` directly, so an adapter there would never run (its gradients stay ``None``), and the q/k/v
projections are one packed parameter, not modules. The ``all-linear`` preset skips these ``out_proj`` layers, as
it skips the head, so ``all-linear`` stays usable on models built from ``nn.TransformerEncoderLayer``
(torchvision's ViT among them) and adapts their feed-forward layers; a pattern naming one explicitly is refused
with a :class:`TargetError` that names it. PEFT instead swaps the whole attention module for a wrapper that merges
the update into the weights around each call; lorakit keeps base modules intact and does not do that.
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


#: Attributes under which transformers models keep a sequence-classification head (PEFT's ``SEQ_CLS_HEAD_NAMES``).
CLASSIFIER_HEAD_NAMES = ("score", "classifier")


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output layer or head block, every linear layer of which ``all-linear`` leaves alone.

    A transformers model (it has ``get_output_embeddings``) gets PEFT's rule: its output embedding (``lm_head``) if
    it has one, else the first of ``model.score`` / ``model.classifier`` (a linear, or a block of them such as
    RoBERTa's ``classifier.dense`` + ``classifier.out_proj``, all left alone as PEFT does for ``SEQ_CLS``), else
    ``None``: a headless encoder (``BertModel``) has no output head, and its pooler is an ordinary layer. Any other
    model: the last linear layer registered (the classifier of a plain classification model).
    """
    get = getattr(model, "get_output_embeddings", None)
    if callable(get):
        head = get()
        if isinstance(head, nn.Module):
            return head
        for name in CLASSIFIER_HEAD_NAMES:
            head = getattr(model, name, None)
            if isinstance(head, nn.Module):
                return head
        return None
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear) or (isinstance(m, LoraLayer) and m.kind == "linear"):
            last = m
    return last


def unreachable_layers(model: nn.Module) -> dict[str, str]:
    """Module path → path of the module that reads its weight without calling its forward.

    Today these are the ``out_proj`` layers of ``nn.MultiheadAttention`` (see the module docstring): an adapter on
    one would never run.
    """
    out: dict[str, str] = {}
    for path, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            out[f"{path}.out_proj" if path else "out_proj"] = path
    return out


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
        TargetError: a pattern is malformed, matches nothing, matches only modules lorakit cannot adapt, or
            selects a layer whose forward its parent never calls (:func:`unreachable_layers`).
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
    in_head = {id(m) for m in head.modules()} if head is not None else set()
    unreachable = unreachable_layers(model)

    hits: dict[str, list[str]] = {p: [] for p in targets}
    unsupported: dict[str, list[str]] = {p: [] for p in targets}
    refused: dict[str, list[str]] = {p: [] for p in targets}
    chosen: list[str] = []
    for path, module in model.named_modules():
        if not path or any(matches(x, path) for x in exclude):
            continue
        # Inside a LoRA layer (its factor modules) nothing is a target.
        if ".lora." in f".{path}." and _inside_lora(model, path):
            continue
        adaptable = isinstance(module, LoraLayer) or lora_layer_type(module) is not None
        in_layers = wanted is None or indices.get(path) in wanted
        selected = False
        for p in targets:
            if p in PRESETS:
                ok = adaptable and id(module) not in in_head and path not in unreachable and _in_preset(p, module)
            else:
                ok = matches(p, path)
            if not ok:
                continue
            if path in unreachable:  # whether or not its type could carry a LoRA: the forward never runs
                if in_layers:
                    refused[p].append(path)
            elif adaptable:
                hits[p].append(path)
                selected = True
            else:
                unsupported[p].append(f"{path} ({type(module).__name__})")
        if selected and in_layers:
            chosen.append(path)

    problems = []
    for p in targets:
        if refused[p]:
            owners = ", ".join(f"{x!r} (of nn.MultiheadAttention {unreachable[x] or '<model>'!r})"
                               for x in refused[p])
            problems.append(f"target {p!r} selects {owners}: nn.MultiheadAttention reads out_proj.weight directly "
                            "(F.multi_head_attention_forward) and never calls out_proj, so an adapter there would "
                            "never run; exclude it (exclude=[...]) or adapt other layers")
        if hits[p] or refused[p]:
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
