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

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from lorakit.adapter import KINDS
from lorakit.errors import FileFormatError, FormatVersionError, LorakitError
from lorakit.formats import checked, native
from lorakit.formats.checked import Bool, Int, List, Map, Num, Obj, Opt, Str
from lorakit.formats.atomic import atomic_write_dir, reads_directory
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
    """Write every part as a native adapter file and the manifest into ``folder``, built aside and swapped in
    whole (see :func:`~lorakit.formats.atomic.atomic_write_dir`): a kill leaves the old package or the new one.

    Files of a folder being replaced are kept, except the old manifest and the part files it lists.

    Returns:
        The manifest as written.
    """
    folder = Path(folder)
    entries, used = [], set()
    for part in split.parts:
        file = part_file_name(part.name)
        if file in used:
            raise FileFormatError(folder / file, f"two parts map to the same file name (part {part.name!r})")
        used.add(file)
    try:
        stale = {MANIFEST, *(e["file"] for e in read_manifest(folder)["parts"])} if folder.is_dir() else set()
    except LorakitError:  # no package there (or a broken one): keep its files, replace only a manifest
        stale = {MANIFEST}
    atomic_write_dir(folder, lambda tmp: _write_package(split, tmp, entries), keep=lambda name: name not in stale)
    return _manifest(split, entries)


