"""lorakit's own file format: one ``.safetensors`` file with a versioned JSON header in its metadata.

Tensor keys::

    <module path>.A           (r, in) or (r, in, *kernel)
    <module path>.B           (out, r)
    <module path>.magnitude   (out,)       DoRA only
    override:<state key>      full tensor replacing a base-model state-dict entry

Metadata key ``lorakit`` holds JSON::

    {"format": "lorakit", "version": 1, "base_model": ..., "targets": [...],
     "modules": {"<path>": {"kind": "linear", "rank": 8, "alpha": 16.0, "rslora": false, "dora": false}},
     "overrides": ["classifier.weight", ...], "metadata": {...user strings...}}

The header lists every tensor the file must hold, so a reader can pick some modules and read only their bytes.
:func:`to_tensors` / :func:`from_tensors` are the pure halves; :func:`save` / :func:`load` add the file.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping

from torch import Tensor

from lorakit.adapter import KINDS, Adapter, ModuleLora
from lorakit.errors import FileFormatError, FormatVersionError
from lorakit.formats.safetensors_io import read_header, read_safetensors, write_safetensors

FORMAT = "lorakit"
VERSION = 1
HEADER_KEY = "lorakit"
OVERRIDE_PREFIX = "override:"


def module_keys(path: str, dora: bool) -> list[str]:
    return [f"{path}.A", f"{path}.B"] + ([f"{path}.magnitude"] if dora else [])


def to_tensors(adapter: Adapter) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Adapter → (tensors, string metadata) in the native layout."""
    tensors: dict[str, Tensor] = {}
    modules = {}
    for path, m in adapter.modules.items():
        for role, t in m.tensors().items():
            tensors[f"{path}.{role}"] = t
        modules[path] = {"kind": m.kind, "rank": m.rank, "alpha": m.alpha, "rslora": m.rslora,
                         "dora": m.magnitude is not None}
    for key, t in adapter.overrides.items():
        tensors[OVERRIDE_PREFIX + key] = t
    header = {"format": FORMAT, "version": VERSION, "base_model": adapter.base_model,
              "targets": list(adapter.targets), "modules": modules, "overrides": list(adapter.overrides),
              "metadata": dict(adapter.metadata)}
    return tensors, {HEADER_KEY: json.dumps(header), "format": "pt"}


def parse_header(metadata: Mapping[str, str], source: str = "<memory>") -> dict:
    """The validated lorakit header from a file's string metadata.

    Raises:
        FileFormatError: no lorakit header, bad JSON or a malformed module entry.
        FormatVersionError: a version this reader does not know.
    """
    if HEADER_KEY not in metadata:
        raise FileFormatError(source, f"not a lorakit file: no {HEADER_KEY!r} metadata (try `lorakit convert`)")
    try:
        header = json.loads(metadata[HEADER_KEY])
    except json.JSONDecodeError as e:
        raise FileFormatError(source, f"bad {HEADER_KEY!r} header: not valid JSON ({e})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise FileFormatError(source, f"bad {HEADER_KEY!r} header: missing \"format\": \"{FORMAT}\"")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        raise FormatVersionError(source, f"unknown lorakit format version {version!r} (this reader knows 1.."
                                         f"{VERSION}); upgrade lorakit")
    modules = header.get("modules")
    if not isinstance(modules, dict):
        raise FileFormatError(source, "bad header: 'modules' must be an object")
    problems = []
    for path, info in modules.items():
        if not isinstance(info, dict):
            problems.append(f"module {path!r}: entry is not an object")
            continue
        if info.get("kind") not in KINDS:
            problems.append(f"module {path!r}: unknown kind {info.get('kind')!r}")
        alpha = info.get("alpha")
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            problems.append(f"module {path!r}: alpha must be a finite number, got {alpha!r}")
        if not isinstance(info.get("rank"), int) or info["rank"] < 1:
            problems.append(f"module {path!r}: rank must be a positive integer, got {info.get('rank')!r}")
    if not isinstance(header.get("overrides", []), list):
        problems.append("'overrides' must be a list")
    if not isinstance(header.get("metadata", {}), dict):
        problems.append("'metadata' must be an object")
    if problems:
        raise FileFormatError(source, "bad header: " + "; ".join(problems))
    return header


def from_tensors(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], source: str = "<memory>",
                 modules: Iterable[str] | None = None) -> Adapter:
    """(tensors, metadata) in the native layout → validated :class:`Adapter`.

    Args:
        tensors: must hold every tensor of the chosen modules (others are ignored).
        metadata: the file's string metadata.
        source: file name used in error messages.
        modules: read only these module paths (default: all in the header).
    """
    header = parse_header(metadata, source)
    chosen = _choose(header, modules, source)
    problems = []
    mods: dict[str, ModuleLora] = {}
    for path in chosen:
        info = header["modules"][path]
        keys = module_keys(path, bool(info.get("dora")))
        absent = [k for k in keys if k not in tensors]
        if absent:
            problems.append(f"missing tensor(s) {absent}")
            continue
        m = ModuleLora(A=tensors[keys[0]], B=tensors[keys[1]], alpha=float(info["alpha"]), kind=info["kind"],
                       rslora=bool(info.get("rslora", False)),
                       magnitude=tensors[keys[2]] if info.get("dora") else None)
        if m.A.ndim and m.A.shape[0] != info["rank"]:
            problems.append(f"{path}.A: header says rank {info['rank']} but A has shape {tuple(m.A.shape)}")
        mods[path] = m
    overrides = {}
    if modules is None:
        for key in header.get("overrides", []):
            if OVERRIDE_PREFIX + key not in tensors:
                problems.append(f"missing tensor {OVERRIDE_PREFIX + key!r}")
            else:
                overrides[key] = tensors[OVERRIDE_PREFIX + key]
    if problems:
        raise FileFormatError(source, "; ".join(problems))
    targets = header.get("targets") or []
    adapter = Adapter(mods, overrides, base_model=header.get("base_model"), targets=tuple(targets),
                      metadata=dict(header.get("metadata") or {}))
    return adapter.validate(source)


def _choose(header: dict, modules: Iterable[str] | None, source: str) -> list[str]:
    if modules is None:
        return list(header["modules"])
    chosen = list(modules)
    unknown = [p for p in chosen if p not in header["modules"]]
    if unknown:
        raise FileFormatError(source, f"module(s) {unknown} are not in this adapter")
    return [p for p in header["modules"] if p in set(chosen)]


def save(adapter: Adapter, path: str | os.PathLike) -> None:
    """Validate ``adapter`` and write it to ``path`` atomically."""
    adapter.validate(str(path))
    tensors, metadata = to_tensors(adapter)
    write_safetensors(tensors, path, metadata)


def load(path: str | os.PathLike, modules: Iterable[str] | None = None) -> Adapter:
    """Read a native lorakit file; with ``modules``, read only those modules' tensors (overrides are skipped).

    Raises:
        FileFormatError, FormatVersionError, AdapterValidationError: naming the file and the offending key.
    """
    source = str(path)
    _, metadata = read_header(path)
    header = parse_header(metadata, source)
    chosen = _choose(header, modules, source)
    keys = [k for p in chosen for k in module_keys(p, bool(header["modules"][p].get("dora")))]
    if modules is None:
        keys += [OVERRIDE_PREFIX + k for k in header.get("overrides", [])]
    tensors, _ = read_safetensors(path, keys)
    return from_tensors(tensors, metadata, source, modules=modules)


def read_info(path: str | os.PathLike) -> dict:
    """The validated header of a native file, reading no tensor bytes."""
    _, metadata = read_header(path)
    return parse_header(metadata, str(path))
