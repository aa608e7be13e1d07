"""Two processes under torchrun or accelerate launch (DDP on gloo) end with the adapter of one process with the
same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import lorakit as lk
from lorakit.train import train


LAUNCHERS = {
    "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"],
    "accelerate": [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                   "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"],
}


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_two_process_ddp_equals_one_process(tiny_lm, tmp_path: Path, launcher: str) -> None:
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
    a, b = lk.load(single.adapter_last), lk.load(tmp_path / "two" / "adapter-last.safetensors")
    assert a.modules.keys() == b.modules.keys()
    for path, m in a.modules.items():
        torch.testing.assert_close(b.modules[path].A, m.A, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b.modules[path].B, m.B, rtol=1e-4, atol=1e-6)
