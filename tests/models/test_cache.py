"""Pretrained weights trained on first use: read from the cache folder, never retrained when present."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorakit.formats.safetensors_io import read_safetensors, write_safetensors
from lorakit.models import cache, fashion_ae, fashion_cnn


@pytest.mark.parametrize("module, load, cls", [
    (fashion_cnn, fashion_cnn.pretrained_fashion_cnn, fashion_cnn.FashionCNN),
    (fashion_ae, fashion_ae.pretrained_fashion_ae, fashion_ae.FashionAE),
])
def test_pretrained_reads_the_cache_and_never_trains_when_told(module, load, cls, tmp_path: Path,
                                                               monkeypatch) -> None:
    with pytest.raises(FileNotFoundError, match="no pretrained"):
        load(tmp_path, train_if_missing=False)
    torch.manual_seed(1)
    saved = cls()
    write_safetensors(saved.state_dict(), tmp_path / module._recipe_name())
    monkeypatch.setattr(module, "_pretrain", lambda path: pytest.fail("trained although cached"))
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path))  # the default folder follows $LORAKIT_CACHE
    loaded = load()
    assert not loaded.training
    for k, v in saved.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v)


def test_a_missing_file_is_pretrained_once_then_read(tmp_path: Path) -> None:
    calls = []

    def pretrain(path: Path) -> None:
        calls.append(path)
        write_safetensors({"weight": torch.ones(2, 3), "bias": torch.zeros(2)}, path)

    first = cache.load_or_pretrain(torch.nn.Linear(3, 2), "lin.safetensors", tmp_path, True, pretrain, "linear")
    second = cache.load_or_pretrain(torch.nn.Linear(3, 2), "lin.safetensors", tmp_path, True, pretrain, "linear")
    assert calls == [tmp_path / "lin.safetensors"]
    torch.testing.assert_close(second.weight, first.weight)
    assert float(first.weight.detach().sum()) == 6.0 and not first.training


def test_pretraining_runs_on_one_thread_and_restores_the_count(tmp_path: Path, monkeypatch) -> None:
    import lorakit.train as train_module

    seen = []

    class Result:
        model = torch.nn.Linear(2, 2)
        final_metrics = {"accuracy": 0.5}

    monkeypatch.setattr(train_module, "train", lambda cfg: seen.append(torch.get_num_threads()) or Result())
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cache.pretrain_and_save(tmp_path / "w.safetensors", fashion_cnn.pretrain_config, {"seed": 0}, "test")
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    tensors, meta = read_safetensors(tmp_path / "w.safetensors")
    assert set(tensors) == {"weight", "bias"} and meta["val_accuracy"] == "0.500000" and meta["trained_by"] == "test"
