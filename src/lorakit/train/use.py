"""Use a finished run: evaluate or predict with its saved adapter on a fresh base model (or, for a full fine-tune,
its saved model)."""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit.formats import load
from lorakit.formats.safetensors_io import read_safetensors
from lorakit.inject import attach
from lorakit.train.config import load_config
from lorakit.train.loop import RunDirError
from lorakit.train.tasks import Task, build_task


def _load(run_dir: str | Path, which: str) -> Task:
    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir}: not a run directory (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", ["data.train_rows=1"])  # no need to read the training set
    task = build_task(cfg)
    if cfg.lora.full_finetune:  # the run saved the whole model, not an adapter
        state, _ = read_safetensors(run_dir / f"model-{which}.safetensors")
        task.model.load_state_dict(state)
    else:
        attach(task.model, load(run_dir / f"adapter-{which}.safetensors"))
    task.model.eval()
    return task


def evaluate_run(run_dir: str | Path, which: str = "best") -> dict[str, float]:
    """Metrics of a run's ``best`` or ``last`` adapter on the task's evaluation set."""
    task = _load(run_dir, which)
    with torch.no_grad():
        return task.evaluate(task.model, task.eval_set)


def predict(run_dir: str | Path, texts: list[str], which: str = "best") -> list:
    """Predictions of a run's adapter for ``texts`` (text classification: label ids)."""
    task = _load(run_dir, which)
    if task.predict is None:
        raise RunDirError(f"{run_dir}: this run's task has no text prediction")
    with torch.no_grad():
        return task.predict(task.model, texts)
