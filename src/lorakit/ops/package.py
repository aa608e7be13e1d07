"""A split on disk: one native adapter file per part plus ``split.json``, the manifest.

Manifest (format ``lorakit-split``, version 1)::

    {"format": "lorakit-split", "version": 1, "mode": "block", "recombine": "union", "family": "sd15",
     "parent": {"sha256": ..., "base_model": ..., "targets": [...], "metadata": {...},
                "modules": {"<path>": {"kind": "linear", "rank": 8, "alpha": 16.0, "rslora": false}},
                "overrides": ["classifier.weight"]},
     "parts": [{"name": "IN04", "file": "IN04.safetensors", "sha256": ..., "bytes": 1234,
                "selector": "block:sd15:IN04", "modules": [...], "overrides": [...],
                "rank_range": {"<path>": [0, 8]}, "alphas": {"<path>": 16.0},
                "energy": 0.12, "retained_energy": 0.40, "tags": ["sd15", "IN04"], "default_weight": 1.0}]}

Reading validates before it trusts: known format and version, part names unique, every file path relative and
inside the package folder, and (when a part is read) its size and sha256.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from pathlib import Path

from lorakit.errors import FileFormatError, FormatVersionError
from lorakit.formats import native
from lorakit.formats.safetensors_io import atomic_write, sha256_file
from lorakit.ops.split import ParentInfo, Part, Split

MANIFEST = "split.json"
FORMAT = "lorakit-split"
VERSION = 1
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.=+-]")


def part_file_name(name: str) -> str:
    """A safe file name for a part: unsafe characters become ``_``."""
    return _SAFE_NAME.sub("_", name).lstrip(".") + ".safetensors"


def save_split(split: Split, folder: str | os.PathLike) -> dict:
    """Write every part as a native adapter file and the manifest into ``folder``; each write is atomic.

    Returns:
        The manifest as written.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    entries, used = [], set()
    for part in split.parts:
        file = part_file_name(part.name)
        if file in used:
            raise FileFormatError(folder / file, f"two parts map to the same file name (part {part.name!r})")
        used.add(file)
        native.save(part.adapter, folder / file)
        entries.append({
            "name": part.name, "file": file, "sha256": sha256_file(folder / file),
            "bytes": (folder / file).stat().st_size, "selector": part.selector, "modules": part.adapter.paths,
            "overrides": list(part.adapter.overrides), "rank_range": {p: list(r) for p, r in part.rank_range.items()},
            "alphas": {p: m.alpha for p, m in part.adapter.modules.items()}, "energy": part.energy,
            "retained_energy": part.retained_energy, "tags": list(part.tags), "default_weight": part.default_weight,
        })
    parent = split.parent
    manifest = {
        "format": FORMAT, "version": VERSION, "mode": split.mode, "recombine": split.recombine,
        "family": split.family,
        "parent": {"sha256": parent.sha256, "base_model": parent.base_model, "targets": list(parent.targets),
                   "metadata": dict(parent.metadata),
                   "modules": {p: {"kind": k, "rank": r, "alpha": a, "rslora": rs}
                               for p, (k, r, a, rs) in parent.modules.items()},
                   "overrides": list(parent.overrides)},
        "parts": entries,
    }
    text = json.dumps(manifest, indent=2)
    atomic_write(folder / MANIFEST, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return manifest


def _manifest_path(folder: str | os.PathLike) -> Path:
    p = Path(folder)
    return p if p.is_file() else p / MANIFEST


def read_manifest(folder: str | os.PathLike) -> dict:
    """The validated manifest of a split package (``folder`` or its ``split.json``); reads no part bytes.

    Raises:
        FileFormatError: missing or malformed manifest, duplicate part names, a file path that is absolute or
            escapes the package folder, a missing field.
        FormatVersionError: unknown manifest version.
    """
    path = _manifest_path(folder)
    if not path.is_file():
        raise FileFormatError(path, "no such split manifest")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(path, f"bad manifest: not valid JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FileFormatError(path, f"bad manifest: missing \"format\": \"{FORMAT}\"")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        raise FormatVersionError(path, f"unknown split manifest version {version!r} (this reader knows 1..{VERSION})")
    problems = []
    if data.get("recombine") not in ("union", "concat_rank"):
        problems.append(f"recombine must be 'union' or 'concat_rank', got {data.get('recombine')!r}")
    parent = data.get("parent")
    if not isinstance(parent, dict) or not isinstance(parent.get("modules"), dict):
        problems.append("'parent.modules' must be an object")
    parts = data.get("parts")
    if not isinstance(parts, list):
        problems.append("'parts' must be a list")
        parts = []
    root = path.parent.resolve()
    seen = set()
    for i, entry in enumerate(parts):
        if not isinstance(entry, dict):
            problems.append(f"parts[{i}] is not an object")
            continue
        name, file = entry.get("name"), entry.get("file")
        if not isinstance(name, str) or not name:
            problems.append(f"parts[{i}]: missing name")
        elif name in seen:
            problems.append(f"parts[{i}]: duplicate part name {name!r}")
        seen.add(name)
        if not isinstance(file, str) or not file:
            problems.append(f"part {name!r}: missing file")
        elif Path(file).is_absolute() or not (root / file).resolve().is_relative_to(root):
            problems.append(f"part {name!r}: file {file!r} lies outside the package folder {str(root)!r}")
        if not isinstance(entry.get("sha256"), str) or not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
            problems.append(f"part {name!r}: sha256 must be 64 hex digits")
        w = entry.get("default_weight", 1.0)
        if not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w):
            problems.append(f"part {name!r}: default_weight must be a finite number, got {w!r}")
    if problems:
        raise FileFormatError(path, "bad manifest: " + "; ".join(problems))
    return data


