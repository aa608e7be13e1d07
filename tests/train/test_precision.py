"""``run.precision: fp16``: float16 autocast on the run's device with a gradient scaler (skipped steps on overflow,
its state in every checkpoint, exact resume)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.errors import FileFormatError
from lorakit.train import loop, train
from lorakit.train.config import ConfigError, TrainConfig


def _watch(monkeypatch: pytest.MonkeyPatch, seen: list[torch.dtype], loss_factor: dict[int, float] | None = None):
    """Record the dtype of every lm_head output; multiply the loss of the n-th training forward by
    ``loss_factor[n]`` (counted from 0)."""
    real_build = loop.build_task

    def build(cfg):
        task = real_build(cfg)
        task.model.lm_head.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
        real_loss, calls = task.loss, []

        def loss(model, batch):
            value = real_loss(model, batch)
            calls.append(1)
            return value * (loss_factor or {}).get(len(calls) - 1, 1.0)

        task.loss = loss
        return task

    monkeypatch.setattr(loop, "build_task", build)


def _state(run: Path) -> dict:
    pointer = json.loads((run / "checkpoints" / "latest.json").read_text())
    return json.loads((run / "checkpoints" / pointer["folder"] / "state.json").read_text())


def test_fp16_computes_in_float16_and_keeps_the_scaler_in_the_checkpoint(tiny_lm, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.dtype] = []
    _watch(monkeypatch, seen)
    cfg = tiny_lm(tmp_path / "run", max_steps=3)
    cfg.run.precision = "fp16"
    result = train(cfg)
    assert set(seen) == {torch.float16} and len(seen) == 3 + 1  # three training forwards, the final eval
    assert all(m.A.dtype == torch.float32 for m in lk.load(result.adapter_last).modules.values())
    scaler = _state(tmp_path / "run")["scaler"]
    # no overflow in three steps: the scale stays at its start and the tracker counts the good steps
    assert (scaler["scale"], scaler["_growth_tracker"]) == (65536.0, 3)
    fp32 = train(tiny_lm(tmp_path / "fp32", max_steps=3))
    assert "scaler" not in _state(tmp_path / "fp32")
    # the same training in float16 arithmetic: close to float32's, not equal
    a, b = lk.load(result.adapter_last), lk.load(fp32.adapter_last)
    diffs = [float((a.modules[p].B - b.modules[p].B).abs().max()) for p in a.modules]
    assert 0 < max(diffs) < 1e-2


def test_an_overflowing_step_is_skipped_and_the_scale_backs_off(tiny_lm, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.dtype] = []
    _watch(monkeypatch, seen, loss_factor={0: 1e4})  # 1e4 x 65536: float16 gradients overflow in step 1
    cfg = tiny_lm(tmp_path / "run", max_steps=1)
    cfg.run.precision, cfg.run.eval_before = "fp16", True
    result = train(cfg)
    assert _state(tmp_path / "run")["scaler"]["scale"] == 32768.0
    # the step was skipped: B is still its initial zero, so the adapter is the base model
    assert all(float(m.B.abs().max()) == 0 for m in lk.load(result.adapter_last).modules.values())
    assert result.final_metrics["eval_loss"] == result.base_metrics["eval_loss"]
    from lorakit.train.report import read_metrics

    (record,) = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "train"]
    assert record["skipped_steps"] == 1 and record["grad_norm"] is None  # inf: JSON null, never NaN


def test_fp16_resume_ends_equal_to_an_uninterrupted_run(tiny_lm, tmp_path: Path, interrupt_after, same_adapter,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    _watch(monkeypatch, [], loss_factor={1: 1e4})  # an overflow before the checkpoint: the backed-off scale resumes
    full_cfg = tiny_lm(tmp_path / "full")
    full_cfg.run.precision = "fp16"
    full = train(full_cfg)
    cfg = tiny_lm(tmp_path / "cut")
    cfg.run.precision, cfg.run.checkpoint_every = "fp16", 3
    interrupt_after(cfg, 4)
    assert _state(tmp_path / "cut")["scaler"]["scale"] == 32768.0
    monkeypatch.undo()  # the resumed part's forwards are all past the overflowing one
    resumed = train(cfg, resume=True)
    same_adapter(full.adapter_last, resumed.adapter_last, rtol=0, atol=0)


@pytest.mark.parametrize("scaler, field", [({"scale": -1.0}, "scale"), ({"_growth_tracker": "2"}, "_growth_tracker"),
                                           ({"growth_interval": 0}, "growth_interval")])
def test_a_malformed_scaler_state_is_a_clean_error(tiny_lm, tmp_path: Path, scaler: dict, field: str) -> None:
    cfg = tiny_lm(tmp_path / "run", max_steps=2)
    cfg.run.precision, cfg.run.checkpoint_every = "fp16", 1
    train(cfg)
    path = tmp_path / "run" / "checkpoints" / json.loads((tmp_path / "run/checkpoints/latest.json").read_text())[
        "folder"] / "state.json"
    state = json.loads(path.read_text())
    state["scaler"].update(scaler)
    path.write_text(json.dumps(state))
    cfg.optim.max_steps = 3
    with pytest.raises(FileFormatError, match=rf"state.json.*scaler.*{field}"):
        train(cfg, resume=True)


def test_precision_is_checked() -> None:
    raw = {"task": "causal-lm", "model": {"name": "tiny-gpt2"}, "data": {"dataset": "text-file", "path": "x"},
           "run": {"precision": "fp8"}}
    with pytest.raises(ConfigError, match=r"run.precision.*'fp32', 'bf16' or 'fp16'.*fp8"):
        TrainConfig.from_dict(raw)
