"""Hugging Face PEFT LoRA adapters: a directory with ``adapter_config.json`` and ``adapter_model.safetensors``.

Tensor keys (``P`` = module path, prefixed ``base_model.model.`` as PEFT saves them; the bare form is read too)::

    P.lora_A.weight            A: (r, in) or (r, in, *kernel)
    P.lora_B.weight            B: (out, r), or (out, r, 1, 1) for conv
    P.lora_embedding_A         A of an embedding: (r, num_embeddings)
    P.lora_embedding_B         B of an embedding: (embedding_dim, r)
    P.lora_magnitude_vector    DoRA magnitude: (out,), or (1, out, 1, 1) for conv
    <module>.<param>           a ``modules_to_save`` tensor → :attr:`Adapter.overrides`

Scales come from the config: ``r`` / ``lora_alpha`` by default, ``rank_pattern`` / ``alpha_pattern`` (regular
expressions matched on the path's tail, first match wins, as PEFT does) per module, ``use_rslora``, ``use_dora``,
``fan_in_fan_out`` (transformers' ``Conv1D``). The writer picks the most common rank and alpha as defaults and puts
every other module's exact values in the patterns, keyed by the escaped full path, so alphas are carried exactly.

PEFT has one rsLoRA and one DoRA switch per adapter: an adapter mixing modules with and without them cannot be
written (error, or with ``lossy=True`` a warning: rsLoRA folded into alpha, DoRA magnitudes dropped).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from torch import Tensor

from lorakit.adapter import Adapter, ModuleLora
from lorakit.errors import FileFormatError
from lorakit.formats import checked
from lorakit.formats.checked import Bool, Check, Int, List, Map, Num, Obj, Opt, Str, regex_keys
from lorakit.formats.common import (EXTRAS_KEY, factor_problems, in_order, json_number, kind_from_shape,
                                    override_problems, pack_extras, report_loss, shape_kind_hints, unpack_extras)
from lorakit.formats.atomic import atomic_write_dir, reads_directory
from lorakit.formats.safetensors_io import atomic_write, read_safetensors, write_safetensors

DIALECT = "peft"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_ROLE_RE = re.compile(r"^(.+)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
                      r"|lora_magnitude_vector)$")
_ROLE = {"lora_A.weight": "A", "lora_B.weight": "B", "lora_embedding_A": "A", "lora_embedding_B": "B",
         "lora_magnitude_vector": "magnitude"}
#: The ``LoraConfig`` fields lorakit reads (others are left alone). Booleans must be JSON booleans: PEFT reads
#: ``"use_rslora": "false"`` as true, so a string there is refused rather than guessed.
CONFIG_SCHEMA = Obj(optional={
    "peft_type": Opt(Str()), "r": Int(1), "lora_alpha": Num(),
    "rank_pattern": Opt(Check(Map(Int(1)), regex_keys)), "alpha_pattern": Opt(Check(Map(Num()), regex_keys)),
    "use_rslora": Bool(), "use_dora": Bool(), "fan_in_fan_out": Bool(), "bias": Str(),
    "modules_to_save": Opt(List(Str(nonempty=True))), "base_model_name_or_path": Opt(Str())})


def config_fields(modules: Mapping[str, ModuleLora], lossy: bool, dialect: str = DIALECT
                  ) -> tuple[dict, dict[str, float]]:
    """The scale-related fields of a PEFT ``LoraConfig`` for ``modules``, and the alphas to write per module.

    Returns:
        ``({"r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora", "use_dora", "target_modules",
        "fan_in_fan_out"}, {path: alpha})``; alphas differ from the modules' only where a lossy fold happened.

    Raises:
        NotRepresentableError: mixed rsLoRA or mixed DoRA modules (unless ``lossy``).
    """
    lost: list[str] = []
    rslora = Counter(m.rslora for m in modules.values()).most_common(1)[0][0] if modules else False
    dora = Counter(m.magnitude is not None for m in modules.values()).most_common(1)[0][0] if modules else False
    alphas: dict[str, float] = {}
    for path, m in modules.items():
        alpha = m.alpha
        if m.rslora != rslora:
            lost.append(f"{path}: rsLoRA={m.rslora} but the adapter-wide use_rslora is {rslora} (alpha refolded, "
                        f"not bitwise)")
            alpha = alpha * math.sqrt(m.rank) if m.rslora else alpha / math.sqrt(m.rank)
        if (m.magnitude is not None) != dora:
            lost.append(f"{path}: DoRA={m.magnitude is not None} but the adapter-wide use_dora is {dora}")
        alphas[path] = alpha
    report_loss(dialect, lost, lossy)
    r = Counter(m.rank for m in modules.values()).most_common(1)[0][0] if modules else 8
    a = Counter(alphas.values()).most_common(1)[0][0] if modules else 8
    fields = {
        "r": r, "lora_alpha": json_number(a),
        "rank_pattern": {re.escape(p): m.rank for p, m in modules.items() if m.rank != r},
        "alpha_pattern": {re.escape(p): json_number(alphas[p]) for p in modules if alphas[p] != a},
        "use_rslora": rslora, "use_dora": dora, "target_modules": sorted(modules),
        "fan_in_fan_out": any(m.kind == "linear_t" for m in modules.values()),
    }
    return fields, alphas


def pattern_value(patterns: Mapping[str, object], path: str, default: object) -> object:
    """PEFT's per-module lookup: the first pattern ``k`` with ``re.match(rf"(.*\\.)?({k})$", path)``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def to_tensors(adapter: Adapter, *, lossy: bool = False, prefix: str = PREFIX, dialect: str = DIALECT
               ) -> tuple[dict[str, Tensor], dict[str, str], dict]:
    """Adapter → (tensors, safetensors metadata, ``adapter_config.json`` dict).

    Args:
        lossy: warn instead of raising on parts PEFT cannot hold.
        prefix: key prefix of every tensor (``base_model.model.``; diffusers uses ``unet.``).
        dialect: name used in loss reports.

    Raises:
        NotRepresentableError: see :func:`config_fields`.
    """
    fields, alphas = config_fields(adapter.modules, lossy, dialect)
    tensors: dict[str, Tensor] = {}
    for path, m in adapter.modules.items():
        p = prefix + path
        if m.kind == "embedding":
            tensors[f"{p}.lora_embedding_A"], tensors[f"{p}.lora_embedding_B"] = m.A, m.B
        else:
            tensors[f"{p}.lora_A.weight"] = m.A
            tensors[f"{p}.lora_B.weight"] = m.B.reshape(*m.B.shape, *([1] * (m.A.ndim - 2)))
        if m.magnitude is not None and fields["use_dora"]:
            conv = m.A.ndim > 2
            tensors[f"{p}.lora_magnitude_vector"] = (m.magnitude.reshape(1, -1, *([1] * (m.A.ndim - 2))) if conv
                                                     else m.magnitude)
    for key, t in adapter.overrides.items():
        tensors[prefix + key] = t
    saved = sorted({k.rpartition(".")[0] for k in adapter.overrides})
    config = {"peft_type": "LORA", "task_type": None, "base_model_name_or_path": adapter.base_model,
              **fields, "modules_to_save": saved or None, "lora_dropout": 0.0, "bias": "none",
              "init_lora_weights": True, "inference_mode": True}
    metadata = {"format": "pt", **pack_extras({"kinds": shape_kind_hints(adapter.modules),
                                               "targets": list(adapter.targets), "metadata": dict(adapter.metadata),
                                               "order": list(adapter.modules),
                                               "override_order": list(adapter.overrides)})}
    return tensors, metadata, config


