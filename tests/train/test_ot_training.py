"""Latent OT in the training loop: the ``ot:`` and ``data.target`` config, the target stream, the logged OT term,
resume with OT on, no hooks without OT, and target labels kept out of training. Tiny seeded synthetic runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.models.hub import data_root
from lorakit.train import loop, train
from lorakit.train.config import ConfigError, TrainConfig, apply_overrides
from lorakit.train.tasks import fashion_mnist

ROOT = data_root()
needs = lambda sub: pytest.mark.skipif(not (ROOT / sub).is_dir(),
                                       reason=f"shared data folder {ROOT / sub} is absent (set LORAKIT_DATA)")


def tiny(out_dir: Path, ot: dict | None = None, *, target: bool = True, **optim) -> TrainConfig:
    """A random FashionCNN with rank-2 LoRA on every conv and linear, 4 steps of 8 synthetic images, and an
    invert-corrupted synthetic target domain of 24 examples (so the target stream wraps within a run)."""
    raw = {"task": "fashion-mnist", "model": {"name": "fashion-cnn-scratch", "num_labels": 10},
           "data": {"dataset": "synthetic", "train_rows": 48, "eval_rows": 8},
           "lora": {"targets": ["all-conv", "all-linear"], "rank": 2, "alpha": 4},
           "optim": {"lr": 1e-2, "batch_size": 8, "max_steps": 4, **optim},
           "run": {"out_dir": str(out_dir), "seed": 5, "log_every": 1, "eval_before": False}}
    if target:
        raw["data"]["target"] = {"corruption": "invert", "rows": 24, "eval_rows": 8, "batch_size": 6}
    if ot is not None:
        raw["ot"] = {"tap": "features", **ot}
    return TrainConfig.from_dict(raw)


@pytest.mark.parametrize("raw, field", [
    ({"ot": {"tap": "features", "weight": -1}}, "ot.weight"),
    ({"ot": {"tap": "features", "divergence": "kl"}}, "ot.divergence"),
    ({"ot": {"tap": "features", "wieght": 1.0}}, "ot.wieght"),
    ({"ot": {"weight": 1.0}}, "ot.tap"),
    ({"ot": {"tap": "features", "divergence": "deepjdot", "pair": "prior"}}, "ot.pair"),
    ({"ot": "sliced"}, "'ot'"),
    ({"ot": {"tap": "features", "pair": "domain"}}, "data.target"),
    ({"data": {"target": {"corruption": "fog"}}}, "data.target.corruption"),
    ({"data": {"target": {"rows": 0}}}, "data.target.rows"),
    ({"data": {"target": {"colour": 1}}}, "data.target.colour"),
])
def test_ot_config_errors_name_the_field(raw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        TrainConfig.from_dict(raw)


def test_ot_config_round_trips_and_takes_nested_overrides() -> None:
    cfg = tiny(Path("unused"), {"divergence": "sinkhorn", "weight": 2.0})
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    plain = tiny(Path("unused"), target=False).to_dict()
    assert plain["ot"] is None
    raw = apply_overrides(plain, ["ot.tap=features", "ot.pair=prior", "ot.weight=0.5",
                                  "data.target.corruption=blur"])
    cfg = TrainConfig.from_dict(raw)
    assert (cfg.ot.tap, cfg.ot.pair, cfg.ot.weight, cfg.data.target.corruption) == ("features", "prior", 0.5, "blur")
    assert plain["ot"] is None and plain["data"]["target"] is None  # the caller's mapping is untouched
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        apply_overrides(plain, ["optim.lr.x=1"])


def test_unknown_tap_is_named_before_training(tmp_path: Path) -> None:
    cfg = tiny(tmp_path / "run", {"tap": "feature"})
    with pytest.raises(ConfigError, match=r"ot\.tap.*'feature'"):
        train(cfg)


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory):
    """The run without OT that the OT runs are compared with (trained once for the module)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return train(tiny(tmp_path_factory.mktemp("plain") / "run"))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("ot", [{"divergence": "sliced", "weight": 5.0},
                                {"divergence": "deepjdot", "weight": 1.0},
                                {"divergence": "sliced", "pair": "prior", "weight": 5.0}],
                         ids=["sliced-domain", "deepjdot", "sliced-prior"])
