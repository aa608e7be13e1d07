"""kohya sd-scripts / A1111 / ComfyUI LoRA files (also LyCORIS "LoCon" conv LoRA and DoRA).

Tensor keys, one group per module (``NAME`` = prefix + path with ``.`` → ``_``, see :mod:`lorakit.formats.names`)::

    NAME.lora_down.weight   A: (r, in) or (r, in, *kernel)
    NAME.lora_up.weight     B: (out, r), or (out, r, 1, 1) for conv2d / (out, r, 1) for conv1d
    NAME.alpha              0-d: alpha (absent → alpha = r, kohya's default)
    NAME.dora_scale         DoRA magnitude, (out, 1) / (out, 1, 1, 1) (output-axis layout)

Prefixes: ``lora_unet_``, ``lora_te_`` (``lora_te1_`` when a second text encoder is present) and ``lora_te2_``.
Text-encoder names are spelled under CLIP's ``text_model`` level, as kohya, A1111, ComfyUI and diffusers' converter
expect (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``): kohya's names come from transformers 4's
``CLIPTextModel``, while transformers 5's has no ``text_model`` level (``encoder.layers.0…``) and
``CLIPTextModelWithProjection`` (SDXL's second encoder) still has one. The writer adds the level to a text-encoder path
that lacks it (paths under ``embeddings``, ``encoder``, ``final_layer_norm``); the reader gives each name the path
the model really has: from lorakit's hints, or from ``known_paths`` with or without the level; with neither, the
name as written (``text_encoder.text_model.encoder…``).
UNet names come in two spellings: diffusers paths (SD1.x files) and SGM/LDM paths (``input_blocks_4_1_…``, SDXL
files); both are read, and :func:`to_tensors` writes either (``sgm=True``). String metadata (``ss_*``,
``modelspec.*``) is kept as the adapter's metadata and written back.

kohya has no place for rsLoRA, embeddings and full-module overrides: writing them is an error, or with ``lossy=True``
a warning (rsLoRA is folded into alpha as ``alpha·√r``, the others are dropped).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterable, Mapping

from torch import Tensor

from lorakit.adapter import Adapter, ModuleLora
from lorakit.errors import FileFormatError, LorakitError
from lorakit.formats import kohya_metadata, names
from lorakit.formats.common import (EXTRAS_KEY, alpha_tensor, alpha_value, factor_problems, in_order,
                                    kind_from_shape, pack_extras, report_loss, shape_kind_hints, unpack_extras)
from lorakit.formats.safetensors_io import read_safetensors, write_safetensors

DIALECT = "kohya"
ROLES = ("lora_down.weight", "lora_up.weight", "alpha", "dora_scale")
KEY_RE = re.compile(r"^(lora_unet_|lora_te_|lora_te1_|lora_te2_)([A-Za-z0-9_]+)\.(lora_down\.weight|lora_up\.weight"
                    r"|alpha|dora_scale)$")
_PREFIX_COMPONENT = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                     "lora_te2_": "text_encoder_2"}
_SGM_HEADS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")
#: Components a lorakit path may start with; a bare path needs ``root``.
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
#: The children of CLIP's ``text_model`` level (``CLIPTextTransformer``); text-encoder paths starting with one of
#: them get the level in their kohya name.
CLIP_ROOTS = ("embeddings", "encoder", "final_layer_norm")
TEXT_MODEL = "text_model."
#: Down blocks with attention in each SGM UNet layout (decides where an up block's upsampler sits).
SGM_LAYOUTS = {"sd15": (0, 1, 2), "sdxl": (1, 2)}


def _split_component(path: str, root: str | None) -> tuple[str, str] | None:
    if root is not None:
        return root, path
    head, _, rest = path.partition(".")
    return (head, rest) if head in COMPONENTS and rest else None


def kohya_path(component: str, sub: str) -> str:
    """The path kohya names module ``sub`` of ``component`` by: text-encoder paths under ``text_model.``."""
    if component != "unet" and sub.split(".", 1)[0] in CLIP_ROOTS:
        return TEXT_MODEL + sub
    return sub


def to_tensors(adapter: Adapter, *, root: str | None = None, sgm: str | None = None, lossy: bool = False
               ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Adapter → kohya (tensors, string metadata).

    Args:
        adapter: the adapter; its paths start with a component (``unet.``, ``text_encoder.``,
            ``text_encoder_2.``) unless ``root`` names the one component they all belong to.
        root: component of bare paths (``"unet"`` for an adapter made on a ``UNet2DConditionModel``).
        sgm: spell UNet names the SGM/LDM way (``input_blocks_…``, as kohya does for SDXL) for this UNet layout,
            ``"sd15"`` or ``"sdxl"``; ``None`` keeps diffusers paths.
        lossy: warn instead of raising on parts kohya cannot hold.

    Raises:
        NotRepresentableError: listing every module or tensor kohya cannot hold (unless ``lossy``).
        LorakitError: a path has no component or no SGM equivalent.
    """
    if sgm is not None and sgm not in SGM_LAYOUTS:
        raise LorakitError(f"sgm must be one of {', '.join(SGM_LAYOUTS)}, got {sgm!r}")
    if root is not None and root not in COMPONENTS:
        raise LorakitError(f"root must be one of {', '.join(COMPONENTS)}, got {root!r}")
    lost: list[str] = []
    bad: list[str] = []
    tensors: dict[str, Tensor] = {}
    paths: dict[str, str] = {}
    comps = {split[0] for p in adapter.modules if (split := _split_component(p, root))}
    for path, m in adapter.modules.items():
        split = _split_component(path, root)
        if split is None:
            bad.append(f"{path!r}: no component prefix ({', '.join(c + '.' for c in COMPONENTS)}); pass root=")
            continue
        comp, sub = split
        if m.kind == "embedding":
            lost.append(f"{path}: embedding LoRA (kohya has no embedding form; dropped)")
            continue
        alpha = m.alpha
        if m.rslora:
            lost.append(f"{path}: rsLoRA scale (folded into alpha = alpha·√r, not bitwise)")
            alpha = m.alpha * math.sqrt(m.rank)
        prefix = names.KOHYA_PREFIXES["text_encoder_1" if comp == "text_encoder" and "text_encoder_2" in comps
                                      else comp]
        if comp == "unet" and sgm:
            try:
                sub = names.diffusers_to_sgm(sub, SGM_LAYOUTS[sgm])
            except LorakitError as e:
                bad.append(str(e))
                continue
        name = prefix + names.underscore(kohya_path(comp, sub))
        if name in paths:
            bad.append(f"{path!r} and {paths[name]!r} have the same kohya name {name!r}")
            continue
        paths[name] = path
        up = m.B.reshape(*m.B.shape, *([1] * (m.A.ndim - 2)))  # conv: (out, r, 1, 1)
        tensors[f"{name}.lora_down.weight"] = m.A
        tensors[f"{name}.lora_up.weight"] = up
        tensors[f"{name}.alpha"] = alpha_tensor(alpha)
        if m.magnitude is not None:
            tensors[f"{name}.dora_scale"] = m.magnitude.reshape(-1, *([1] * (m.A.ndim - 1)))
    for key in adapter.overrides:
        lost.append(f"override {key}: kohya has no full-module tensors (dropped)")
    if bad:
        raise LorakitError("cannot name modules in kohya form: " + "; ".join(bad))
    report_loss(DIALECT, lost, lossy)
    metadata = dict(adapter.metadata)
    metadata.update(pack_extras({"paths": paths, "kinds": shape_kind_hints(adapter.modules),
                                 "base_model": adapter.base_model, "targets": list(adapter.targets),
                                 "root": root, "order": list(adapter.modules)}))
    return tensors, metadata