def from_tensors(tensors: Mapping[str, Tensor], config: Mapping, metadata: Mapping[str, str] | None = None,
                 source: str = "<memory>") -> Adapter:
    """PEFT (tensors, config, safetensors metadata) → validated :class:`Adapter`.

    Raises:
        FileFormatError: naming every unknown key, missing factor, unsupported config value or bad shape.
    """
    metadata = metadata or {}
    extras = unpack_extras(metadata, source)
    checked.check(config, CONFIG_SCHEMA, source, CONFIG_NAME)
    problems: list[str] = []
    peft_type = config.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise FileFormatError(source, f"{CONFIG_NAME}: peft_type {peft_type!r} is not LoRA")
    for opt, ok in (("use_qalora", False), ("lora_bias", False), ("layer_replication", None),
                    ("trainable_token_indices", None), ("target_parameters", None)):
        if config.get(opt, ok) not in (ok, None, False, [], {}):
            problems.append(f"{CONFIG_NAME}: {opt}={config[opt]!r} is not supported")
    if config.get("bias", "none") != "none":
        problems.append(f"{CONFIG_NAME}: bias={config['bias']!r} (trained biases) is not supported")
    saved = list(config.get("modules_to_save") or [])
    groups: dict[str, dict[str, Tensor]] = {}
    overrides: dict[str, Tensor] = {}
    embeddings: set[str] = set()
    for key, t in tensors.items():
        bare = key.removeprefix(PREFIX)
        m = _ROLE_RE.match(bare)
        if m is not None:
            groups.setdefault(m.group(1), {})[_ROLE[m.group(2)]] = t
            if "embedding" in m.group(2):
                embeddings.add(m.group(1))
        elif any(bare.rpartition(".")[0] == s or bare.rpartition(".")[0].endswith("." + s) for s in saved):
            problems.extend(override_problems(key, t))
            overrides[bare] = t
        else:
            problems.append(f"{key!r}: not a PEFT LoRA key (.lora_A.weight, .lora_B.weight, .lora_embedding_A/B, "
                            f".lora_magnitude_vector) nor in modules_to_save {saved}")
    r, alpha = config.get("r", 8), config.get("lora_alpha", 8)
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    rslora = config.get("use_rslora", False)
    kinds = extras.get("kinds") or {}
    fan_in_fan_out = config.get("fan_in_fan_out", False)
    mods: dict[str, ModuleLora] = {}
    for path, parts in groups.items():
        if "A" not in parts or "B" not in parts:
            problems.append(f"{path}: missing {'lora_A' if 'A' not in parts else 'lora_B'} tensor")
            continue
        a, b = parts["A"], parts["B"]
        found = factor_problems(f"{path}.lora_A", a, (2, 3, 4)) + factor_problems(f"{path}.lora_B", b, (2, 3, 4))
        if "magnitude" in parts:
            found += factor_problems(f"{path}.lora_magnitude_vector", parts["magnitude"], (1, 4))
        if found:
            problems.extend(found)
            continue
        if b.ndim != a.ndim and not (path in embeddings and b.ndim == 2) or any(s != 1 for s in b.shape[2:]):
            problems.append(f"{path}.lora_B: shape {tuple(b.shape)} does not fit lora_A {tuple(a.shape)}")
            continue
        rank = pattern_value(rank_pattern, path, r)
        if a.shape[0] != rank:
            problems.append(f"{path}.lora_A: config says rank {rank} but the tensor has shape {tuple(a.shape)}")
            continue
        if path in embeddings:
            kind = "embedding"
        elif extras:
            kind = kind_from_shape(a, kinds.get(path))
        else:
            kind = "linear_t" if fan_in_fan_out and a.ndim == 2 else kind_from_shape(a, None)
        mag = parts.get("magnitude")
        if mag is not None:
            if mag.numel() != b.shape[0]:
                problems.append(f"{path}.lora_magnitude_vector: expected {b.shape[0]} values, got shape "
                                f"{tuple(mag.shape)}")
                continue
            mag = mag.reshape(-1)
        mods[path] = ModuleLora(A=a, B=b.reshape(b.shape[0], b.shape[1]),
                                alpha=float(pattern_value(alpha_pattern, path, alpha)),
                                kind=kind, rslora=rslora, magnitude=mag)
        problems.extend(mods[path].problems(path))
    if problems:
        raise FileFormatError(source, "; ".join(problems))
    targets = extras.get("targets") or []
    user = extras.get("metadata")
    if user is None:
        user = {k: v for k, v in metadata.items() if k not in ("format", EXTRAS_KEY)}
    mods, overrides = in_order(mods, extras.get("order")), in_order(overrides, extras.get("override_order"))
    adapter = Adapter(mods, overrides, base_model=config.get("base_model_name_or_path"), targets=tuple(targets),
                      metadata=user)
    return adapter.validate(source)


