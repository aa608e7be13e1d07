"""FashionCNN: shapes, and the cached pretrained weights (read without training, refused when absent)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorakit.formats.safetensors_io import write_safetensors
from lorakit.models import fashion_cnn
from lorakit.models.fashion_cnn import FEATURE_DIM, FashionCNN, pretrained_fashion_cnn


def test_shapes_and_embed_is_the_features_tap() -> None:
    torch.manual_seed(0)
    model = FashionCNN().eval()
    x = torch.rand(3, 1, 28, 28)
    assert model(x).shape == (3, 10) and model.embed(x).shape == (3, FEATURE_DIM)
    torch.testing.assert_close(model.head(model.embed(x)), model(x))


def test_pretrained_reads_the_cache_and_never_trains_when_told(tmp_path: Path, monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="no pretrained"):
        pretrained_fashion_cnn(tmp_path, train_if_missing=False)
    torch.manual_seed(1)
    saved = FashionCNN()
    write_safetensors(saved.state_dict(), tmp_path / fashion_cnn._recipe_name())
    monkeypatch.setattr(fashion_cnn, "_pretrain", lambda path: pytest.fail("trained although cached"))
    monkeypatch.setenv(fashion_cnn.CACHE_ENV, str(tmp_path))
    loaded = pretrained_fashion_cnn()
    assert not loaded.training
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)
