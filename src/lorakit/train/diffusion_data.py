"""Stable Diffusion training data the way SD users keep it: an image folder with caption files, kohya repeats,
caption options, aspect-ratio buckets and latents cached on disk.

Layout (kohya sd-scripts' convention)::

    data.path/
        10_ink/          # repeats 10: each image of this folder counts 10 times per epoch
            a.png        # an image (.png, .jpg, .jpeg, .webp, .bmp)
            a.txt        # its caption, UTF-8; absent → the folder's name after the repeats ("ink")
        b.png            # images directly in the root count once; no caption file → empty caption

Each image goes to the bucket (width, height) whose aspect ratio is nearest its own (:func:`make_buckets`, kohya's
``make_bucket_resolutions``), is resized to cover it and centre-cropped, then encoded once by the VAE; the latent
(the posterior mean, times the VAE's ``scaling_factor``) is cached as a safetensors file keyed by the image's path,
mtime and size, the bucket and the VAE's identity, so a resumed or repeated run reads it instead of encoding.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lorakit.formats.safetensors_io import read_safetensors, write_safetensors
from lorakit.train.data import DataError

#: Image file suffixes read (lower case).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
_REPEATS = re.compile(r"^(\d+)_(.*)$")


@dataclass(frozen=True)
class ImageRecord:
    """One image of the folder.

    Attributes:
        path: the image file.
        caption: its caption (from ``<stem>.txt``, else the folder's class name), before any caption option.
        repeats: how many times it counts per epoch (the ``N_`` of its folder, 1 in the root).
    """

    path: Path
    caption: str
    repeats: int


def scan_folder(root: str | Path) -> list[ImageRecord]:
    """The images under ``root`` and its direct subfolders, in sorted order, with captions and repeats.

    Raises:
        DataError: ``root`` is not a folder, holds no image, or a caption file is not UTF-8 (named).
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: data.path is not a folder")
    folders = [(root, 1, "")]
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        m = _REPEATS.match(sub.name)
        folders.append((sub, int(m.group(1)), m.group(2).replace("_", " ")) if m else (sub, 1, sub.name))
    records = []
    for folder, repeats, class_name in folders:
        for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES):
            records.append(ImageRecord(path, _caption(path, class_name), repeats))
    if not records:
        raise DataError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder or its subfolders")
    return records


def _caption(image: Path, default: str) -> str:
    path = image.with_suffix(".txt")
    if not path.is_file():
        return default
    try:
        return path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: caption file is not UTF-8 (byte {e.start})") from None


