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

The header lists every tensor the file holds, and a reader refuses a file holding any other (or missing one), so it
can pick some modules and read only their bytes. Header fields are type-checked by :mod:`lorakit.formats.checked`.
:func:`to_tensors` / :func:`from_tensors` are the pure halves; :func:`save` / :func:`load` add the file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping

from torch import Tensor

from lorakit.adapter import KINDS, Adapter, ModuleLora
from lorakit.errors import FileFormatError, FormatVersionError
from lorakit.formats import checked
from lorakit.formats.checked import Bool, Int, List, Map, Num, Obj, Opt, Str
from lorakit.formats.common import factor_problems, override_problems, tensor_set_problems
from lorakit.formats.safetensors_io import parse_safetensors, read_header, read_safetensors, write_safetensors

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


#: One module entry of the header.
_MODULE = Obj(required={"kind": Str(choices=KINDS), "rank": Int(1), "alpha": Num()},
              optional={"rslora": Bool(), "dora": Bool()})
#: The header after its format and version (checked first, so an unknown version says so).
_HEADER = Obj(required={"modules": Map(_MODULE, key=Str(pattern=rf"(?!{OVERRIDE_PREFIX})(?s:.+)"))},
              optional={"base_model": Opt(Str()), "targets": List(Str()),
                        "overrides": List(Str(nonempty=True), unique=True), "metadata": Map(Str())})


def parse_header(metadata: Mapping[str, str], source: str = "<memory>") -> dict:
    """The validated lorakit header from a file's string metadata.

    Raises:
        FileFormatError: no lorakit header, bad JSON or a field of the wrong type or range (each named).
        FormatVersionError: a version this reader does not know.
    """
    if HEADER_KEY not in metadata:
        raise FileFormatError(source, f"not a lorakit file: no {HEADER_KEY!r} metadata (try `lorakit convert`)")
    header = checked.parse(metadata[HEADER_KEY], source, f"{HEADER_KEY!r} header")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise FileFormatError(source, f"bad {HEADER_KEY!r} header: missing \"format\": \"{FORMAT}\"")
    version = header.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        raise FormatVersionError(source, f"unknown lorakit format version {version!r} (this reader knows 1.."
                                         f"{VERSION}); upgrade lorakit")
    return checked.check(header, _HEADER, source, f"bad {HEADER_KEY!r} header")


def tensor_keys(header: Mapping) -> list[str]:
    """Every tensor key a file with this (validated) header must hold, and no other."""
    keys = [k for p, info in header["modules"].items() for k in module_keys(p, info.get("dora", False))]
    return keys + [OVERRIDE_PREFIX + k for k in header.get("overrides", [])]


def from_tensors(tensors: Mapping[str, Tensor], metadata: Mapping[str, str], source: str = "<memory>",
                 modules: Iterable[str] | None = None) -> Adapter:
    """(tensors, metadata) in the native layout → validated :class:`Adapter`.

    Args:
        tensors: every tensor the header declares and no other; with ``modules``, at least the chosen modules'.
        metadata: the file's string metadata.
        source: file name used in error messages.
        modules: read only these module paths (default: all in the header).

    Raises:
        FileFormatError: a bad header, tensors missing from or absent in the header (listed both ways), a factor
            of the wrong dims, dtype or rank.
    """
    header = parse_header(metadata, source)
    chosen = _choose(header, modules, source)
    problems = tensor_set_problems(tensor_keys(header), list(tensors)) if modules is None else []
    mods: dict[str, ModuleLora] = {}
    for path in chosen:
        info = header["modules"][path]
        keys = module_keys(path, info.get("dora", False))
        absent = [k for k in keys if k not in tensors]
        if absent:
            if modules is not None:
                problems.append(f"missing tensor(s) {absent}")
            continue
        found = [p for key, ndims in zip(keys, ((2, 3, 4), (2,), (1,))) for p in
                 factor_problems(key, tensors[key], ndims)]
        if found:
            problems += found
            continue
        m = ModuleLora(A=tensors[keys[0]], B=tensors[keys[1]], alpha=float(info["alpha"]), kind=info["kind"],
                       rslora=info.get("rslora", False), magnitude=tensors[keys[2]] if len(keys) > 2 else None)
        if m.A.shape[0] != info["rank"]:
            problems.append(f"{path}.A: header says rank {info['rank']} but A has shape {tuple(m.A.shape)}")
        mods[path] = m
    overrides = {}
    if modules is None:
        for key in header.get("overrides", []):
            t = tensors.get(OVERRIDE_PREFIX + key)
            if t is not None:
                problems += override_problems(OVERRIDE_PREFIX + key, t)
                overrides[key] = t
    if problems:
        raise FileFormatError(source, "; ".join(problems))
    adapter = Adapter(mods, overrides, base_model=header.get("base_model"), targets=tuple(header.get("targets", [])),
                      metadata=dict(header.get("metadata", {})))
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


def load(path: str | os.PathLike, modules: Iterable[str] | None = None, *, data: bytes | None = None) -> Adapter:
    """Read a native lorakit file; with ``modules``, read only those modules' tensors (overrides are skipped).

    Header and tensors come from one open file (or from ``data``, the file's bytes already in memory), and the
    header must declare exactly the tensors the file holds, checked on the header alone before any tensor is read.

    Raises:
        FileFormatError, FormatVersionError, AdapterValidationError: naming the file and the offending key.
    """
    source = str(path)

    def chosen_keys(table: dict, metadata: dict) -> list[str]:
        header = parse_header(metadata, source)
        problems = tensor_set_problems(tensor_keys(header), list(table))
        if problems:
            raise FileFormatError(source, "; ".join(problems))
        chosen = _choose(header, modules, source)
        keys = [k for p in chosen for k in module_keys(p, header["modules"][p].get("dora", False))]
        if modules is None:
            keys += [OVERRIDE_PREFIX + k for k in header.get("overrides", [])]
        return keys

    if data is None:
        tensors, metadata = read_safetensors(path, chosen_keys)
    else:
        tensors, metadata = parse_safetensors(data, source, chosen_keys)
    return from_tensors(tensors, metadata, source, modules=modules)


def read_info(path: str | os.PathLike) -> dict:
    """The validated header of a native file, reading no tensor bytes."""
    _, metadata = read_header(path)
    return parse_header(metadata, str(path))
