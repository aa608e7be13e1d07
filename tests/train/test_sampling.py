"""Sample images during diffusion training (kohya prompt files), the validation loss in metrics and plot, and
``lorakit generate`` with strengths and block weights, on the tiny SD-1.5 pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.errors import LorakitError
from lorakit.train import loop, report, train
from lorakit.train.config import ConfigError, TrainConfig
from lorakit.train.sampling import (SAMPLERS, PromptFileError, SamplePrompt, generate, grid, parse_prompts,
                                    read_prompts, render, sampler_class, scheduler_config)

pytest.importorskip("diffusers")

runner = CliRunner()

PROMPTS = """# samples of the ink concept
ink, drawing of a cat --n blurry --s 2 --w 64 --h 64

a plain picture --s 3 --l 4 --d 7 --w 32 --h 48 --ss euler_a
ink, a house --s 2 --w 48 --h 32
"""


# -- the prompt file ------------------------------------------------------------------------------------------


def test_parse_reads_kohya_options_and_fills_defaults() -> None:
    got = parse_prompts(PROMPTS, "p.txt", steps=20, guidance=7.5, seed=10, width=512, height=256, sampler="auto")
    assert got == [
        SamplePrompt("ink, drawing of a cat", "blurry", 2, 7.5, 10, 64, 64, "auto"),
        SamplePrompt("a plain picture", "", 3, 4.0, 7, 32, 48, "euler_a"),
        # the seed follows the prompt's index (comments and blank lines do not count), not the line number
        SamplePrompt("ink, a house", "", 2, 7.5, 12, 48, 32, "auto"),
    ]
    # option letters are case-insensitive (kohya's re.IGNORECASE); a negative prompt runs to the next option
    (p,) = parse_prompts("a cat --N bad hands, lowres --W 16", "p.txt", width=8, height=8)
    assert (p.prompt, p.negative, p.width, p.height, p.steps, p.seed) == ("a cat", "bad hands, lowres", 16, 8, 20, 0)


@pytest.mark.parametrize("line, message", [
    ("a cat --x 3", "p.txt:2: option --x: unknown (known: --n, --s, --l, --d, --w, --h, --ss)"),
    ("a cat --w 60", "p.txt:2: option --w: expected a multiple of 8, >= 8 (pixels), got '60'"),
    ("a cat --s 0", "p.txt:2: option --s: expected an int >= 1, got '0'"),
    ("a cat --s two", "p.txt:2: option --s: expected an int >= 1, got 'two'"),
    ("a cat --l -1", "p.txt:2: option --l: expected a number >= 0, got '-1'"),
    ("a cat --l nan", "p.txt:2: option --l: expected a number >= 0, got 'nan'"),
    ("a cat --d -5", "p.txt:2: option --d: expected an int >= 0, got '-5'"),
    ("a cat --ss plms", "p.txt:2: option --ss: expected 'auto' or one of"),
    ("a cat --s 2 --s 3", "p.txt:2: option --s: given twice"),
    ("a cat --n", "p.txt:2: option --n: no value"),
    ("--w 64", "p.txt:2: no prompt text before the options"),
])
def test_a_bad_line_is_one_line_naming_file_line_and_option(line: str, message: str) -> None:
    with pytest.raises(PromptFileError) as e:
        parse_prompts(f"# first\n{line}\nfine --s 2\n", "p.txt")
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_every_bad_line_is_listed_and_an_empty_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(PromptFileError, match=r"^p.txt:1: option --q: unknown .*; p.txt:3: option --h: expected"):
        parse_prompts("a --q 1\nok\nb --h 7\n", "p.txt")
    with pytest.raises(PromptFileError, match="p.txt: no prompts"):
        parse_prompts("# only a comment\n\n", "p.txt")
    with pytest.raises(PromptFileError, match="cannot read the sample prompt file"):
        read_prompts(tmp_path / "missing.txt")


def test_grid_is_the_prompts_sizes_in_rows() -> None:
    from PIL import Image

    images = [Image.new("RGB", size, (i * 80, 0, 0)) for i, size in enumerate([(64, 64), (32, 48), (48, 32)])]
    g = grid(images)
    assert g.size == (128, 128)  # 2 columns × the widest, 2 rows × the tallest
    assert g.getpixel((64, 0)) == (80, 0, 0) and g.getpixel((64 + 32, 0)) == (0, 0, 0)  # the rest of a cell is black
    assert g.getpixel((47, 64 + 31)) == (160, 0, 0) and g.getpixel((48, 64)) == (0, 0, 0)


def test_sample_config_fields_are_checked() -> None:
    with pytest.raises(ConfigError, match="diffusion.sample_sampler"):
        TrainConfig.from_dict({"diffusion": {"sample_sampler": "plms"}})
    with pytest.raises(ConfigError, match="diffusion.sample_every"):
        TrainConfig.from_dict({"diffusion": {"sample_every": -1}})
    with pytest.raises(ConfigError, match="diffusion.sample_guidance"):
        TrainConfig.from_dict({"diffusion": {"sample_guidance": True}})


def test_auto_sampler_is_the_folders_class_or_ddim_for_ddpm() -> None:
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    assert sampler_class({"_class_name": "DDPMScheduler"}) is DDIMScheduler
    assert sampler_class({"_class_name": "EulerDiscreteScheduler"}) is EulerDiscreteScheduler
    assert sampler_class({"_class_name": "LCMScheduler"}) is DDIMScheduler  # not one of SAMPLERS
    assert sampler_class({"_class_name": "DDPMScheduler"}, "pndm") is PNDMScheduler


def test_every_sampler_renders_a_short_preview(tiny_sd: Path) -> None:
    from lorakit.train.tasks.diffusion import load_parts

    model, tok, _ = load_parts(str(tiny_sd))
    config = scheduler_config(str(tiny_sd))
    prompts = [SamplePrompt("ink", steps=2, width=32, height=24, sampler=name) for name in SAMPLERS]
    images = render(model.eval(), tok, prompts, config)
    assert [im.size for im in images] == [(32, 24)] * len(SAMPLERS)
    assert len({np.asarray(im).tobytes() for im in images}) > 1  # the samplers differ


# -- sampling during training ---------------------------------------------------------------------------------


def _png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_training_writes_sample_grids_and_trains_the_same_adapter(tiny_sd_config, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(PROMPTS, encoding="utf-8")
    sampled = train(tiny_sd_config(tmp_path / "sampled", run={"eval_every": 2},
                                   diffusion={"sample_prompts": str(prompts), "sample_every": 2}))
    plain = train(tiny_sd_config(tmp_path / "plain", run={"eval_every": 2}))
    # sampling changed nothing the run trained: bit-identical factors
    import lorakit as lk

    a, b = lk.load(sampled.adapter_last), lk.load(plain.adapter_last)
    assert a.modules.keys() == b.modules.keys()
    assert all(torch.equal(a.modules[p].A, b.modules[p].A) and torch.equal(a.modules[p].B, b.modules[p].B)
               for p in a.modules)
    assert sampled.final_metrics == plain.final_metrics

    samples = tmp_path / "sampled" / "samples"
    assert sorted(p.name for p in samples.glob("*.png")) == ["step-000002.png", "step-000004.png"]
    assert sampled.samples[0] == samples / "step-000002.png" and len(sampled.samples) == 8
    for step in ("step-000002", "step-000004"):
        assert _png(samples / f"{step}.png").shape == (128, 128, 3)  # grid of 64×64, 32×48 (w×h), 48×32
        sizes = [_png(samples / step / f"prompt-{i:02d}.png").shape[:2] for i in range(3)]
        assert sizes == [(64, 64), (48, 32), (32, 48)]  # (h, w)
    assert not (_png(samples / "step-000002.png") == _png(samples / "step-000004.png")).all()  # the adapter moved
    assert not (tmp_path / "plain" / "samples").exists()

    # the validation loss: in metrics.jsonl at every eval, and drawn in the plot's eval panel
    records = [json.loads(line) for line in (tmp_path / "sampled" / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_loss"]) for r in records if r["kind"] == "eval"]
    assert [s for s, _ in evals] == [0, 2, 4]
    assert evals[-1][1] == pytest.approx(sampled.final_metrics["eval_loss"])
    drawn = report.figure(records, sampled.metric).axes[1].lines[0].get_xydata()
    np.testing.assert_array_equal(drawn, np.array(evals))


def test_the_loop_restores_rng_and_train_mode_around_a_sample_hook(tiny_lm, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   same_adapter) -> None:
    plain = train(tiny_lm(tmp_path / "plain"))
    real_build, calls = loop.build_task, []

    def build_with_sampler(cfg):
        task = real_build(cfg)

        def sample(model, step, folder):
            # a hook that draws from the global RNG (dropout's stream in this run) must not shift the training
            calls.append((step, model.training, torch.is_grad_enabled(), float(torch.rand(()))))
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{step}.txt").write_text("x")
            return [folder / f"{step}.txt"]

        task.sample, task.sample_every = sample, 4
        return task

    monkeypatch.setattr(loop, "build_task", build_with_sampler)
    sampled = train(tiny_lm(tmp_path / "sampled"))
    assert [(s, training, grad) for s, training, grad, _ in calls] == [(4, False, False), (6, False, False)]
    assert sampled.samples == [tmp_path / "sampled/samples/4.txt", tmp_path / "sampled/samples/6.txt"]
    same_adapter(plain.adapter_last, sampled.adapter_last, rtol=0, atol=0)
    assert sampled.model.training  # back in train mode (dropout on)


# -- lorakit generate ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tiny_sd: Path, tmp_path_factory) -> Path:
    """A finished 4-step diffusion run on the tiny pipeline (attention LoRA on the UNet)."""
    from sd_tiny import build_images

    root = tmp_path_factory.mktemp("gen")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    raw = {"task": "diffusion", "model": {"name": str(tiny_sd)},
           "data": {"dataset": "image-folder", "path": str(build_images(root / "images"))},
           "lora": {"targets": [r"re:unet\..*(to_q|to_k|to_v|to_out\.0)"], "rank": 4, "alpha": 4},
           "optim": {"lr": 3e-2, "batch_size": 2, "max_steps": 4, "schedule": "constant"},
           "diffusion": {"resolution": 32, "min_bucket_resolution": 32, "max_bucket_resolution": 128,
                         "bucket_step": 16, "sample_steps": 2},
           "run": {"out_dir": str(root / "run"), "seed": 0, "log_every": 1, "eval_before": False, "device": "cpu"}}
    train(TrainConfig.from_dict(raw))
    torch.set_num_threads(before)
    return root / "run"


def _gen(run: Path, out: Path, **options) -> np.ndarray:
    return _png(generate(run, "ink, drawing of a cat", out, **options))


def test_generate_writes_a_png_and_strength_zero_is_the_base_model(tiny_run: Path, tmp_path: Path) -> None:
    base = _gen(tiny_run, tmp_path / "base.png", adapter=False)
    zero = _gen(tiny_run, tmp_path / "zero.png", strength=0.0)
    full = _gen(tiny_run, tmp_path / "full.png")
    assert full.shape == (32, 32, 3)  # the run's resolution
    np.testing.assert_array_equal(zero, base)
    assert not (full == base).all()
    assert _gen(tiny_run, tmp_path / "wide.png", width=48, height=32, steps=3, sampler="euler").shape == (32, 48, 3)


def test_generate_block_weights(tiny_run: Path, tmp_path: Path) -> None:
    full = _gen(tiny_run, tmp_path / "full.png")
    # OUTALL keeps the output blocks and zeroes IN/M00 (the tiny UNet has attention in IN01, M00, OUT03/OUT04)
    outall = _gen(tiny_run, tmp_path / "outall.png", blocks="OUTALL")
    assert not (outall == full).all()
    np.testing.assert_array_equal(_gen(tiny_run, tmp_path / "ones.png", blocks="ALL"), full)  # all 1: no change
    half = _gen(tiny_run, tmp_path / "half.png", strength=0.5)
    np.testing.assert_array_equal(_gen(tiny_run, tmp_path / "half-blocks.png", blocks="ALL0.5"), half)
    with pytest.raises(LorakitError, match="option '--blocks': LBW string 'OUTSIDE'"):
        _gen(tiny_run, tmp_path / "x.png", blocks="OUTSIDE")


def test_generate_cli_and_its_refusals(tiny_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli.png"
    res = runner.invoke(app, ["generate", str(tiny_run), "a cat", "--out", str(out), "--steps", "2", "--seed", "3",
                              "--strength", "0.8", "--blocks", "OUTALL", "--adapter", "last"])
    assert res.exit_code == 0, res.output
    lib = generate(tiny_run, "a cat", tmp_path / "lib.png", steps=2, seed=3, strength=0.8, blocks="OUTALL",
                   which="last")
    np.testing.assert_array_equal(_png(out), _png(lib))  # the verb is the library function
    res = runner.invoke(app, ["generate", str(tiny_run), "a cat", "--out", str(out), "--blocks", "NOPE"])
    assert res.exit_code == 1 and "NOPE" in res.output and len(res.output.strip().splitlines()) == 1
    res = runner.invoke(app, ["generate", str(tiny_run), "a cat", "--out", str(out), "--width", "30"])
    assert res.exit_code == 1 and "option '--width': expected a multiple of 8" in res.output
    empty = tmp_path / "empty-run"
    empty.mkdir()
    (empty / "config.yaml").write_text((tiny_run / "config.yaml").read_text())
    res = runner.invoke(app, ["generate", str(empty), "a cat", "--out", str(out)])
    assert res.exit_code == 1 and "no adapter-best.safetensors" in res.output and str(empty) in res.output


def test_two_process_ddp_samples_on_rank_0(tiny_sd_config, tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    import yaml

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ink, a cat --s 2 --w 32 --h 32\n", encoding="utf-8")
    cfg = tiny_sd_config(tmp_path / "two", run={"eval_before": False},
                         diffusion={"sample_prompts": str(prompts), "sample_every": 2})
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(cfg.to_dict()))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "lorakit.cli", "train", str(config), "--threads", "1"], check=False,
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("samples:") == 1  # one report, from rank 0
    samples = tmp_path / "two" / "samples"
    assert sorted(p.name for p in samples.glob("*.png")) == ["step-000002.png", "step-000004.png"]
    assert (tmp_path / "two" / "adapter-last.safetensors").is_file()  # rank 1 waited at the barrier, then went on