def _write_package(split: Split, folder: Path, entries: list[dict]) -> None:
    """Write the parts and the manifest of ``split`` into the empty ``folder``, appending the part entries."""
    for part in split.parts:
        file = part_file_name(part.name)
        native.save(part.adapter, folder / file)
        entries.append({
            "name": part.name, "file": file, "sha256": sha256_file(folder / file),
            "bytes": (folder / file).stat().st_size, "selector": part.selector, "modules": part.adapter.paths,
            "overrides": list(part.adapter.overrides), "rank_range": {p: list(r) for p, r in part.rank_range.items()},
            "alphas": {p: m.alpha for p, m in part.adapter.modules.items()}, "energy": part.energy,
            "retained_energy": part.retained_energy, "tags": list(part.tags), "default_weight": part.default_weight,
        })
    text = json.dumps(_manifest(split, entries), indent=2)
    atomic_write(folder / MANIFEST, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _manifest(split: Split, entries: list[dict]) -> dict:
    parent = split.parent
    return {
        "format": FORMAT, "version": VERSION, "mode": split.mode, "recombine": split.recombine,
        "family": split.family,
        "parent": {"sha256": parent.sha256, "base_model": parent.base_model, "targets": list(parent.targets),
                   "metadata": dict(parent.metadata),
                   "modules": {p: {"kind": k, "rank": r, "alpha": a, "rslora": rs}
                               for p, (k, r, a, rs) in parent.modules.items()},
                   "overrides": list(parent.overrides)},
        "parts": entries,
    }


def _manifest_path(folder: str | os.PathLike) -> Path:
    p = Path(folder)
    return p if p.is_file() else p / MANIFEST


_MODULE = Obj(required={"kind": Str(choices=KINDS), "rank": Int(1), "alpha": Num()}, optional={"rslora": Bool()})
_NAMES = List(Str(nonempty=True), unique=True)
_PART = Obj(required={"name": Str(nonempty=True), "file": Str(nonempty=True, max_len=255, pattern=r"[^\x00]+"),
                      "sha256": Str(pattern=r"[0-9a-f]{64}")},
            optional={"bytes": Int(0), "selector": Str(), "modules": _NAMES, "overrides": _NAMES,
                      "rank_range": Map(List(Int(0), min_len=2, max_len=2)), "alphas": Map(Num()),
                      "energy": Num(), "retained_energy": Num(), "tags": List(Str()), "default_weight": Num()})
#: The manifest after its format and version (checked first, so an unknown version says so).
_MANIFEST = Obj(required={"recombine": Str(choices=("union", "concat_rank")),
                          "parent": Obj(required={"modules": Map(_MODULE, key=Str(nonempty=True))},
                                        optional={"sha256": Opt(Str()), "base_model": Opt(Str()),
                                                  "targets": List(Str()), "metadata": Map(Str()),
                                                  "overrides": _NAMES}),
                          "parts": List(_PART)},
                optional={"mode": Str(), "family": Opt(Str())})


def read_manifest(folder: str | os.PathLike) -> dict:
    """The validated manifest of a split package (``folder`` or its ``split.json``); reads no part bytes.

    Raises:
        FileFormatError: missing or malformed manifest (every field type-checked, see :mod:`lorakit.formats.checked`),
            duplicate part names, two parts naming the same file, a file path that is absolute or escapes the
            package folder, a band range that does not fit its module.
        FormatVersionError: unknown manifest version.
    """
    path = _manifest_path(folder)
    if not path.is_file():
        raise FileFormatError(path, "no such split manifest")
    data = checked.load_file(path, checked.Any_(), "manifest")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise FileFormatError(path, f"bad manifest: missing \"format\": \"{FORMAT}\"")
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        raise FormatVersionError(path, f"unknown split manifest version {version!r} (this reader knows 1..{VERSION})")
    checked.check(data, _MANIFEST, path, "bad manifest")
    problems = []
    root = path.parent.resolve()
    names: set[str] = set()
    files: dict[Path, str] = {}
    parent_modules = data["parent"]["modules"]
    for i, entry in enumerate(data["parts"]):
        name, file = entry["name"], entry["file"]
        if name in names:
            problems.append(f"parts[{i}]: duplicate part name {name!r}")
        names.add(name)
        target = (root / file).resolve()
        if Path(file).is_absolute() or not target.is_relative_to(root) or target == root:
            problems.append(f"part {name!r}: file {file!r} lies outside the package folder {str(root)!r}")
        elif target in files:
            problems.append(f"part {name!r}: file {file!r} is also the file of part {files[target]!r}")
        else:
            files[target] = name
        for p, (lo, hi) in entry.get("rank_range", {}).items():
            info = parent_modules.get(p)
            if info is None or not 0 <= lo < hi <= info["rank"]:
                problems.append(f"part {name!r}: rank_range[{p!r}] = {[lo, hi]} does not fit the parent's module "
                                f"{'(absent)' if info is None else 'of rank ' + str(info['rank'])}")
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

    The file is read once; its hash is checked on the very bytes that are then parsed, so a part replaced between
    a check and a read cannot slip through.

    Raises:
        FileFormatError: the part file is missing, or its size or hash differs from the manifest.
    """
    root = _manifest_path(folder).parent
    file = root / entry["file"]
    try:
        with open(file, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if "bytes" in entry and size != entry["bytes"]:  # before reading: the manifest bounds what is read
                raise FileFormatError(file, f"part {entry['name']!r} has {size} bytes, manifest says "
                                            f"{entry['bytes']}")
            data = f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FileFormatError(file, f"missing part {entry['name']!r} of the split package") from None
    except OSError as e:
        raise FileFormatError(file, f"cannot read part {entry['name']!r}: {e.strerror or e}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        raise FileFormatError(file, f"part {entry['name']!r}: sha256 {digest} does not match the manifest's "
                                    f"{entry['sha256']}")
    adapter = native.load(file, data=data)
    ranges = {p: (int(r[0]), int(r[1])) for p, r in entry.get("rank_range", {}).items()}
    return Part(entry["name"], adapter, entry.get("selector", ""), tuple(entry.get("tags", [])),
                float(entry.get("default_weight", 1.0)), ranges, float(entry.get("energy", 0.0)),
                float(entry.get("retained_energy", 0.0)))


@reads_directory(lambda folder: _manifest_path(folder).parent)  # manifest and parts of one package version
def load_split(folder: str | os.PathLike, names: Iterable[str] | None = None,
               tags: Iterable[str] | None = None) -> Split:
    """A split package read back (all parts, or the chosen ones), every part file hash-checked."""
    manifest = read_manifest(folder)
    parts = tuple(read_part(folder, e) for e in choose_parts(manifest, names, tags))
    return Split(manifest.get("mode", "?"), manifest["recombine"], parts, parent_info(manifest),
                 manifest.get("family"))
