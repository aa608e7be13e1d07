"""safetensors files: atomic writes, partial reads, and errors that name the file and key.

Only safetensors is ever read or written (never pickle). A read opens the file once and takes the header and the
tensor bytes from that one descriptor, so a read racing a writer's ``os.replace`` sees the old file or the new one,
never the old header (alphas) with the new tensors (factors). Reading a subset of tensors reads only their bytes.
Writes go through :func:`lorakit.formats.atomic.atomic_write`.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import BinaryIO

import torch
from safetensors.torch import save_file
from torch import Tensor

from lorakit.errors import FileFormatError
from lorakit.formats.atomic import atomic_write
from lorakit.formats.checked import check_safetensors_header

__all__ = ["atomic_write", "parse_safetensors", "read_header", "read_safetensors", "sha256_file",
           "write_safetensors"]

#: Refuse headers larger than this; the format allows 100 MB but an adapter header is a few hundred kB at most.
MAX_HEADER_BYTES = 100_000_000


#: safetensors dtype names → torch dtypes (the file stores them little-endian).
DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "F8_E5M2": torch.float8_e5m2,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E8M0": torch.float8_e8m0fnu, "I16": torch.int16, "U16": torch.uint16,
          "F16": torch.float16, "BF16": torch.bfloat16, "I32": torch.int32, "U32": torch.uint32, "F32": torch.float32,
          "I64": torch.int64, "U64": torch.uint64, "F64": torch.float64}

#: ``keys`` of :func:`read_safetensors`: the keys themselves, or a function of (tensor table, metadata) naming them.
KeySelection = Iterable[str] | Callable[[dict[str, dict], dict[str, str]], Iterable[str]] | None


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


def _open(path: Path) -> BinaryIO:
    try:
        return open(path, "rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise FileFormatError(path, "no such file") from None
    except OSError as e:
        raise FileFormatError(path, f"cannot open: {e.strerror or e}") from None


def _header(f: BinaryIO, size: int, path: Path) -> tuple[dict[str, dict], dict[str, str]]:
    """Tensor table and metadata from the open file ``f`` of ``size`` bytes, leaving ``f`` at the data section."""
    head = f.read(8)
    if len(head) < 8:
        raise FileFormatError(path, f"truncated: {size} bytes is too short for a safetensors header")
    (n,) = struct.unpack("<Q", head)
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise FileFormatError(path, f"bad header: declares {n} header bytes but the file has {size} bytes")
    raw = f.read(n)
    check_safetensors_header(raw, size - 8 - n, path, MAX_HEADER_BYTES)  # types, depth, offsets vs bytes
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


def read_header(path: str | os.PathLike) -> tuple[dict[str, dict], dict[str, str]]:
    """The tensor table (key → dtype, shape, offsets) and string metadata of a safetensors file; no tensor bytes.

    Raises:
        FileFormatError: the file is missing, too short, or its header is not valid safetensors JSON, or a tensor's
            byte range lies outside the file.
    """
    path = Path(path)
    with _open(path) as f:
        return _header(f, os.fstat(f.fileno()).st_size, path)


def _tensor(f: BinaryIO, data_start: int, key: str, info: dict, path: Path) -> Tensor:
    """Tensor ``key`` (its table entry ``info``) read from the data section of ``f``, which starts at byte
    ``data_start``."""
    dtype, shape = DTYPES.get(info.get("dtype")), info.get("shape")
    if dtype is None:
        raise FileFormatError(path, f"tensor {key!r}: unknown dtype {info.get('dtype')!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in shape):
        raise FileFormatError(path, f"tensor {key!r}: shape must be a list of non-negative integers, got {shape!r}")
    start, end = info["data_offsets"]
    if math.prod(shape) * dtype.itemsize != end - start:
        raise FileFormatError(path, f"tensor {key!r}: shape {shape} of {info['dtype']} needs "
                                    f"{math.prod(shape) * dtype.itemsize} bytes but data_offsets hold {end - start}")
    raw = torch.empty(end - start, dtype=torch.uint8)
    f.seek(data_start + start)
    if f.readinto(raw.numpy()) != end - start:
        raise FileFormatError(path, f"truncated: tensor {key!r} ends past the end of the file")
    if sys.byteorder == "big" and dtype.itemsize > 1:  # the format is little-endian
        raw = raw.view(-1, dtype.itemsize).flip(-1).reshape(-1)
    return raw.view(dtype).reshape(shape)


def _read(f: BinaryIO, size: int, path: Path, keys: KeySelection) -> tuple[dict[str, Tensor], dict[str, str]]:
    header, metadata = _header(f, size, path)
    data_start = f.tell()
    if callable(keys):
        keys = keys(header, metadata)
    wanted = list(header) if keys is None else list(keys)
    missing = [k for k in wanted if k not in header]
    if missing:
        raise FileFormatError(path, f"missing tensor(s) {missing}")
    return {k: _tensor(f, data_start, k, header[k], path) for k in wanted}, metadata


def read_safetensors(path: str | os.PathLike, keys: KeySelection = None
                     ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """Tensors (all, or only ``keys``) and metadata of a safetensors file, header and tensors from one open file.

    Args:
        keys: the keys to read, or a function ``keys(table, metadata)`` that picks them from the header, for a
            reader whose choice depends on the header (reading the header in a separate call would open the file
            twice, and the second open may find another file).

    Raises:
        FileFormatError: see :func:`read_header`; also a requested key that is absent or unreadable.
    """
    path = Path(path)
    with _open(path) as f:
        return _read(f, os.fstat(f.fileno()).st_size, path, keys)


def parse_safetensors(data: bytes, source: str | os.PathLike, keys: KeySelection = None
                      ) -> tuple[dict[str, Tensor], dict[str, str]]:
    """:func:`read_safetensors` on bytes already in memory (say, the bytes whose hash was just checked).

    Args:
        source: file name used in error messages.
    """
    return _read(io.BytesIO(data), len(data), Path(source), keys)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
