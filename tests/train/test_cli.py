"""``lorakit train`` / ``eval`` / ``predict`` on tiny configs, and the error path (one line, exit code 1)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.models.hub import data_root

runner = CliRunner()


def test_train_then_eval_and_resume_flag(tiny_lm, tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_lm(tmp_path / "unused").to_dict()))
    run = tmp_path / "run"
    result = runner.invoke(app, ["train", str(config), "--set", f"run.out_dir={run}", "--set", "optim.max_steps=3",
                                 "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "adapter-best.safetensors" in result.output and "plot.png" in result.output
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["max_steps"] == 3
    result = runner.invoke(app, ["eval", str(run), "--which", "last"])
    assert result.exit_code == 0 and "eval_loss" in result.output
    # resuming a finished run continues with a raised step budget
    result = runner.invoke(app, ["train", "--resume", str(run), "--set", "optim.max_steps=4", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "4 steps" in result.output


def test_bad_config_is_one_line_exit_1(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("optim: {lr: 0}\n")
    proc = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", str(config)], check=False, capture_output=True,
                          text=True)
    assert proc.returncode == 1
    assert "optim.lr" in proc.stderr and "bad.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_zero_threads_is_one_line_exit_1(tiny_lm, tmp_path: Path) -> None:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny_lm(tmp_path / "run").to_dict()))
    proc = subprocess.run([sys.executable, "-m", "lorakit.cli", "train", str(config), "--threads", "0"], check=False,
                          capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "--threads" in proc.stderr and ">= 1" in proc.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(not (data_root() / "sst2").is_dir(), reason=f"{data_root() / 'sst2'} is absent")
def test_predict_with_a_tiny_text_classifier(tmp_path: Path) -> None:
    raw = {"task": "text-classification", "model": {"name": "tiny-bert"},
           "data": {"dataset": "sst2", "train_rows": 32, "eval_rows": 16, "max_length": 16},
           "lora": {"targets": ["query", "value"], "rank": 2, "train": ["classifier"]},
           "optim": {"batch_size": 8, "max_steps": 2}, "run": {"out_dir": str(tmp_path / "run"), "log_every": 1}}
    config = tmp_path / "tc.yaml"
    config.write_text(yaml.safe_dump(raw))
    assert runner.invoke(app, ["train", str(config), "--threads", "1"]).exit_code == 0
    result = runner.invoke(app, ["predict", "a gorgeous , witty film", "dull and lifeless", "--run",
                                 str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 2 and all(line.split()[0] in ("0", "1") for line in lines)
