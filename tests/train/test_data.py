"""The loaders read the real shared files (skipped, with the reason, when the data folder is absent)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorakit.models.hub import data_root
from lorakit.models.resnet_cifar import MEAN, STD, resnet20_cifar10
from lorakit.train.data import DataError, read_cifar10_jpg, read_fashion_mnist, read_rt_polarity, read_sst2, subset

ROOT = data_root()
needs = lambda sub: pytest.mark.skipif(not (ROOT / sub).is_dir(),
                                       reason=f"shared data folder {ROOT / sub} is absent (set LORAKIT_DATA)")


@needs("sst2")
def test_sst2_counts_and_labels() -> None:
    train, dev = read_sst2("train"), read_sst2("dev")
    assert (len(train), len(dev)) == (67_349, 872)
    assert sum(y for _, y in train) == 37_569 and sum(y for _, y in dev) == 444
    assert all(text and not text.endswith((" ", "\t")) for text, _ in dev)


@needs("rt-polarity")
def test_rt_polarity_split_is_fixed_and_disjoint() -> None:
    train, dev = read_rt_polarity("train"), read_rt_polarity("dev")
    assert len(train) + len(dev) == 10_662 and len(dev) == 1_066
    assert read_rt_polarity("dev") == dev
    assert 0.4 < np.mean([y for _, y in dev]) < 0.6


@needs("cifar10-jpg")
@needs("pretrained/resnet20-cifar10")
def test_cifar_jpegs_and_pretrained_resnet20() -> None:
    x, y = read_cifar10_jpg("test")
    assert x.shape == (10_000, 32, 32, 3) and x.dtype == np.uint8
    assert np.bincount(y).tolist() == [1000] * 10
    head, head_y = read_cifar10_jpg("test", limit=7)  # the first images in tar order, without decoding the rest
    assert np.array_equal(head, x[:7]) and np.array_equal(head_y, y[:7])
    model = resnet20_cifar10().eval()  # weights_only=True, strict=True
    assert sum(p.numel() for p in model.parameters()) == 269_722
    keep = subset(len(y), 500, seed=0)
    pixels = torch.from_numpy(x[keep]).permute(0, 3, 1, 2).float() / 255
    pixels = (pixels - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        acc = (model(pixels).argmax(-1) == torch.from_numpy(y[keep])).float().mean().item()
    assert 0.72 < acc < 0.9  # ~81% on the JPEG re-encodings (91.8% on the original pixels)


@needs("fashion-mnist")
def test_fashion_mnist_counts() -> None:
    x, y = read_fashion_mnist("test")
    assert x.shape == (10_000, 28, 28) and x.dtype == np.uint8 and y.dtype == np.int64
    assert np.bincount(y).tolist() == [1000] * 10
    x, y = read_fashion_mnist("train")
    assert x.shape == (60_000, 28, 28) and np.bincount(y).tolist() == [6000] * 10


def test_fashion_mnist_bad_file_is_named(tmp_path, monkeypatch) -> None:
    import gzip

    root = tmp_path / "fashion-mnist"
    root.mkdir()
    (root / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + (5).to_bytes(4, "big")))
    monkeypatch.setenv("LORAKIT_DATA", str(tmp_path))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        read_fashion_mnist("test")
