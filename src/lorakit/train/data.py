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


def read_cifar10_jpg(split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10 JPEG re-encodings read straight from the tarball.

    Args:
        split: ``train`` or ``test``.
        limit: read only the first ``limit`` images (decoding all 10,000 test images takes seconds).

    Returns:
        images: (N, 32, 32, 3) uint8, RGB; labels: (N,) int64. Members are in tar order.
    """
    from PIL import Image

    path = data_root() / "cifar10-jpg" / f"cifar10-{'train' if split == 'train' else 'test'}-jpg.tar.gz"
    if not path.is_file():
        rows = _hub("cifar10", split="train" if split == "train" else "test")
        rows = rows if limit is None else rows.select(range(min(limit, len(rows))))
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
            if len(images) == limit:
                break
    if not images:
        raise DataError(f"{path}: no JPEG members found")
    return np.stack(images), np.array(labels, dtype=np.int64)


#: Fashion-MNIST class names in label order.
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot")


def _read_idx(path: Path, magic: int, dims: int) -> np.ndarray:
    """One gzip-compressed IDX file (big-endian magic, ``dims`` sizes, then uint8 data)."""
    import gzip

    try:
        raw = gzip.decompress(path.read_bytes())
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read gzip IDX data: {e}") from None
    head = 4 + 4 * dims
    if len(raw) < head or int.from_bytes(raw[:4], "big") != magic:
        raise DataError(f"{path}: not an IDX file with magic {magic}")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(dims))
    if len(raw) - head != int(np.prod(shape)):
        raise DataError(f"{path}: header says {shape} but holds {len(raw) - head} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=head).reshape(shape)


def read_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``train`` (60,000) or ``test`` (10,000) from the original IDX ``.gz`` files.

    Returns:
        images: (N, 28, 28) uint8; labels: (N,) int64 in 0..9 (see :data:`FASHION_MNIST_CLASSES`).
    """
    stem = "train" if split == "train" else "t10k"
    root = data_root() / "fashion-mnist"
    images_path, labels_path = root / f"{stem}-images-idx3-ubyte.gz", root / f"{stem}-labels-idx1-ubyte.gz"
    if not images_path.is_file():
        rows = _hub("fashion_mnist", split="train" if split == "train" else "test")
        return (np.stack([np.asarray(r["image"], dtype=np.uint8) for r in rows]),
                np.array([int(r["label"]) for r in rows], dtype=np.int64))
    images = _read_idx(images_path, 2051, 3)
    labels = _read_idx(labels_path, 2049, 1).astype(np.int64)
    if len(images) != len(labels):
        raise DataError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
    return images.copy(), labels


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
