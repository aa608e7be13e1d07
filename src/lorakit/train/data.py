"""Loaders for the real data sets in ``lorakit.models.hub.data_root()`` (``../shared/data`` or ``$LORAKIT_DATA``).

When the local files are absent, each loader falls back to the public hub copy through ``datasets`` (if
installed), so the same job runs elsewhere. Every loader returns plain Python lists; nothing here touches torch
state.
"""

from __future__ import annotations

import io
import random
import tarfile
from pathlib import Path

import numpy as np

from lorakit.errors import LorakitError
from lorakit.models.hub import data_root

#: CIFAR-10 class names in label order (the JPEG tarballs use them as folder names).
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DataError(LorakitError):
    """A data file is missing or malformed; the message names the file and line."""


def _hub(name: str, *args: str, split: str):
    """``datasets.load_dataset(name, *args, split=split)``, or a clear error when neither copy is available."""
    try:
        from datasets import load_dataset
    except ImportError:
        raise DataError(f"{name}: local files not found under {data_root()} and the `datasets` package is not "
                        "installed (set LORAKIT_DATA or pip install datasets)") from None
    return load_dataset(name, *args, split=split)


def read_sst2(split: str) -> list[tuple[str, int]]:
    """GLUE SST-2 ``train`` or ``dev`` as ``(sentence, label)`` pairs (label 1 = positive).

    The local TSV has a header line; rows are split on their last tab.
    """
    path = data_root() / "sst2" / f"{split}.tsv"
    if not path.is_file():
        rows = _hub("glue", "sst2", split="validation" if split == "dev" else split)
        return [(r["sentence"].strip(), int(r["label"])) for r in rows]
    out = []
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines[1:], start=2):
        text, sep, label = line.rpartition("\t")
        if not sep or label.strip() not in ("0", "1"):
            raise DataError(f"{path}:{n}: expected 'sentence<TAB>0|1', got {line[:60]!r}")
        out.append((text.strip(), int(label)))
    return out


def read_rt_polarity(split: str, eval_share: float = 0.1, seed: int = 0) -> list[tuple[str, int]]:
    """Rotten Tomatoes sentence polarity, shuffled with ``seed`` and split into ``train`` / ``dev`` (10%)."""
    root = data_root() / "rt-polarity"
    if not (root / "rt-polarity.pos").is_file():
        rows = _hub("rotten_tomatoes", split="validation" if split == "dev" else split)
        return [(r["text"].strip(), int(r["label"])) for r in rows]
    rows = []
    for label, name in ((1, "rt-polarity.pos"), (0, "rt-polarity.neg")):
        text = (root / name).read_text(encoding="utf-8")
        rows += [(line.strip(), label) for line in text.splitlines() if line.strip()]
    random.Random(seed).shuffle(rows)
    cut = int(len(rows) * eval_share)
    return rows[cut:] if split == "train" else rows[:cut]


def read_cifar10_jpg(split: str) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 JPEG re-encodings read straight from the tarball.

    Returns:
        images: (N, 32, 32, 3) uint8, RGB; labels: (N,) int64. Members are in tar order.
    """
    from PIL import Image

    path = data_root() / "cifar10-jpg" / f"cifar10-{'train' if split == 'train' else 'test'}-jpg.tar.gz"
    if not path.is_file():
        rows = _hub("cifar10", split="train" if split == "train" else "test")
        return (np.stack([np.asarray(r["img"].convert("RGB")) for r in rows]),
                np.array([int(r["label"]) for r in rows], dtype=np.int64))
    images, labels = [], []
    with tarfile.open(path, "r:gz") as tar:
        for member in tar:
            if not member.isfile() or not member.name.endswith(".jpg"):
                continue
            cls = Path(member.name).parent.name
            if cls not in CIFAR10_CLASSES:
                raise DataError(f"{path}: member {member.name!r} is not under a CIFAR-10 class folder")
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
            img = Image.open(io.BytesIO(data)).convert("RGB")
            images.append(np.asarray(img, dtype=np.uint8))
            labels.append(CIFAR10_CLASSES.index(cls))
    if not images:
        raise DataError(f"{path}: no JPEG members found")
    return np.stack(images), np.array(labels, dtype=np.int64)


def read_lines(path: str | Path) -> list[str]:
    """Non-empty lines of a UTF-8 text file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def subset(n_total: int, rows: int | None, seed: int) -> list[int]:
    """Indices of a fixed random subset of ``rows`` out of ``n_total`` (all, in order, when ``rows`` is None)."""
    if rows is None or rows >= n_total:
        return list(range(n_total))
    return sorted(random.Random(seed).sample(range(n_total), rows))