def save(adapter: Adapter, directory: str | os.PathLike, *, lossy: bool = False) -> None:
    """Write ``adapter`` as a PEFT adapter directory, built aside and swapped in whole (see
    :func:`~lorakit.formats.atomic.atomic_write_dir`): a kill leaves the old directory or the new one, never the
    old config with the new weights. Other files of a directory being replaced (a README) are kept.
    """
    directory = Path(directory)
    adapter.validate(str(directory))
    tensors, metadata, config = to_tensors(adapter, lossy=lossy)
    text = json.dumps(config, indent=2, sort_keys=True)

    def write(tmp: Path) -> None:
        write_safetensors(tensors, tmp / WEIGHTS_NAME, metadata)
        atomic_write(tmp / CONFIG_NAME, lambda t: Path(t).write_text(text))

    atomic_write_dir(directory, write)


def read_config(directory: str | os.PathLike) -> dict:
    """The parsed ``adapter_config.json`` of a PEFT directory, its fields checked (:data:`CONFIG_SCHEMA`).

    Raises:
        FileFormatError: missing, not a JSON object, or a field lorakit reads of the wrong type (named).
    """
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileFormatError(directory, f"not a PEFT adapter directory: no {CONFIG_NAME}")
    return checked.load_file(path, CONFIG_SCHEMA, CONFIG_NAME)


@reads_directory()  # config and weights from one directory, even while a writer swaps a new one in
def load(directory: str | os.PathLike) -> Adapter:
    """Read a PEFT adapter directory (``adapter_model.safetensors`` only; pickled ``.bin`` files are refused)."""
    directory = Path(directory)
    config = read_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileFormatError(directory, f"no {WEIGHTS_NAME} (pickled adapter_model.bin is not read)")
    tensors, metadata = read_safetensors(weights)
    return from_tensors(tensors, config, metadata, str(weights))
