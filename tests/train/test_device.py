"""The run's device: resolution from ``run.device`` / ``LOCAL_RANK`` / CUDA availability, the model and every batch
moved to it, bf16 autocast on its type, and DDP with one process (gloo here; NCCL in ``tests/test_cuda.py``)."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch

from lorakit.train import loop
from lorakit.train.config import ConfigError, TrainConfig
from lorakit.train.device import resolve_device, to_device
from lorakit.train.distributed import backend
from tests.train.conftest import free_port, spy_ddp


def _cuda(monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """Pretend this machine has ``count`` CUDA devices (0: none)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_device_resolution_follows_local_rank_and_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    _cuda(monkeypatch, 2)
    rank1 = {"LOCAL_RANK": "1"}
    assert resolve_device("auto", rank1) == torch.device("cuda", 1)
    assert resolve_device("auto", {}) == torch.device("cuda", 0)
    assert resolve_device("cuda", rank1) == torch.device("cuda", 1)
    assert resolve_device("cuda:0", rank1) == torch.device("cuda", 0)
    assert resolve_device("cpu", rank1) == torch.device("cpu")
    with pytest.raises(ConfigError, match=r"'cuda:2'.*2 CUDA device"):
        resolve_device("cuda:2")
    with pytest.raises(ConfigError, match="LOCAL_RANK.*'x'"):
        resolve_device("auto", {"LOCAL_RANK": "x"})
    _cuda(monkeypatch, 0)
    assert resolve_device("auto", rank1) == torch.device("cpu")
    with pytest.raises(ConfigError, match="run.device.*CUDA is not available"):
        resolve_device("cuda", rank1)
    assert backend(torch.device("cuda", 0)) == "nccl" and backend(torch.device("cpu")) == "gloo"


@pytest.mark.parametrize("bad", ["gpu", "cuda:", "cuda:-1", "CPU", 0])
def test_config_refuses_an_unknown_device(bad) -> None:
    with pytest.raises(ConfigError, match="run.device"):
        TrainConfig.from_dict({"run": {"device": bad}})


def test_to_device_moves_every_tensor_of_a_nested_batch() -> None:
    point = collections.namedtuple("point", "x y")
    t = torch.ones(2)
    batch = {"a": t, "b": [t, (t, 3)], "c": "text", "d": point(t, None)}
    moved = to_device(batch, torch.device("meta"))
    assert moved["a"].is_meta and moved["b"][0].is_meta and moved["b"][1][0].is_meta and moved["d"].x.is_meta
    assert moved["b"][1][1] == 3 and moved["c"] == "text" and moved["d"].y is None
    assert isinstance(moved["b"][1], tuple) and isinstance(moved["d"], point)
    assert batch["a"].device.type == "cpu"  # the caller's batch is untouched


def _domain_ot_config(out_dir: Path) -> TrainConfig:
    return TrainConfig.from_dict({
        "task": "fashion-mnist", "model": {"name": "fashion-cnn-scratch", "num_labels": 10},
        "data": {"dataset": "synthetic", "train_rows": 24, "eval_rows": 8,
                 "target": {"corruption": "invert", "rows": 12, "eval_rows": 8, "batch_size": 3}},
        "lora": {"targets": ["all-conv", "all-linear"], "rank": 2},
        "optim": {"batch_size": 4, "grad_accum": 2, "max_steps": 2},
        "run": {"out_dir": str(out_dir), "log_every": 1, "eval_before": False, "device": "cpu"},
        "ot": {"tap": "features", "divergence": "sliced", "pair": "domain"}})


def test_loop_moves_the_model_and_every_batch_to_the_run_device(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    moved_batches: list[tuple[torch.device, tuple[str, ...]]] = []
    model_moves: list[torch.device] = []
    real_to_device, real_build = loop.to_device, loop.build_task

    def spy_to_device(batch, device):
        moved_batches.append((device, tuple(sorted(batch))))
        return real_to_device(batch, device)

    def build(cfg):
        task = real_build(cfg)
        real_to = task.model.to
        task.model.to = lambda *a, **k: model_moves.append(torch.device(a[0])) or real_to(*a, **k)
        return task

    monkeypatch.setattr(loop, "to_device", spy_to_device)
    monkeypatch.setattr(loop, "build_task", build)
    _cuda(monkeypatch, 1)  # a GPU machine: run.device "cpu" must still keep everything on the CPU
    result = loop.train(_domain_ot_config(tmp_path / "run"))
    assert model_moves == [torch.device("cpu")]
    # 2 steps x 2 micro-batches, each a labelled source batch and an unlabelled target batch
    assert moved_batches == [(torch.device("cpu"), ("labels", "pixels")), (torch.device("cpu"), ("pixels",))] * 4
    assert all(p.device.type == "cpu" for p in result.model.parameters())


def test_bf16_runs_bf16_on_the_cpu_even_on_a_gpu_machine(tiny_lm, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The old loop autocast for "cuda" whenever CUDA was available, while computing on the CPU: silently fp32."""
    seen: list[torch.dtype] = []
    real_build = loop.build_task

    def build(cfg):
        task = real_build(cfg)
        task.model.lm_head.register_forward_hook(lambda m, args, out: seen.append(out.dtype))
        return task

    monkeypatch.setattr(loop, "build_task", build)
    _cuda(monkeypatch, 1)
    cfg = tiny_lm(tmp_path / "run", max_steps=2)
    cfg.run.precision, cfg.run.device = "bf16", "cpu"
    loop.train(cfg)
    assert len(seen) == 2 + 1 and set(seen) == {torch.bfloat16}  # two training forwards and the final eval
    seen.clear()
    cfg = tiny_lm(tmp_path / "fp32", max_steps=2)
    cfg.run.device = "cpu"
    loop.train(cfg)
    assert set(seen) == {torch.float32}


def test_one_process_group_wraps_the_model_in_ddp(tiny_lm, tmp_path: Path, same_adapter,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """A process group of one (as ``torchrun --nproc_per_node=1`` or a caller sets up) still runs through DDP and
    its all-reduce, and ends with the single-process adapter."""
    import torch.distributed as dist

    single = loop.train(tiny_lm(tmp_path / "single"))
    wrapped = spy_ddp(monkeypatch)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        ddp = loop.train(tiny_lm(tmp_path / "ddp"))
    finally:
        dist.destroy_process_group()
    assert wrapped == [{"device_ids": None}]
    same_adapter(single.adapter_last, ddp.adapter_last, rtol=1e-5)
