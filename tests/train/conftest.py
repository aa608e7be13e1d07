"""Helpers for the training tests: tiny configs on tiny models, fast and seeded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorakit.train.config import TrainConfig

WORDS = ("the film is a quiet triumph of small gestures and the cast is wonderful but the plot drags in the middle "
         "and the ending feels rushed yet it stays with you long after the lights come up").split()


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the shared machine is busy; restore the count afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """A small deterministic text file for the causal-LM task."""
    lines = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(6 + i % 5)) for i in range(120)]
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def tiny_lm(corpus: Path):
    """A factory of tiny GPT-2 causal-LM configs: 32-token blocks, LoRA on every linear, dropout on (exercises
    the RNG), 6 steps of 4 blocks."""
    return lambda out_dir, **optim: tiny_lm_config(corpus, out_dir, **optim)


def tiny_lm_config(corpus: Path, out_dir: Path, **optim) -> TrainConfig:
    raw = {"task": "causal-lm", "model": {"name": "tiny-gpt2"},
           "data": {"dataset": "text-file", "path": str(corpus), "max_length": 32, "eval_rows": 4},
           "lora": {"targets": ["all-linear"], "rank": 4, "alpha": 8, "dropout": 0.1},
           "optim": {"lr": 5e-3, "batch_size": 4, "warmup_steps": 2, "max_steps": 6, **optim},
           "run": {"out_dir": str(out_dir), "seed": 3, "log_every": 1, "eval_before": False}}
    return TrainConfig.from_dict(raw)


class _Interrupt(Exception):
    pass


class _StopAt:
    """A reporter that interrupts the run after optimiser step ``at``."""

    def __init__(self, at: int) -> None:
        self.at = at

    def start(self, total_steps: int, start_step: int) -> None: ...
    def evaluated(self, step: int, metrics: dict) -> None: ...
    def end(self) -> None: ...

    def step(self, step: int, record: dict) -> None:
        if step == self.at:
            raise _Interrupt


@pytest.fixture
def interrupt_after():
    """``interrupt_after(cfg, step)`` trains ``cfg`` and stops it after ``step``, as a killed job would stop."""
    from lorakit.train import train

    def run(cfg: TrainConfig, step: int) -> None:
        with pytest.raises(_Interrupt):
            train(cfg, reporter=_StopAt(step))

    return run


def assert_same_adapter(file_a, file_b, rtol: float, atol: float = 1e-6) -> None:
    """The two saved adapters hold the same modules with factors equal to ``rtol`` / ``atol``."""
    import lorakit as lk

    a, b = lk.load(file_a), lk.load(file_b)
    assert a.modules.keys() == b.modules.keys()
    for path, m in a.modules.items():
        torch.testing.assert_close(b.modules[path].A, m.A, rtol=rtol, atol=atol, msg=path)
        torch.testing.assert_close(b.modules[path].B, m.B, rtol=rtol, atol=atol, msg=path)


@pytest.fixture
def same_adapter():
    """``same_adapter(file_a, file_b, rtol)``: :func:`assert_same_adapter` as a fixture."""
    return assert_same_adapter


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory) -> Path:
    """A tiny SD-1.5-layout diffusers folder (random weights, see :mod:`sd_tiny`), built once per session."""
    from sd_tiny import build_pipeline

    return build_pipeline(tmp_path_factory.mktemp("tiny-sd") / "sd")


@pytest.fixture
def sd_images(tmp_path: Path) -> Path:
    """Five tiny captioned PNGs in kohya folders ``2_ink/`` (four, three aspects) and ``1_plain/`` (one)."""
    from sd_tiny import build_images

    return build_images(tmp_path / "images")


@pytest.fixture
def tiny_sd_config(tiny_sd: Path, sd_images: Path):
    """``tiny_sd_config(out_dir, **sections)``: a diffusion config on the tiny pipeline (64 px, buckets of 16 px
    steps, attention LoRA on the UNet, 4 steps of batch 2); each keyword updates that section."""

    def make(out_dir: Path, **sections) -> TrainConfig:
        raw = {"task": "diffusion", "model": {"name": str(tiny_sd)},
               "data": {"dataset": "image-folder", "path": str(sd_images)},
               "lora": {"targets": [r"re:unet\..*(to_q|to_k|to_v|to_out\.0)"], "rank": 4, "alpha": 4},
               "optim": {"lr": 1e-2, "batch_size": 2, "max_steps": 4, "schedule": "constant"},
               "diffusion": {"resolution": 64, "min_bucket_resolution": 32, "max_bucket_resolution": 128,
                             "bucket_step": 16},
               "run": {"out_dir": str(out_dir), "seed": 0, "log_every": 1}}
        for name, values in sections.items():
            raw[name] = {**raw.get(name, {}), **values}
        return TrainConfig.from_dict(raw)

    return make


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    """A tiny SDXL-layout diffusers folder (random weights, see :func:`sd_tiny.build_sdxl_pipeline`), once per
    session."""
    from sd_tiny import build_sdxl_pipeline

    return build_sdxl_pipeline(tmp_path_factory.mktemp("tiny-sdxl") / "sdxl")


@pytest.fixture
def tiny_sdxl_config(tiny_sdxl: Path, tiny_sd_config):
    """``tiny_sdxl_config(out_dir, **sections)``: :func:`tiny_sd_config`'s run on the tiny SDXL pipeline."""
    return lambda out_dir, **sections: tiny_sd_config(out_dir, **{"model": {"name": str(tiny_sdxl)}, **sections})


def free_port() -> int:
    """A free TCP port on the loopback, for a one-process ``init_process_group``."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spy_ddp(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record the keyword arguments of every ``DistributedDataParallel`` the loop builds (the list it returns)."""
    from torch import nn

    wrapped: list[dict] = []
    real_ddp = nn.parallel.DistributedDataParallel

    def spy(module, **kwargs):
        wrapped.append(kwargs)
        return real_ddp(module, **kwargs)

    monkeypatch.setattr(nn.parallel, "DistributedDataParallel", spy)
    return wrapped
