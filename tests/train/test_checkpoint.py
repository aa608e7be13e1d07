"""Checkpoints: fully trained modules' buffers (BatchNorm statistics) survive a resume, a kill (SIGKILL) at any point
leaves a folder that resumes or restarts, and a full fine-tune writes the whole model."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lorakit.errors import FileFormatError
from lorakit.models.resnet_cifar import ResNetCifar
from lorakit.train import evaluate_run
from lorakit.train.checkpoint import latest_checkpoint
from lorakit.train.config import TrainConfig
from lorakit.train.loop import train

LORA = {"adapter + trained batch norm": {"targets": ["all-conv"], "rank": 2, "train": ["linear", "bn1"]},
        "head and batch norm only": {"targets": [], "train": ["linear", "bn1"]},
        "full fine-tune": {"targets": [], "full_finetune": True}}


def _image_config(out_dir: Path, lora: dict) -> TrainConfig:
    return TrainConfig.from_dict({
        "task": "image-classification", "model": {"name": "tiny-resnet", "num_labels": 10},
        "data": {"dataset": "synthetic", "train_rows": 32, "eval_rows": 8}, "lora": dict(lora),
        "optim": {"batch_size": 8, "max_steps": 4, "lr": 1e-2},
        "run": {"out_dir": str(out_dir), "log_every": 1, "eval_before": False, "checkpoint_every": 2}})


@pytest.mark.parametrize("lora", list(LORA))
def test_resume_keeps_running_statistics_of_trained_batch_norm(tmp_path: Path, lora: str, interrupt_after) -> None:
    full = train(_image_config(tmp_path / "full", LORA[lora]))
    cfg = _image_config(tmp_path / "cut", LORA[lora])
    interrupt_after(cfg, 3)
    resumed = train(cfg, resume=True)
    stats = {n: b for n, b in full.model.named_buffers() if "running" in n}
    # frozen batch norm keeps its statistics; the trained ones (bn1 at least) move and must be restored on resume
    moved = [n for n, b in stats.items() if not torch.equal(b, ResNetCifar(blocks_per_stage=1).get_buffer(n))]
    assert "bn1.running_mean" in moved
    for n, b in resumed.model.named_buffers():
        torch.testing.assert_close(b, dict(full.model.named_buffers())[n], rtol=1e-5, atol=1e-6, msg=n)
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    full.model.eval(), resumed.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(resumed.model(x), full.model(x), rtol=1e-5, atol=1e-6)
    assert resumed.final_metrics == pytest.approx(full.final_metrics, rel=1e-6)


def test_full_finetune_writes_the_whole_model(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cfg = _image_config(tmp_path / "run", LORA["full fine-tune"])
    cfg.run.eval_every = 2
    result = train(cfg)
    run = tmp_path / "run"
    assert result.model_last == run / "model-last.safetensors" and result.model_best == run / "model-best.safetensors"
    assert result.adapter_last is None and not list(run.glob("adapter-*"))
    saved = load_file(result.model_last)
    state = result.model.state_dict()
    assert saved.keys() == state.keys()  # buffers (BatchNorm statistics) included
    for k, t in state.items():
        assert torch.equal(saved[k], t), k
    fresh = ResNetCifar(blocks_per_stage=1)
    fresh.load_state_dict(load_file(result.model_best))
    assert evaluate_run(run, "last") == pytest.approx(result.final_metrics, rel=1e-6)
    assert evaluate_run(run, "best") == pytest.approx({k: v for k, v in result.best_metrics.items() if k != "step"},
                                                       rel=1e-6)


#: Trains the config at argv[1], SIGKILLing itself on call number argv[3] of lorakit.train.checkpoint's argv[2]
#: (for ``atomic_write``: after the temp file was written, before it is moved into place).
KILLER = """
import os, signal, sys, yaml
from lorakit.train import TrainConfig, checkpoint, train
cfg = TrainConfig.from_dict(yaml.safe_load(open(sys.argv[1])))
name, nth, calls = sys.argv[2], int(sys.argv[3]), []
real = getattr(checkpoint, name)
def die():
    os.kill(os.getpid(), signal.SIGKILL)
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == nth and name == "atomic_write":
        path, write = args
        return real(path, lambda tmp: (write(tmp), die()))
    if len(calls) == nth:
        die()
    return real(*args, **kwargs)
