"""diffusers LoRA files: one ``.safetensors`` file, tensors keyed by pipeline component.

Written (the layout of ``save_lora_weights`` in current diffusers; ``C`` = ``unet``, ``text_encoder``,
``text_encoder_2``; ``P`` = module path inside that component)::

    C.P.lora_A.weight / C.P.lora_B.weight / C.P.lora_magnitude_vector      (PEFT's shapes, see formats/peft.py)
    metadata "lora_adapter_metadata": JSON {"C.r": .., "C.lora_alpha": .., "C.rank_pattern": {..},
                                            "C.alpha_pattern": {..}, "C.use_rslora": .., "C.use_dora": ..}

Also read: the older ``C.P.lora.down.weight`` / ``.lora.up.weight`` (``lora_linear_layer`` in text encoders), the
attention-processor names ``C.….processor.to_q_lora.down.weight`` (→ ``….to_q``, ``to_out_lora`` → ``to_out.0``),
keys without a component (old ``unet.save_attn_procs`` files: the UNet), and per-module ``C.P.alpha`` tensors.
Without any alpha information, alpha = r (what diffusers assumes).

Paths come back with their component (``unet.down_blocks…``) unless ``root`` names one component.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping

from torch import Tensor

from lorakit.adapter import Adapter, ModuleLora
from lorakit.errors import FileFormatError, LorakitError
from lorakit.formats import checked, peft
from lorakit.formats.checked import Map
from lorakit.formats.common import (EXTRAS_KEY, alpha_value, factor_problems, in_order, kind_from_shape,
                                    pack_extras, report_loss, shape_kind_hints, unpack_extras)
from lorakit.formats.safetensors_io import read_safetensors, write_safetensors

DIALECT = "diffusers"
METADATA_KEY = "lora_adapter_metadata"
COMPONENTS = ("unet", "text_encoder", "text_encoder_2", "transformer")
_KEY_RE = re.compile(r"^(.+?)\.(lora_A\.weight|lora_B\.weight|lora_magnitude_vector|lora\.down\.weight"
                     r"|lora\.up\.weight|lora_linear_layer\.down\.weight|lora_linear_layer\.up\.weight|alpha)$")
_PROC_RE = re.compile(r"^(.+)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
_ROLE = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_magnitude_vector": "magnitude", "lora.down.weight": "A",
         "lora.up.weight": "B", "lora_linear_layer.down.weight": "A", "lora_linear_layer.up.weight": "B",
         "alpha": "alpha"}


def to_tensors(adapter: Adapter, *, root: str | None = None, lossy: bool = False
               ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Adapter → diffusers (tensors, string metadata).

    Args:
        root: component of bare paths (``"unet"`` for an adapter made on a ``UNet2DConditionModel``); without it
            every path must start with a component name.

    Raises:
        NotRepresentableError: overrides, or mixed rsLoRA / DoRA within a component (unless ``lossy``).
        LorakitError: a path without a component.
    """
    by_comp: dict[str, dict[str, ModuleLora]] = {}
    bad = []
    for path, m in adapter.modules.items():
        comp, _, sub = (root, "", path) if root is not None else path.partition(".")
        if comp not in COMPONENTS or not sub:
            bad.append(path)
            continue
        by_comp.setdefault(comp, {})[sub] = m
    if bad:
        raise LorakitError(f"module path(s) {bad} start with no component ({', '.join(COMPONENTS)}); pass root=")
    lost = [f"override {k}: diffusers LoRA files have no full-module tensors (dropped)" for k in adapter.overrides]
    report_loss(DIALECT, lost, lossy)
    tensors: dict[str, Tensor] = {}
    config: dict[str, object] = {}
    for comp, mods in by_comp.items():
        sub_adapter = Adapter(mods)
        t, _, cfg = peft.to_tensors(sub_adapter, lossy=lossy, prefix=f"{comp}.", dialect=DIALECT)
        tensors.update(t)
        for field in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora",
                      "target_modules", "fan_in_fan_out"):
            config[f"{comp}.{field}"] = cfg[field]
    metadata = {"format": "pt", METADATA_KEY: json.dumps(config, sort_keys=True)}
    metadata.update(pack_extras({"kinds": shape_kind_hints(adapter.modules), "root": root,
                                 "base_model": adapter.base_model, "targets": list(adapter.targets),
                                 "metadata": dict(adapter.metadata), "order": list(adapter.modules)}))
    return tensors, metadata


def _split(key: str) -> tuple[str, str, str] | None:
    """(component, module path, role) of a diffusers key, or None."""
    comp, _, rest = key.partition(".")
    if comp not in COMPONENTS:
        comp, rest = "unet", key
    m = _PROC_RE.match(rest)
    if m is not None:
        name = m.group(2) if m.group(2) != "to_out" else "to_out.0"
        return comp, f"{m.group(1)}.{name}", "A" if m.group(3) == "down" else "B"
    m = _KEY_RE.match(rest)
    if m is None:
        return None
    path = m.group(1).replace(".processor.", ".")
    return comp, path, _ROLE[m.group(2)]


