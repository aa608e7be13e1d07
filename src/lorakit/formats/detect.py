"""Tell an adapter file's dialect from its keys, and read or write any dialect through one door.

Rules, applied to the safetensors header only (no tensor bytes are read):

* a directory with ``adapter_config.json`` is **peft**;
* a file whose metadata holds a ``lorakit`` header is **native**;
* otherwise every tensor key is classified: ``lora_unet_…/lora_te*_….lora_down.weight|lora_up.weight|alpha|
  dora_scale`` is **kohya**; ``base_model.model.…`` is **peft** (weights without their config: refused);
  ``<component>.<path>.lora_A.weight``, ``….lora.down.weight``, ``….processor.to_q_lora.down.weight`` is
  **diffusers**. A key of no dialect, or keys of two dialects in one file, is an error naming the keys.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from lorakit.adapter import Adapter
from lorakit.errors import FileFormatError, LorakitError
from lorakit.formats import diffusers, kohya, native, peft
from lorakit.formats.safetensors_io import read_header

DIALECTS = ("native", "peft", "kohya", "diffusers")


def classify_key(key: str) -> str | None:
    """The dialect a single tensor key belongs to (``None``: no known dialect)."""
    if kohya.KEY_RE.match(key):
        return "kohya"
    if key.startswith(peft.PREFIX):
        return "peft"
    if diffusers._split(key) is not None:
        return "diffusers"
    return None


def detect(path: str | os.PathLike) -> str:
    """The dialect of the adapter at ``path`` (a file, or a PEFT directory): one of :data:`DIALECTS`.

    Raises:
        FileFormatError: unreadable file, a key of no known dialect, or keys of several dialects (each named).
    """
    path = Path(path)
    if path.is_dir():
        if (path / peft.CONFIG_NAME).is_file():
            return "peft"
        raise FileFormatError(path, f"a directory, but not a PEFT adapter (no {peft.CONFIG_NAME})")
    header, metadata = read_header(path)
    if native.HEADER_KEY in metadata:
        return "native"
    found: dict[str, str] = {}
    unknown: list[str] = []
    for key in header:
        dialect = classify_key(key)
        if dialect is None:
            unknown.append(key)
        else:
            found.setdefault(dialect, key)
    if unknown:
        shown = ", ".join(repr(k) for k in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise FileFormatError(path, f"key(s) of no known LoRA dialect: {shown}")
    if len(found) > 1:
        raise FileFormatError(path, "mixed dialects in one file: " +
                              ", ".join(f"{d} key {k!r}" for d, k in found.items()))
    if not found:
        raise FileFormatError(path, "holds no tensors")
    dialect = next(iter(found))
    if dialect == "peft":
        raise FileFormatError(path, f"PEFT weights ({found['peft']!r}) without their {peft.CONFIG_NAME}; pass the "
                                    f"adapter directory")
    return dialect


def tensor_file(path: str | os.PathLike) -> Path:
    """The file holding an adapter's tensors: ``path`` itself, or a PEFT directory's weights file (what a hash of
    the adapter, as in ``inspect`` and split manifests, is taken over)."""
    path = Path(path)
    return path / peft.WEIGHTS_NAME if path.is_dir() else path


def read_any(path: str | os.PathLike, *, root: str | None = None,
             known_paths: Iterable[str] | None = None) -> Adapter:
    """Read an adapter of any dialect (see :func:`detect`).

    Args:
        root: for kohya and diffusers files, read only this pipeline component (``"unet"``) with bare paths.
        known_paths: for kohya files, the target model's module paths, to undo kohya's ``.`` → ``_`` exactly.
    """
    dialect = detect(path)
    if dialect == "native":
        return native.load(path)
    if dialect == "peft":
        return peft.load(path)
    if dialect == "kohya":
        return kohya.load(path, root=root, known_paths=known_paths)
    return diffusers.load(path, root=root)


def write(adapter: Adapter, path: str | os.PathLike, dialect: str = "native", *, lossy: bool = False,
          root: str | None = None, sgm: str | None = None) -> None:
    """Write ``adapter`` in ``dialect`` (a directory for peft, one file otherwise).

    Raises:
        NotRepresentableError: parts the dialect cannot hold, listed (unless ``lossy``: then a warning lists them).
    """
    if dialect == "native":
        native.save(adapter, path)
    elif dialect == "peft":
        peft.save(adapter, path, lossy=lossy)
    elif dialect == "kohya":
        kohya.save(adapter, path, root=root, sgm=sgm, lossy=lossy)
    elif dialect == "diffusers":
        diffusers.save(adapter, path, root=root, lossy=lossy)
    else:
        raise LorakitError(f"unknown dialect {dialect!r} (known: {', '.join(DIALECTS)})")