setattr(checkpoint, name, dying)
train(cfg)
"""

#: kill point → (call, checkpoint step left in force). Each checkpoint writes three safetensors files, then two
#: JSON files (the folder's state.json, then the pointer).
KILLS = {"inside the first checkpoint, between its files": ("write_safetensors", 2, None),
         "writing the first pointer": ("atomic_write", 2, None),
         "writing the second pointer": ("atomic_write", 4, 2)}


def _kill(cfg: TrainConfig, tmp_path: Path, name: str, nth: int) -> None:
    config = tmp_path / "killed.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(config), name, str(nth)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]


@pytest.mark.parametrize("point", list(KILLS))
def test_a_killed_run_resumes_or_restarts(tiny_lm, tmp_path: Path, point: str, same_adapter) -> None:
    name, nth, in_force = KILLS[point]
    full = train(_every(tiny_lm(tmp_path / "full"), 2))
    cfg = _every(tiny_lm(tmp_path / "killed"), 2)
    _kill(cfg, tmp_path, name, nth)
    run = tmp_path / "killed"
    ckpt = latest_checkpoint(run)
    assert (ckpt is None) if in_force is None else (json.loads((ckpt / "state.json").read_text())["step"] == in_force)
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if p.name != "latest.json" and p != ckpt]
    assert leftovers, "the kill left nothing behind: the test does not exercise the clean-up"
    if in_force is None:  # nothing to continue: a fresh run may take the folder too
        shutil.copytree(run, tmp_path / "fresh")
        fresh_cfg = _every(tiny_lm(tmp_path / "fresh"), 2)
        same_adapter(full.adapter_last, train(fresh_cfg).adapter_last, rtol=1e-5)
    resumed = train(cfg, resume=True)
    same_adapter(full.adapter_last, resumed.adapter_last, rtol=1e-5)
    # the kill's leftovers are gone: temp files, temp folders, folders no pointer names
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.json", "step-0000006"]
    assert not [p for p in run.rglob(".*") if p.name.endswith(".tmp") or p.name.startswith(".lorakit-tmp.")]
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]


def _every(cfg: TrainConfig, steps: int) -> TrainConfig:
    cfg.run.checkpoint_every = steps
    return cfg


def test_resume_where_no_run_started_is_refused(tiny_lm, tmp_path: Path) -> None:
    from lorakit.train.loop import RunDirError

    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    with pytest.raises(RunDirError, match="nothing to resume.*no config.yaml"):
        train(tiny_lm(tmp_path / "empty"), resume=True)


def test_checkpoint_folders_keep_the_usual_mode(tiny_lm, tmp_path: Path) -> None:
    train(tiny_lm(tmp_path / "run", max_steps=2))
    umask = os.umask(0)
    os.umask(umask)
    folder = latest_checkpoint(tmp_path / "run")
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask


def test_each_rank_restores_its_own_rng_state(tmp_path: Path) -> None:
    from lorakit.errors import FileFormatError
    from lorakit.inject import inject
    from lorakit.train.checkpoint import load_checkpoint, rng_state, save_checkpoint, trained_state

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    inject(model, ["0"], rank=2, seed=0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(torch.ones(1, 4)).sum().backward()
    opt.step()
    states = []
    for seed in (1, 2):  # two ranks, two different streams
        torch.manual_seed(seed)
        states.append(rng_state(torch.device("cpu")))
    folder = save_checkpoint(tmp_path, 1, trained_state(model), opt, states, {})
    torch.manual_seed(99)
    load_checkpoint(folder, model, opt, rank=1)
    assert torch.equal(torch.get_rng_state(), states[1]["torch"])
    load_checkpoint(folder, model, opt, rank=0)
    assert torch.equal(torch.get_rng_state(), states[0]["torch"])
    with pytest.raises(FileFormatError, match="torch.rank2.*saved by 2 process"):
        load_checkpoint(folder, model, opt, rank=2)


@pytest.mark.parametrize("text", ['{"step": 3, "folder": "../../etc"}', '{"step": "3", "folder": "step-0000003"}',
                                  "[" * 100_000, '{"step": 3}'])
def test_a_malformed_pointer_is_a_clean_error(tmp_path: Path, text: str) -> None:
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest.json").write_text(text)
    with pytest.raises(FileFormatError, match="checkpoint pointer"):
        latest_checkpoint(tmp_path)


def test_malformed_metrics_lines_are_a_clean_error(tmp_path: Path) -> None:
    from lorakit.train.report import read_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n[1, 2]\n')
    with pytest.raises(FileFormatError, match="metrics line 2"):
        read_metrics(path)
    path.write_bytes(b'{"step": 1}\n\xff\n')
    with pytest.raises(FileFormatError, match="UTF-8"):
        read_metrics(path)