def make_buckets(resolution: int, min_size: int, max_size: int, step: int) -> list[tuple[int, int]]:
    """Bucket sizes (width, height) of area at most ``resolution²``, sides in ``[min_size, max_size]`` and multiples
    of ``step``, sorted; the square ``resolution`` bucket is always one (kohya's ``make_bucket_resolutions``)."""
    max_area = (resolution // step) ** 2
    side = int(math.sqrt(max_area)) * step
    buckets = {(side, side)}
    width = min_size
    while width <= max_size:
        height = min(max_size, (max_area // (width // step)) * step)
        if height >= min_size:
            buckets.add((width, height))
            buckets.add((height, width))
        width += step
    return sorted(buckets)


def assign_bucket(size: tuple[int, int], buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio (width / height) is nearest that of ``size`` (first of the sorted on ties)."""
    ratio = size[0] / size[1]
    return min(buckets, key=lambda b: abs(b[0] / b[1] - ratio))


def cover_crop(size: tuple[int, int], bucket: tuple[int, int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """Where :func:`fit_to_bucket` puts an image of ``size`` (width, height): the size (width, height) it is resized
    to (covering ``bucket``) and the offset (top, left) of the centre crop in that resized image."""
    width, height = bucket
    scale = max(width / size[0], height / size[1])
    resized = (max(width, round(size[0] * scale)), max(height, round(size[1] * scale)))
    return resized, ((resized[1] - height) // 2, (resized[0] - width) // 2)


def fit_to_bucket(image, bucket: tuple[int, int]) -> Tensor:
    """A PIL image resized to cover ``bucket`` and centre-cropped to it: (3, height, width) in [-1, 1]."""
    from PIL import Image

    width, height = bucket
    image = image.convert("RGB")
    resized, (top, left) = cover_crop(image.size, bucket)
    image = image.resize(resized, Image.BICUBIC)
    image = image.crop((left, top, left + width, top + height))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1)
    return pixels / 127.5 - 1.0


@dataclass(frozen=True)
class Example:
    """One training example: a cached latent and its caption.

    Attributes:
        latent: (4, height / 8, width / 8), already times the VAE's scaling factor.
        caption: the caption before the per-step options (shuffle, dropout).
        bucket: (width, height) in pixels.
        path: the source image.
        original_size: (height, width) of the source image before resizing (SDXL's ``original_size``).
        crop_top_left: (top, left) of the centre crop in the resized image (SDXL's ``crops_coords_top_left``).
    """

    latent: Tensor
    caption: str
    bucket: tuple[int, int]
    path: Path
    original_size: tuple[int, int]
    crop_top_left: tuple[int, int]


def vae_identity(vae: torch.nn.Module, name: str) -> str:
    """A short identity of a VAE: its source name, its config and a float64 checksum of its weights, so latents of
    another VAE (or of the same VAE after its weights changed) are never read back from the cache."""
    config = json.dumps(dict(getattr(vae, "config", {})), sort_keys=True, default=str)
    with torch.no_grad():
        checksum = sum(float(p.double().sum()) + float(p.double().abs().sum()) for p in vae.parameters())
    return hashlib.sha256(f"{name}\n{config}\n{checksum:.17g}".encode()).hexdigest()[:16]


def cache_key(path: Path, bucket: tuple[int, int], vae_id: str) -> str:
    """The cache file stem of ``path``'s latent: its resolved path, mtime, size, the bucket and the VAE."""
    st = path.stat()
    text = json.dumps([str(path.resolve()), st.st_mtime_ns, st.st_size, list(bucket), vae_id])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def load_examples(records: Sequence[ImageRecord], buckets: Sequence[tuple[int, int]],
                  encode: Callable[[Tensor], Tensor], vae_id: str, cache_dir: Path | None,
                  skip_bad_images: bool = False) -> list[Example]:
    """One :class:`Example` per record (not yet repeated), its latent read from ``cache_dir`` or encoded and cached.

    Args:
        records: the images (see :func:`scan_folder`).
        buckets: candidate sizes (width, height); one entry for a fixed resolution.
        encode: pixels (1, 3, H, W) in [-1, 1] → latent (1, 4, H / 8, W / 8) (scaled, no gradient).
        vae_id: :func:`vae_identity` of the encoder, part of every cache key.
        cache_dir: folder of the cached latents; None encodes every image (nothing written).
        skip_bad_images: skip unreadable images (a warning lists them) instead of raising.

    Raises:
        DataError: an image cannot be read (named), unless ``skip_bad_images``; or every image is bad.
    """
    from PIL import Image, UnidentifiedImageError

    examples, bad = [], []
    for rec in records:
        try:
            with Image.open(rec.path) as im:
                size = im.size  # (width, height) from the header: no decoding needed for a cached latent
                bucket = assign_bucket(size, buckets)
                key = cache_key(rec.path, bucket, vae_id)
                cached = cache_dir / f"{key}.safetensors" if cache_dir is not None else None
                if cached is not None and cached.is_file():
                    latent = read_safetensors(cached)[0]["latent"]
                else:
                    im.load()  # decoding errors (a truncated file) surface here, not in encode
                    latent = encode(fit_to_bucket(im, bucket)[None])[0].float().cpu().contiguous()
                    if cached is not None:
                        cached.parent.mkdir(parents=True, exist_ok=True)
                        write_safetensors({"latent": latent}, cached, {"image": str(rec.path.resolve()),
                                                                         "bucket": f"{bucket[0]}x{bucket[1]}",
                                                                         "vae": vae_id})
        except (OSError, UnidentifiedImageError, ValueError) as e:  # PIL's errors on unreadable files
            if not skip_bad_images:
                raise DataError(f"{rec.path}: cannot read image ({type(e).__name__}: {e}); set "
                                "data.skip_bad_images: true to skip it") from None
            bad.append(str(rec.path))
            continue
        # the geometry is a pure function of the header's size and the bucket, so a cached latent gets the very
        # values its encoding used without storing them (and latents cached before SDXL stay valid)
        examples.append(Example(latent, rec.caption, bucket, rec.path, (size[1], size[0]),
                                cover_crop(size, bucket)[1]))
    if bad:
        warnings.warn(f"skipped {len(bad)} unreadable image(s): {', '.join(bad)}", stacklevel=2)
    if not examples:
        raise DataError(f"{records[0].path.parent}: no readable image (skipped {len(bad)})")
    return examples


def bucket_order(buckets: Sequence[tuple[int, int]], batch_size: int, seed: int, epoch: int) -> list[int]:
    """Example indices of one epoch such that every run of ``batch_size`` consecutive indices shares one bucket.

    Within each bucket the examples are permuted (a pure function of ``seed`` and ``epoch``); a bucket's last
    batch is topped up with the bucket's first examples of that permutation; the batches are then permuted.

    Args:
        buckets: the bucket of each example.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    by_bucket: dict[tuple[int, int], list[int]] = {}
    for i, b in enumerate(buckets):
        by_bucket.setdefault(b, []).append(i)
    batches = []
    for b in sorted(by_bucket):
        members = [by_bucket[b][j] for j in torch.randperm(len(by_bucket[b]), generator=g).tolist()]
        padded = members + [members[j % len(members)] for j in range(-len(members) % batch_size)]
        batches += [padded[k:k + batch_size] for k in range(0, len(padded), batch_size)]
    return [i for k in torch.randperm(len(batches), generator=g).tolist() for i in batches[k]]


def process_caption(caption: str, *, prefix: str, shuffle: bool, keep_tokens: int, dropout: float,
                    generator: torch.Generator | None = None) -> str:
    """A caption with the per-step options applied, kohya's way: ``prefix`` is prepended (``"prefix, caption"``);
    with ``shuffle`` the comma-separated tags after the first ``keep_tokens`` are shuffled; with probability
    ``dropout`` the caption becomes empty (unconditional training). Random draws come from ``generator`` (the
    global torch generator when None, which the loop's checkpoints restore)."""
    if dropout and float(torch.rand((), generator=generator)) < dropout:
        return ""
    text = f"{prefix}, {caption}" if prefix and caption else (prefix or caption)
    if not shuffle:
        return text
    tags = [t.strip() for t in text.split(",") if t.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    tail = [tail[j] for j in torch.randperm(len(tail), generator=generator).tolist()]
    return ", ".join(head + tail)