def read_config(metadata: Mapping[str, str], source: str = "<memory>") -> dict:
    """The checked ``lora_adapter_metadata`` JSON ({} if absent): each component's ``C.<field>`` entries must pass
    PEFT's :data:`lorakit.formats.peft.CONFIG_SCHEMA` (``"C.use_rslora": "false"`` is refused, not read as true).

    Raises:
        FileFormatError: bad JSON, or a field of the wrong type, naming the ``C.<field>`` key.
    """
    raw = metadata.get(METADATA_KEY)
    if not raw:
        return {}
    what = f"metadata {METADATA_KEY!r}"
    config = checked.load(raw, Map(), source, what)
    for comp in COMPONENTS:
        fields = {k.removeprefix(comp + "."): v for k, v in config.items() if k.startswith(comp + ".")}
        checked.check(fields, peft.CONFIG_SCHEMA, source, f"{what}, component {comp!r}")
    return config


def from_tensors(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], source: str = "<memory>", *,
                 root: str | None = None) -> Adapter:
    """diffusers (tensors, metadata) → validated :class:`Adapter`.

    Args:
        root: read only this component, with bare paths (default: the file's lorakit hint, else every component
            with component-prefixed paths).

    Raises:
        FileFormatError: naming every unknown key, missing factor or bad shape.
    """
    extras = unpack_extras(metadata, source)
    if root is None:
        root = extras.get("root")
    config = read_config(metadata, source)
    problems: list[str] = []
    groups: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, t in tensors.items():
        split = _split(key)
        if split is None:
            problems.append(f"{key!r}: not a diffusers LoRA key (<component>.<path>.lora_A.weight / lora_B.weight, "
                            f".lora.down/up.weight, .processor.to_q_lora.down.weight, .alpha)")
            continue
        comp, path, role = split
        if role in groups.get((comp, path), {}):
            problems.append(f"{key!r}: a second {role} for module {comp}.{path}")
        groups.setdefault((comp, path), {})[role] = t
    kinds = extras.get("kinds") or {}
    mods: dict[str, ModuleLora] = {}
    for (comp, path), parts in groups.items():
        if root is not None and comp != root:
            continue
        full = path if root is not None else f"{comp}.{path}"
        if "A" not in parts or "B" not in parts:
            problems.append(f"{comp}.{path}: missing the {'down (A)' if 'A' not in parts else 'up (B)'} factor")
            continue
        a, b = parts["A"], parts["B"]
        found = (factor_problems(f"{comp}.{path} down factor", a, (2, 3, 4))
                 + factor_problems(f"{comp}.{path} up factor", b, (2, 3, 4)))
        if "magnitude" in parts:
            found += factor_problems(f"{comp}.{path}.lora_magnitude_vector", parts["magnitude"], (1, 4))
        if found:
            problems.extend(found)
            continue
        if b.ndim != a.ndim or any(s != 1 for s in b.shape[2:]):
            problems.append(f"{comp}.{path}: up factor {tuple(b.shape)} does not fit down factor {tuple(a.shape)}")
            continue
        rank = a.shape[0]
        r_cfg = peft.pattern_value(config.get(f"{comp}.rank_pattern") or {}, path, config.get(f"{comp}.r", rank))
        if r_cfg != rank:
            problems.append(f"{comp}.{path}: metadata says rank {r_cfg} but the down factor has shape "
                            f"{tuple(a.shape)}")
            continue
        if "alpha" in parts:
            alpha = alpha_value(parts["alpha"], source, f"{comp}.{path}.alpha")
        else:
            alpha = float(peft.pattern_value(config.get(f"{comp}.alpha_pattern") or {}, path,
                                             config.get(f"{comp}.lora_alpha", rank)))
        mag = parts.get("magnitude")
        if mag is not None:
            if mag.numel() != b.shape[0]:
                problems.append(f"{comp}.{path}.lora_magnitude_vector: expected {b.shape[0]} values, got "
                                f"{tuple(mag.shape)}")
                continue
            mag = mag.reshape(-1)
        mods[full] = ModuleLora(A=a, B=b.reshape(b.shape[0], b.shape[1]), alpha=alpha,
                                kind=kind_from_shape(a, kinds.get(f"{comp}.{path}", kinds.get(path))),
                                rslora=config.get(f"{comp}.use_rslora", False), magnitude=mag)
        problems.extend(mods[full].problems(f"{comp}.{path}"))
    if problems:
        raise FileFormatError(source, "; ".join(problems))
    user = extras.get("metadata")
    if user is None:
        user = {k: v for k, v in metadata.items() if k not in ("format", EXTRAS_KEY, METADATA_KEY)}
    adapter = Adapter(in_order(mods, extras.get("order")), base_model=extras.get("base_model"),
                      targets=tuple(extras.get("targets") or ()),
                      metadata=user)
    return adapter.validate(source)


def save(adapter: Adapter, path: str | os.PathLike, *, root: str | None = None, lossy: bool = False) -> None:
    """Write ``adapter`` as one diffusers ``.safetensors`` file atomically."""
    adapter.validate(str(path))
    tensors, metadata = to_tensors(adapter, root=root, lossy=lossy)
    write_safetensors(tensors, path, metadata)


def load(path: str | os.PathLike, *, root: str | None = None) -> Adapter:
    """Read a diffusers LoRA ``.safetensors`` file (see :func:`from_tensors`)."""
    tensors, metadata = read_safetensors(path)
    return from_tensors(tensors, metadata, str(path), root=root)