def from_tensors(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], source: str = "<memory>", *,
                 root: str | None = None, known_paths: Iterable[str] | None = None) -> Adapter:
    """kohya (tensors, metadata) → validated :class:`Adapter`.

    Paths come back with their component (``unet.down_blocks…``, ``text_encoder.text_model…``), unless ``root``
    (or the file's lorakit hints) names one component: then only its modules are read, with bare paths. kohya's
    training metadata (``ss_*``) is checked (:func:`lorakit.formats.kohya_metadata.parse`) and kept as strings.

    Args:
        known_paths: module paths of the target model (same form as the returned paths), used to undo kohya's
            ``.`` → ``_``; without them lorakit's hints, then :func:`lorakit.formats.names.guess_path` are used.

    Raises:
        FileFormatError: naming every unknown key, missing factor, bad shape, unresolvable name or ``ss_*`` value
            of the wrong type.
    """
    extras = unpack_extras(metadata, source)
    hinted_paths: dict[str, str] = extras.get("paths") or {}
    kinds: dict[str, str] = extras.get("kinds") or {}
    hint_root = extras.get("root")
    if root is None:
        root = hint_root
    if root is not None and hint_root is None:  # hints hold component-prefixed paths; bare ones are wanted
        hinted_paths = {k: v.removeprefix(root + ".") for k, v in hinted_paths.items()
                        if v.startswith(root + ".")}
        kinds = {k.removeprefix(root + "."): v for k, v in kinds.items()}
    table = names.kohya_table(known_paths) if known_paths is not None else None
    problems: list[str] = []
    groups: dict[tuple[str, str], dict[str, Tensor]] = {}
    for key, t in tensors.items():
        m = KEY_RE.match(key)
        if m is None:
            problems.append(f"{key!r}: not a kohya LoRA key (expected lora_unet_/lora_te*_<name>."
                            f"{{{','.join(ROLES)}}})")
            continue
        groups.setdefault((m.group(1), m.group(2)), {})[m.group(3)] = t
    mods: dict[str, ModuleLora] = {}
    for (prefix, rest), parts in groups.items():
        name, comp = prefix + rest, _PREFIX_COMPONENT[prefix]
        if root is not None and comp != root:
            continue
        missing = [r for r in ("lora_down.weight", "lora_up.weight") if r not in parts]
        if missing:
            problems.append(f"{name!r}: missing {', '.join(name + '.' + r for r in missing)}")
            continue
        path = _resolve(name, comp, rest, root, hinted_paths, table, problems)
        if path is None:
            continue
        a, up = parts["lora_down.weight"], parts["lora_up.weight"]
        found = (factor_problems(f"{name}.lora_down.weight", a, (2, 3, 4))
                 + factor_problems(f"{name}.lora_up.weight", up, (2, 3, 4)))
        if "dora_scale" in parts:
            found += factor_problems(f"{name}.dora_scale", parts["dora_scale"], (1, 2, 3, 4))
        if found:
            problems.extend(found)
            continue
        if up.ndim < 2 or any(s != 1 for s in up.shape[2:]) or up.ndim != a.ndim:
            problems.append(f"{name}.lora_up.weight: expected (out, r{', 1' * (a.ndim - 2)}) for a down weight of "
                            f"shape {tuple(a.shape)}, got {tuple(up.shape)}")
            continue
        b = up.reshape(up.shape[0], up.shape[1])
        alpha = alpha_value(parts["alpha"], source, f"{name}.alpha") if "alpha" in parts else float(a.shape[0])
        mag = None
        if "dora_scale" in parts:
            d = parts["dora_scale"]
            if d.shape[0] != b.shape[0] or d.numel() != b.shape[0]:
                problems.append(f"{name}.dora_scale: expected the output-axis layout ({b.shape[0]}, 1, ...), got "
                                f"{tuple(d.shape)}")
                continue
            mag = d.reshape(-1)
        mod = ModuleLora(A=a, B=b, alpha=alpha, kind=kind_from_shape(a, kinds.get(path)), magnitude=mag)
        problems.extend(f"{name} ({msg})" for msg in mod.problems(path))
        mods[path] = mod
    problems.extend(kohya_metadata.problems(metadata, source))
    if problems:
        raise FileFormatError(source, "; ".join(problems))
    user = {k: v for k, v in metadata.items() if k != EXTRAS_KEY}
    adapter = Adapter(in_order(mods, extras.get("order")), base_model=extras.get("base_model"),
                      targets=tuple(extras.get("targets") or ()),
                      metadata=user)
    return adapter.validate(source)


