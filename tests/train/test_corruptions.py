"""Target-domain corruptions are pure, deterministic, in range, and leave their input alone."""

from __future__ import annotations

import numpy as np
import pytest

from lorakit.train.corruptions import CORRUPTIONS, corrupt


@pytest.fixture
def images() -> np.ndarray:
    g = np.random.default_rng(0)
    x = np.zeros((6, 28, 28), dtype=np.uint8)
    x[:, 6:22, 8:20] = g.integers(80, 256, (6, 16, 12))  # a bright object on black, like Fashion-MNIST
    return x


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_corruption_is_deterministic_in_range_and_pure(images: np.ndarray, name: str) -> None:
    before = images.copy()
    a, b = corrupt(images, name), corrupt(images, name)
    assert a.dtype == np.uint8 and a.shape == images.shape
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(images, before)
    assert (name == "none") == np.array_equal(a, images)


def test_each_corruption_does_what_it_says(images: np.ndarray) -> None:
    np.testing.assert_array_equal(corrupt(images, "invert"), 255 - images)
    blurred = corrupt(images, "blur").astype(float)
    assert abs(blurred.mean() - images.mean()) < 2  # blur moves mass, barely changes it (some leaks off the edge)
    assert np.abs(np.diff(blurred, axis=2)).mean() < 0.5 * np.abs(np.diff(images.astype(float), axis=2)).mean()
    low = corrupt(images, "contrast-noise").astype(float)
    assert low.std() < images.std() and ((low == 0) | (low == 255)).mean() < 0.01  # squeezed around grey
    assert 70 < low[:, :3, :3].mean() < 110  # the black background moved towards grey (0.5 - 0.3 * 0.5)
    assert np.unique(low[:, :3, :3]).size > 5  # ... with noise on it


def test_unknown_corruption_is_named(images: np.ndarray) -> None:
    with pytest.raises(ValueError, match="'fog'"):
        corrupt(images, "fog")
