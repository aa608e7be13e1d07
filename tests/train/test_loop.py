"""The loop: schedule, LoRA+ groups, outputs, resume equivalence, NaN stop, refusing to overwrite a run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.train import evaluate_run, loop
from lorakit.train.loop import RunDirError, TrainingDivergedError, lr_factor, param_groups, train


def test_lr_schedule_warms_up_then_decays() -> None:
    f = [lr_factor(s, 10, 2, "linear") for s in range(10)]
    assert f[0] == 0.5 and f[1] == 1.0 and f[2] == 1.0 and f[-1] == pytest.approx(1 / 8)
    assert lr_factor(9, 10, 0, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    assert lr_factor(5, 10, 0, "constant") == 1.0


def test_lora_plus_gives_b_a_higher_lr() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    lk.inject(model, ["0"], rank=2, train=["1"])
    groups = param_groups(model, 1e-3, 16.0)
    b_ids = {id(layer.lora["default"].B) for _, layer in lk.lora_layers(model)}
    assert [g["lr"] for g in groups] == [1e-3, 1.6e-2]
    assert {id(p) for p in groups[1]["params"]} == b_ids


def test_run_writes_its_records(tiny_lm, tmp_path: Path) -> None:
    result = train(tiny_lm(tmp_path / "run"))
    run = tmp_path / "run"
    for name in ("config.yaml", "versions.json", "metrics.jsonl", "plot.png", "adapter-last.safetensors",
                 "adapter-best.safetensors", "checkpoints/latest.json"):
        assert (run / name).is_file(), name
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
    assert all({"loss", "lr", "examples_per_s"} <= r.keys() for r in records if r["kind"] == "train")
    adapter = lk.load(result.adapter_last)
    assert adapter.base_model == "tiny-gpt2" and len(adapter) > 0
    assert (run / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_gives_the_same_adapter(tiny_lm, tmp_path: Path, interrupt_after, same_adapter) -> None:
    opts = {"grad_accum": 2, "lora_plus_ratio": 4.0}
    full = train(tiny_lm(tmp_path / "full", **opts), reporter=None)
    cfg = tiny_lm(tmp_path / "cut", **opts)
    cfg.run.checkpoint_every = 3
    torch.manual_seed(1234)  # a different global RNG state before the first part: resume must not depend on it
    interrupt_after(cfg, 5)
    assert json.loads((tmp_path / "cut/checkpoints/latest.json").read_text())["step"] == 3
    torch.manual_seed(999)
    resumed = train(cfg, resume=True)
    same_adapter(full.adapter_last, resumed.adapter_last, rtol=1e-5)
    records = [json.loads(line) for line in (tmp_path / "cut/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_lm, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real_build = loop.build_task

    def build_with_bad_loss(cfg):
        task = real_build(cfg)
        inner, calls = task.loss, []

        def loss(model, batch):
            calls.append(1)
            value = inner(model, batch)
            return value * float("nan") if len(calls) == 5 else value

        task.loss = loss
        return task

    monkeypatch.setattr(loop, "build_task", build_with_bad_loss)
    cfg = tiny_lm(tmp_path / "run")
    cfg.run.checkpoint_every = 2
    with pytest.raises(TrainingDivergedError, match=r"loss is nan at step 5.*step-0000004"):
        train(cfg)
    folders = sorted(p.name for p in (tmp_path / "run/checkpoints").iterdir())
    assert folders == ["latest.json", "step-0000004"]
    assert not (tmp_path / "run/adapter-last.safetensors").exists()


def test_fresh_run_refuses_a_used_folder_and_resume_needs_a_checkpoint(tiny_lm, tmp_path: Path) -> None:
    cfg = tiny_lm(tmp_path / "run", max_steps=2)
    with pytest.raises(RunDirError, match="nothing to resume"):
        train(cfg, resume=True)
    train(cfg)
    with pytest.raises(RunDirError, match="already holds a run"):
        train(cfg)


def test_image_task_with_bf16_and_a_tiny_llama(tiny_lm, tmp_path: Path) -> None:
    raw = {"task": "image-classification", "model": {"name": "tiny-resnet", "num_labels": 10},
           "data": {"dataset": "synthetic", "train_rows": 16, "eval_rows": 8},
           "lora": {"targets": ["all-conv"], "rank": 2, "train": ["linear"]},
           "optim": {"batch_size": 8, "max_steps": 2}, "run": {"out_dir": str(tmp_path / "img")}}
    from lorakit.train.config import TrainConfig

    result = train(TrainConfig.from_dict(raw))
    # frozen batch-norm statistics stay put, so base + saved adapter reproduces the trained model's figures
    assert evaluate_run(tmp_path / "img", "last") == pytest.approx(result.final_metrics, rel=1e-6)
    adapter = lk.load(result.adapter_last)
    assert all(m.kind == "conv2d" for m in adapter.modules.values()) and "linear.weight" in adapter.overrides
    assert 0.0 <= result.final_metrics["accuracy"] <= 1.0
    cfg = tiny_lm(tmp_path / "llama", max_steps=2)
    cfg.model.name, cfg.run.precision = "tiny-llama", "bf16"
    assert math.isfinite(train(cfg).final_metrics["eval_loss"])


def test_periodic_eval_keeps_the_best_adapter(tiny_lm, tmp_path: Path) -> None:
    cfg = tiny_lm(tmp_path / "run")
    cfg.run.eval_every = 2
    result = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval_loss"] for r in records if r["kind"] == "eval"}
    assert sorted(evals) == [2, 4, 6]
    best_step = min(evals, key=evals.get)
    assert result.best_metrics["step"] == best_step
    assert lk.load(result.adapter_best).metadata["step"] == str(best_step)


def test_head_only_baseline_trains_and_saves_just_the_head(tmp_path: Path) -> None:
    from lorakit.train.config import TrainConfig

    raw = {"task": "image-classification", "model": {"name": "tiny-resnet", "num_labels": 10},
           "data": {"dataset": "synthetic", "train_rows": 16, "eval_rows": 8},
           "lora": {"targets": [], "train": ["linear"]},
           "optim": {"batch_size": 8, "max_steps": 2, "lr": 1e-2}, "run": {"out_dir": str(tmp_path / "head")}}
    result = train(TrainConfig.from_dict(raw))
    adapter = lk.load(result.adapter_last)
    assert len(adapter.modules) == 0 and sorted(adapter.overrides) == ["linear.bias", "linear.weight"]
    assert result.trainable_params == adapter.overrides["linear.weight"].numel() + adapter.overrides["linear.bias"].numel()
    assert evaluate_run(tmp_path / "head", "last") == pytest.approx(result.final_metrics, rel=1e-6)


def test_snapshots_every_n_steps_keep_the_last_n(tiny_lm, tmp_path: Path) -> None:
    cfg = tiny_lm(tmp_path / "run", max_steps=7)
    cfg.run.save_every, cfg.run.keep_last = 2, 2
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "adapter-step-notes.txt").write_text("a user's file")  # not a snapshot: left alone
    result = train(cfg)
    names = sorted(p.name for p in (tmp_path / "run").glob("adapter-step*"))
    assert names == ["adapter-step-notes.txt", "adapter-step0000004.safetensors", "adapter-step0000006.safetensors"]
    six = lk.load(tmp_path / "run" / "adapter-step0000006.safetensors")
    assert six.metadata["step"] == "6"
    last = lk.load(result.adapter_last)
    assert not all(torch.equal(m.B, last.modules[p].B) for p, m in six.modules.items())  # one step before the last
    cfg = tiny_lm(tmp_path / "all", max_steps=4)
    cfg.run.save_every = 1
    train(cfg)
    assert len(list((tmp_path / "all").glob("adapter-step*.safetensors"))) == 4  # keep_last 0: every one
    assert loop.prune_snapshots(tmp_path / "all", 1) == [tmp_path / "all" / f"adapter-step000000{i}.safetensors"
                                                       for i in (1, 2, 3)]