def parent_info(manifest: dict) -> ParentInfo:
    """The :class:`ParentInfo` recorded in a manifest."""
    p = manifest["parent"]
    mods = {path: (i["kind"], int(i["rank"]), float(i["alpha"]), bool(i.get("rslora", False)))
            for path, i in p["modules"].items()}
    return ParentInfo(mods, tuple(p.get("overrides", [])), p.get("base_model"), tuple(p.get("targets", [])),
                      dict(p.get("metadata", {})), p.get("sha256"))


def choose_parts(manifest: dict, names: Iterable[str] | None = None, tags: Iterable[str] | None = None) -> list[dict]:
    """Manifest entries of the parts named in ``names`` or carrying one of ``tags`` (default: all), in order.

    Raises:
        FileFormatError: an unknown part name, or a tag no part carries.
    """
    entries = manifest["parts"]
    if names is None and tags is None:
        return list(entries)
    names, tags = set(names or ()), set(tags or ())
    known = {e["name"] for e in entries}
    unknown = sorted(names - known)
    if unknown:
        raise FileFormatError(MANIFEST, f"no part(s) named {unknown} (parts: {sorted(known)})")
    all_tags = {t for e in entries for t in e.get("tags", [])}
    if tags - all_tags:
        raise FileFormatError(MANIFEST, f"no part carries tag(s) {sorted(tags - all_tags)} (tags: {sorted(all_tags)})")
    return [e for e in entries if e["name"] in names or tags & set(e.get("tags", []))]


def read_part(folder: str | os.PathLike, entry: dict) -> Part:
    """One part from the package, after checking its size and sha256 against the manifest.

    Raises:
        FileFormatError: the part file is missing, or its size or hash differs from the manifest.
    """
    root = _manifest_path(folder).parent
    file = root / entry["file"]
    if not file.is_file():
        raise FileFormatError(file, f"missing part {entry['name']!r} of the split package")
    size = file.stat().st_size
    if "bytes" in entry and size != entry["bytes"]:
        raise FileFormatError(file, f"part {entry['name']!r} has {size} bytes, manifest says {entry['bytes']}")
    digest = sha256_file(file)
    if digest != entry["sha256"]:
        raise FileFormatError(file, f"part {entry['name']!r}: sha256 {digest} does not match the manifest's "
                                    f"{entry['sha256']}")
    adapter = native.load(file)
    ranges = {p: (int(r[0]), int(r[1])) for p, r in entry.get("rank_range", {}).items()}
    return Part(entry["name"], adapter, entry.get("selector", ""), tuple(entry.get("tags", [])),
                float(entry.get("default_weight", 1.0)), ranges, float(entry.get("energy", 0.0)),
                float(entry.get("retained_energy", 0.0)))


def load_split(folder: str | os.PathLike, names: Iterable[str] | None = None,
               tags: Iterable[str] | None = None) -> Split:
    """A split package read back (all parts, or the chosen ones), every part file hash-checked."""
    manifest = read_manifest(folder)
    parts = tuple(read_part(folder, e) for e in choose_parts(manifest, names, tags))
    return Split(manifest.get("mode", "?"), manifest["recombine"], parts, parent_info(manifest),
                 manifest.get("family"))