def test_ot_term_is_logged_and_changes_training(tmp_path: Path, ot: dict, plain) -> None:
    with_ot = train(tiny(tmp_path / "ot", ot))
    records = [json.loads(line) for line in (tmp_path / "ot/metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["kind"] == "train"]
    assert len(steps) == 4 and all(r["ot_loss"] > 0 for r in steps)
    assert all("ot_loss" not in r for r in plain.history)
    # the first step starts from the same weights: the total loss is the task loss plus the OT term
    first_plain = next(r for r in plain.history if r["kind"] == "train")
    assert steps[0]["loss"] == pytest.approx(first_plain["loss"] + steps[0]["ot_loss"], rel=1e-5)
    a, b = lk.load(plain.adapter_last), lk.load(with_ot.adapter_last)
    assert any(not torch.allclose(a.modules[p].B, b.modules[p].B) for p in a.modules)
    # the target metrics are reported, the best adapter is chosen on the source metric
    assert "target_accuracy" in with_ot.final_metrics and with_ot.metric == "accuracy"


@pytest.mark.parametrize("divergence", ["sliced", "deepjdot"])
def test_resume_with_ot_gives_the_same_adapter(tmp_path: Path, divergence: str, interrupt_after, same_adapter) -> None:
    ot = {"divergence": divergence, "weight": 2.0, "warmup_steps": 2}
    opts = {"grad_accum": 2, "max_steps": 6}
    full = train(tiny(tmp_path / "full", ot, **opts))
    cfg = tiny(tmp_path / "cut", ot, **opts)
    cfg.run.checkpoint_every = 3
    torch.manual_seed(1234)  # resume must not depend on the global RNG
    interrupt_after(cfg, 5)
    torch.manual_seed(999)
    resumed = train(cfg, resume=True)
    same_adapter(full.adapter_last, resumed.adapter_last, rtol=1e-5)
    logged = lambda run: [r["ot_loss"] for r in run.history if r["kind"] == "train"]
    assert logged(resumed) == pytest.approx(logged(full), rel=1e-5)


def _spied_build(monkeypatch: pytest.MonkeyPatch, spy) -> None:
    """Make the loop build its task through ``spy(task)``."""
    real = loop.build_task
    monkeypatch.setattr(loop, "build_task", lambda cfg: spy(real(cfg)))


def test_without_ot_no_hook_is_registered(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def spy(task):
        inner = task.loss

        def loss(m: nn.Module, batch):
            calls.append(sum(len(mod._forward_hooks) for mod in m.modules()))
            return inner(m, batch)

        task.loss = loss
        return task

    _spied_build(monkeypatch, spy)
    monkeypatch.setattr(loop, "tap", lambda *a, **k: pytest.fail("tap used without ot"))
    train(tiny(tmp_path / "run"))  # a target domain but no ot: reported, never drawn
    assert calls == [0, 0, 0, 0]


def test_target_stream_never_reaches_the_loss_with_labels(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = {"loss": [], "forward": []}

    def spy(task):
        loss, forward = task.loss, task.forward
        train_ids = {id(x) for x, _ in task.train_set}
        assert all(isinstance(x, np.ndarray) for x in task.target_set)  # inputs only, no label beside them
        assert "labels" not in task.collate_inputs(list(task.target_set[:2]))

        def spy_loss(m, batch):
            seen["loss"].append(batch["labels"].shape[0])
            return loss(m, batch)

        def spy_forward(m, batch):
            seen["forward"].append(sorted(batch))
            return forward(m, batch)

        task.loss, task.forward = spy_loss, spy_forward
        task.train_ids = train_ids
        return task

    _spied_build(monkeypatch, spy)
    train(tiny(tmp_path / "run", {"divergence": "deepjdot"}))
    assert seen["loss"] == [8] * 4  # only source batches reach the loss
    # every target pass saw inputs only; eval passes (source and target) go through evaluate, not these
    assert seen["forward"][-4:] == [["pixels"]] * 4


def test_target_stream_is_a_pure_function_of_seed_and_step() -> None:
    items = list(range(10))
    stream = loop._TargetStream(items, batch_size=4, grad_accum=1, world=2, seed=3)
    assert stream.shards(1, 0) == stream.shards(1, 0)
    first = stream.shards(0, 0)[0] + stream.shards(0, 1)[0] + stream.shards(1, 0)[0] + stream.shards(1, 1)[0]
    assert sorted(first) == sorted(set(first)) and len(first) == 8  # one epoch of 2 steps: no repeats
    assert stream.shards(2, 0) != stream.shards(0, 0)  # the next epoch is reshuffled


@needs("fashion-mnist")
def test_fashion_splits_are_fixed_and_disjoint() -> None:
    train_idx, val_idx = fashion_mnist.source_split(60_000)
    assert len(val_idx) == fashion_mnist.SOURCE_VAL and not set(train_idx) & set(val_idx)
    assert len(train_idx) + len(val_idx) == 60_000
    adapt, held = fashion_mnist.target_split(10_000)
    assert len(adapt) == len(held) == 5000 and not set(adapt) & set(held)
    np.testing.assert_array_equal(fashion_mnist.target_split(10_000)[1], held)
