"""Two processes under torchrun or accelerate launch (DDP on gloo) end with the adapter of one process with the
same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import lorakit as lk
from lorakit.train import train
from lorakit.train.config import TrainConfig


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_process_ddp_equals_one_process(tiny_lm, tmp_path: Path, launcher: str, same_adapter) -> None:
    cfg = tiny_lm(tmp_path / "one", grad_accum=2)
    cfg.lora.dropout = 0.0  # each rank draws its own dropout masks; without dropout the runs must agree
    single = train(cfg)

    cfg.run.out_dir = str(tmp_path / "two")
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*LAUNCHERS[launcher], "-m", "lorakit.cli", "train", str(config), "--threads", "1"],
                          check=False, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("after training") == 1  # only rank 0 reports
    same_adapter(single.adapter_last, tmp_path / "two" / "adapter-last.safetensors", rtol=1e-4)


def test_two_process_ddp_with_domain_ot_equals_one_process_on_its_shards(tmp_path: Path, same_adapter) -> None:
    """With ``ot.pair: domain`` each process computes the OT term on its own source and target shards; the run equals
    one process whose micro-batches are those shards (half the batch, twice the accumulation), OT draws included."""
    raw = {"task": "fashion-mnist", "model": {"name": "fashion-cnn-scratch", "num_labels": 10},
           "data": {"dataset": "synthetic", "train_rows": 48, "eval_rows": 8,
                    "target": {"corruption": "invert", "rows": 24, "eval_rows": 8, "batch_size": 3}},
           "lora": {"targets": ["all-conv", "all-linear"], "rank": 2, "alpha": 4},
           "optim": {"lr": 1e-2, "batch_size": 4, "grad_accum": 4, "max_steps": 4, "warmup_steps": 0},
           "run": {"out_dir": str(tmp_path / "one"), "seed": 5, "log_every": 1, "eval_before": False},
           "ot": {"tap": "features", "divergence": "sliced", "pair": "domain", "weight": 1.0}}
    single = train(TrainConfig.from_dict(raw))

    raw["optim"].update(batch_size=8, grad_accum=2)
    raw["data"]["target"]["batch_size"] = 6
    raw["run"]["out_dir"] = str(tmp_path / "two")
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([*LAUNCHERS["torchrun"], "-m", "lorakit.cli", "train", str(config), "--threads", "1"],
                          check=False, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    same_adapter(single.adapter_last, tmp_path / "two" / "adapter-last.safetensors", rtol=1e-4)
    assert any(float(m.B.abs().max()) > 0 for m in lk.load(single.adapter_last).modules.values())  # B starts at zero: the runs trained
