"""``optim.ema_decay``: the moving average of the trained parameters (diffusers' warm-up), used for evaluation and
saved adapters, kept in checkpoints so that a resumed run averages as an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.errors import FileFormatError
from lorakit.train import evaluate_run, train
from lorakit.train.config import ConfigError, TrainConfig
from lorakit.train.ema import EMA, ema_decay
from lorakit.train.loop import prepare


def test_decay_warms_up_as_diffusers_ema_model() -> None:
    assert ema_decay(0.999, 0) == pytest.approx(0.1)
    assert ema_decay(0.999, 10) == pytest.approx(11 / 20)
    assert ema_decay(0.9, 1000) == 0.9


def test_average_swap_and_restore() -> None:
    p = torch.nn.Parameter(torch.tensor([0.0, 10.0]))
    ema = EMA([("w", p)], decay=0.5)
    with torch.no_grad():
        p.copy_(torch.tensor([1.0, 20.0]))
    ema.update(0)  # d = min(0.5, 0.1) = 0.1: 0.1·(0, 10) + 0.9·(1, 20)
    torch.testing.assert_close(ema.average["w"], torch.tensor([0.9, 19.0]))
    with torch.no_grad():
        p.copy_(torch.tensor([3.0, 30.0]))
    ema.update(5)  # d = min(0.5, 6/15) = 0.4
    expected = torch.tensor([0.4 * 0.9 + 0.6 * 3, 0.4 * 19 + 0.6 * 30])
    torch.testing.assert_close(ema.average["w"], expected)
    with ema.swapped():
        torch.testing.assert_close(p.detach(), expected)
    torch.testing.assert_close(p.detach(), torch.tensor([3.0, 30.0]))
    assert ema.load({"w": torch.zeros(3)}) == ["w"] and ema.load({"w": expected, "x": expected}) == ["x"]


def _cfg(tiny_lm, out: Path, **optim) -> TrainConfig:
    cfg = tiny_lm(out, **optim)
    cfg.lora.dropout = 0.0
    return cfg


def test_saved_adapter_is_the_average_of_the_raw_trajectory(tiny_lm, tmp_path: Path) -> None:
    raw_cfg = _cfg(tiny_lm, tmp_path / "raw")
    raw_cfg.run.save_every = 1  # the raw parameters after every step
    task, _ = prepare(raw_cfg)
    trajectory = [lk.extract(task.model)]
    train(raw_cfg)
    trajectory += [lk.load(tmp_path / "raw" / f"adapter-step{k:07d}.safetensors") for k in range(1, 7)]

    result = train(_cfg(tiny_lm, tmp_path / "ema", ema_decay=0.6))
    got = lk.load(result.adapter_last)
    for path in got.modules:
        for factor in ("A", "B"):
            avg = getattr(trajectory[0].modules[path], factor).clone()
            for k in range(6):
                avg.lerp_(getattr(trajectory[k + 1].modules[path], factor), 1 - ema_decay(0.6, k))
            torch.testing.assert_close(getattr(got.modules[path], factor), avg, rtol=1e-5, atol=1e-7, msg=path)
    # the raw run's last step differs from the average, and the eval figure is the average's
    assert not torch.allclose(got.modules[path].B, trajectory[-1].modules[path].B)
    assert evaluate_run(tmp_path / "ema", "last")["eval_loss"] == pytest.approx(result.final_metrics["eval_loss"],
                                                                                rel=1e-6)
    # the returned model holds the average too
    torch.testing.assert_close(lk.extract(result.model).modules[path].B, got.modules[path].B, rtol=0, atol=0)


def test_resume_with_an_average_ends_equal_to_an_uninterrupted_run(tiny_lm, tmp_path: Path, interrupt_after,
                                                                   same_adapter) -> None:
    full = train(tiny_lm(tmp_path / "full", ema_decay=0.8))
    cfg = tiny_lm(tmp_path / "cut", ema_decay=0.8)
    cfg.run.checkpoint_every = 3
    interrupt_after(cfg, 4)
    folder = tmp_path / "cut" / "checkpoints" / json.loads((tmp_path / "cut/checkpoints/latest.json").read_text())[
        "folder"]
    assert (folder / "ema.safetensors").is_file()
    resumed = train(cfg, resume=True)
    same_adapter(full.adapter_last, resumed.adapter_last, rtol=0, atol=0)


def test_a_checkpoint_without_the_average_is_a_clean_error(tiny_lm, tmp_path: Path) -> None:
    cfg = tiny_lm(tmp_path / "run", max_steps=2)
    cfg.run.checkpoint_every = 1
    train(cfg)
    cfg.optim.ema_decay, cfg.optim.max_steps = 0.9, 3
    with pytest.raises(FileFormatError, match="no ema.safetensors: the run was started without optim.ema_decay"):
        train(cfg, resume=True)


@pytest.mark.parametrize("bad", [1.0, 0, "0.9", True, -0.5])
def test_decay_is_checked(bad) -> None:
    raw = {"task": "causal-lm", "model": {"name": "tiny-gpt2"}, "data": {"dataset": "text-file", "path": "x"},
           "optim": {"ema_decay": bad}}
    with pytest.raises(ConfigError, match=r"optim.ema_decay.*null or a number in \(0, 1\)"):
        TrainConfig.from_dict(raw)