def _resolve(name: str, comp: str, rest: str, root: str | None, hinted: Mapping[str, str],
             table: Mapping[str, str] | None, problems: list[str]) -> str | None:
    """The lorakit path of kohya name ``name`` (see the module docstring of :mod:`lorakit.formats.names`)."""
    if name in hinted:
        return hinted[name]
    head = "" if root is not None else comp + "."
    if table is not None:
        path = table.get(names.underscore(head) + rest)
        if path is None and comp != "unet" and rest.startswith(names.underscore(TEXT_MODEL)):
            path = table.get(names.underscore(head) + rest.removeprefix(names.underscore(TEXT_MODEL)))
        if path is None and comp == "unet" and rest.startswith(_SGM_HEADS):
            path = table.get(names.underscore(head + _sgm(rest)))
        if path is None:
            problems.append(f"{name!r}: no module of the model is called that")
        return path
    sub = names.guess_path(rest)
    if comp == "unet" and rest.startswith(_SGM_HEADS):
        try:
            sub = names.sgm_to_diffusers(sub)
        except LorakitError as e:
            problems.append(f"{name!r}: {e}")
            return None
    return head + sub


def _sgm(rest: str) -> str:
    try:
        return names.sgm_to_diffusers(names.guess_path(rest))
    except LorakitError:
        return rest


def save(adapter: Adapter, path: str | os.PathLike, **options) -> None:
    """Write ``adapter`` as one kohya ``.safetensors`` file atomically (options: see :func:`to_tensors`)."""
    adapter.validate(str(path))
    tensors, metadata = to_tensors(adapter, **options)
    write_safetensors(tensors, path, metadata)


def load(path: str | os.PathLike, **options) -> Adapter:
    """Read a kohya ``.safetensors`` file (options: see :func:`from_tensors`)."""
    tensors, metadata = read_safetensors(path)
    return from_tensors(tensors, metadata, str(path), **options)
