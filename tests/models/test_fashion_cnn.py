"""FashionCNN: shapes and the features tap (its cached pretrained weights: test_cache.py)."""

from __future__ import annotations

import torch

from lorakit.models.fashion_cnn import FEATURE_DIM, FashionCNN


def test_shapes_and_embed_is_the_features_tap() -> None:
    torch.manual_seed(0)
    model = FashionCNN().eval()
    x = torch.rand(3, 1, 28, 28)
    assert model(x).shape == (3, 10) and model.embed(x).shape == (3, FEATURE_DIM)
    torch.testing.assert_close(model.head(model.embed(x)), model(x))


