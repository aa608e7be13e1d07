"""safetensors files: atomic writes, partial reads, and errors that name the file and key.

Only safetensors is ever read or written (never pickle). Reads go through ``safe_open``, which memory-maps the
file, so reading a subset of tensors touches only those tensors' bytes.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from lorakit.errors import FileFormatError

#: Refuse headers larger than this; the format allows 100 MB but an adapter header is a few hundred kB at most.
MAX_HEADER_BYTES = 100_000_000


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` on a sibling temporary file, then move it over ``path`` in one step.

    A crash or error mid-write leaves the old file (if any) untouched and no temporary file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_safetensors(tensors: Mapping[str, Tensor], path: str | os.PathLike,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write ``tensors`` with string ``metadata`` to ``path`` atomically.

    Tensors are saved contiguous; tensors sharing storage with another entry are copied (the format forbids
    aliasing). The caller's tensors are not modified.
    """
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for key, t in tensors.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr() if t.numel() else None
        if not t.is_contiguous() or (ptr is not None and ptr in seen):
            t = t.contiguous().clone()
        if ptr is not None:
            seen.add(ptr)
        out[key] = t.cpu()
    atomic_write(path, lambda tmp: save_file(out, tmp, metadata=dict(metadata or {})))


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor table (key → dtype, shape, offsets) and string metadata of a safetensors file; no tensor bytes.

    Raises:
        FileFormatError: the file is missing, too short, or its header is not valid safetensors JSON, or a tensor's
            byte range lies outside the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(path, "no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FileFormatError(path, f"truncated: {size} bytes is too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise FileFormatError(path, f"bad header: declares {n} header bytes but the file has {size} bytes")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FileFormatError(path, f"bad header: not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise FileFormatError(path, "bad header: not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FileFormatError(path, "bad header: __metadata__ must map strings to strings")
    data_size = size - 8 - n
    for key, info in header.items():
        try:
            start, end = info["data_offsets"]
        except (TypeError, KeyError, ValueError):
            raise FileFormatError(path, f"bad header: tensor {key!r} has no valid data_offsets") from None
        if not 0 <= start <= end <= data_size:
            raise FileFormatError(path, f"truncated: tensor {key!r} needs bytes {start}..{end} of the data section "
                                        f"but the file holds {data_size}")
    return header, metadata


def read_safetensors(path: str | os.PathLike, keys: Iterable[str] | None = None
                     ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors (all, or only ``keys``) and metadata of a safetensors file.

    Raises:
        FileFormatError: see :func:`read_header`; also a requested key that is absent or unreadable.
    """
    header, metadata = read_header(path)
    wanted = list(header) if keys is None else list(keys)
    missing = [k for k in wanted if k not in header]
    if missing:
        raise FileFormatError(path, f"missing tensor(s) {missing}")
    out: dict[str, Tensor] = {}
    try:
        with safe_open(str(path), framework="pt") as f:
            for k in wanted:
                out[k] = f.get_tensor(k)
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise FileFormatError(path, f"cannot read tensor data: {e}") from None
    return out, metadata


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
