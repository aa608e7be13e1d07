"""task diffusion on a tiny SD-1.5 pipeline: training, loss options, resume, kohya export loaded by diffusers."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.errors import LorakitError
from lorakit.formats import detect, kohya
from lorakit.train import train
from lorakit.train.diffusion_loss import denoising_loss, min_snr_weights, offset_noise, snr
from lorakit.train.loop import param_groups, prepare
from lorakit.train.tasks import build_task

pytest.importorskip("diffusers")


def test_a_few_steps_lower_the_loss(tiny_sd_config, tmp_path: Path) -> None:
    result = train(tiny_sd_config(tmp_path / "run", optim={"max_steps": 6}))
    assert result.base_metrics["eval_loss"] == pytest.approx(1.06171, abs=1e-4)
    assert result.final_metrics["eval_loss"] == pytest.approx(PINNED_FINAL, abs=1e-4)
    assert result.final_metrics["eval_loss"] < result.base_metrics["eval_loss"] - 0.01
    adapter = lk.load(result.adapter_last)
    assert all(p.startswith("unet.") and p.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0")
               for p in adapter.modules)
    assert len(adapter.modules) == 32  # 4 transformer blocks (down 1, mid 1, up 2) × (attn1, attn2) × (q, k, v, out)


PINNED_FINAL = 1.04629


def test_min_snr_weights_follow_the_formula() -> None:
    s = torch.tensor([0.5, 5.0, 20.0])
    torch.testing.assert_close(min_snr_weights(s, 5.0, "epsilon"), torch.tensor([1.0, 1.0, 0.25]))
    torch.testing.assert_close(min_snr_weights(s, 5.0, "v_prediction"), torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21]))
    pred, target = torch.zeros(3, 1, 2, 2), torch.arange(12.0).reshape(3, 1, 2, 2)
    # per-example MSE (3.5, 31.5, 91.5) weighted (1, 1, 0.25) then averaged
    assert float(denoising_loss(pred, target, min_snr_weights(s, 5.0, "epsilon"))) == pytest.approx(
        (3.5 + 31.5 + 91.5 * 0.25) / 3)
    assert float(denoising_loss(pred, target)) == pytest.approx((3.5 + 31.5 + 91.5) / 3)
    # a zero-terminal-SNR step: ε weight 1 (the limit, not 0/0 = NaN), v weight 0
    zero = torch.tensor([0.0, 2.0])
    torch.testing.assert_close(min_snr_weights(zero, 5.0, "epsilon"), torch.tensor([1.0, 1.0]))
    torch.testing.assert_close(min_snr_weights(zero, 5.0, "v_prediction"), torch.tensor([0.0, 2 / 3]))


def test_noise_offset_follows_the_formula() -> None:
    noise, extra = torch.zeros(2, 4, 2, 2), torch.arange(8.0).reshape(2, 4, 1, 1)
    out = offset_noise(noise, 0.1, extra)
    torch.testing.assert_close(out[1, 3], torch.full((2, 2), 0.7))  # one shift per example and channel
    assert offset_noise(noise, 0.0, extra) is noise


def test_loss_options_through_the_task(tiny_sd_config, tmp_path: Path) -> None:
    base = build_task(tiny_sd_config(tmp_path / "a"))
    snr_task = build_task(tiny_sd_config(tmp_path / "b", diffusion={"min_snr_gamma": 5.0}))
    offset_task = build_task(tiny_sd_config(tmp_path / "c", diffusion={"noise_offset": 0.1}))
    rows = [e for e in base.eval_set if e.bucket == (64, 64)]
    torch.manual_seed(0)
    batch = base.collate(rows)
    batch["timesteps"] = torch.tensor([20, 900])  # one high-SNR and one low-SNR step
    model = base.model.eval()
    alphas = _scheduler(tiny_sd_config, tmp_path).alphas_cumprod
    s = snr(alphas, batch["timesteps"])
    assert s.tolist() == pytest.approx(PINNED_SNR, rel=1e-4)
    with torch.no_grad():
        plain = base.loss(model, batch)
        weighted = snr_task.loss(model, batch)
        shifted = offset_task.loss(model, batch)
        # by hand: the scheduler's noising, the UNet's ε prediction, per-example MSE
        from diffusers import DDPMScheduler
        sched = _scheduler(tiny_sd_config, tmp_path)
        mse = []
        for noise in (batch["noise"], batch["noise"] + 0.1 * batch["offset"]):
            noisy = sched.add_noise(batch["latents"], noise, batch["timesteps"])
            pred = model(noisy, batch["timesteps"], batch["input_ids"])
            mse.append((pred - noise).pow(2).mean(dim=(1, 2, 3)))
    assert isinstance(sched, DDPMScheduler)
    torch.testing.assert_close(plain, mse[0].mean())
    torch.testing.assert_close(weighted, (mse[0] * torch.clamp(s, max=5.0) / s).mean())
    torch.testing.assert_close(shifted, mse[1].mean())
    assert [float(plain), float(weighted), float(shifted)] == pytest.approx(PINNED_LOSSES, abs=1e-5)


PINNED_SNR = [52.51686, 0.0143543]
PINNED_LOSSES = [1.133316, 0.680249, 1.139503]


def _scheduler(tiny_sd_config, tmp_path):
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_pretrained(tiny_sd_config(tmp_path / "x").model.name, subfolder="scheduler")


def test_text_encoder_gets_its_own_learning_rate_and_conv_its_own_rank(tiny_sd_config, tmp_path: Path) -> None:
    cfg = tiny_sd_config(tmp_path / "run", diffusion={"text_encoder_lr": 1e-4},
                         lora={"targets": ["re:unet\\..*(to_q|conv1)", "re:text_encoder\\..*q_proj"],
                               "ranks": {"conv1": 2}, "alphas": {"conv1": 1.0}})
    task, _ = prepare(cfg)
    groups = param_groups(task.model, cfg.optim.lr, 1.0, task.param_lrs)
    names = {id(p): n for n, p in task.model.named_parameters()}
    by_lr = {g["lr"]: sorted({names[id(p)].split(".")[0] for p in g["params"]}) for g in groups}
    assert by_lr == {1e-2: ["unet"], 1e-4: ["text_encoder"]}
    adapter = lk.extract(task.model)
    conv = [m for p, m in adapter.modules.items() if p.endswith("conv1")]
    assert conv and all(m.rank == 2 and m.alpha == 1.0 and m.kind == "conv2d" for m in conv)
    assert all(m.rank == 4 for p, m in adapter.modules.items() if not p.endswith("conv1"))
    tensors, _ = kohya.to_tensors(adapter)
    assert {k.split("_", 2)[1] for k in tensors} == {"unet", "te"}
    # kohya's spelling, under CLIP's ``text_model`` level, though transformers 5's CLIPTextModel has none
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in tensors


def test_resume_ends_equal_to_an_uninterrupted_run(tiny_sd_config, tmp_path: Path, interrupt_after,
                                                    same_adapter, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import AutoencoderKL

    opts = {"max_steps": 5}
    extra = {"caption_dropout": 0.3, "shuffle_captions": True, "noise_offset": 0.05, "min_snr_gamma": 5.0}
    full = train(tiny_sd_config(tmp_path / "full", optim=opts, diffusion=extra))
    cfg = tiny_sd_config(tmp_path / "cut", optim=opts, diffusion=extra, run={"checkpoint_every": 2})
    torch.manual_seed(1234)
    interrupt_after(cfg, 3)
    torch.manual_seed(999)
    calls = []
    real = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: calls.append(1) or real(self, x))
    resumed = train(cfg, resume=True)
    assert calls == []  # the resumed run reads the latents the first part cached
    same_adapter(full.adapter_last, resumed.adapter_last, rtol=1e-5)


def test_kohya_file_loads_in_diffusers_and_matches_attach(tiny_sd_config, tiny_sd: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    cfg = tiny_sd_config(tmp_path / "run", optim={"max_steps": 3, "lr": 5e-2},
                         lora={"targets": ["re:unet\\..*(to_q|to_k|to_v|to_out\\.0|conv1)"]})
    result = train(cfg)
    path = tmp_path / "lora_kohya.safetensors"
    detect.write(lk.load(result.adapter_last), path, "kohya")
    assert detect.detect(path) == "kohya"

    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(0)
    sample, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 16, generator=g)

    def run(unet):
        with torch.no_grad():
            return unet(sample, t, encoder_hidden_states=ctx).sample

    before = run(pipe.unet)
    ours = copy.deepcopy(pipe.unet)
    unet_adapter = lk.load(result.adapter_last)
    lk.attach(ours, lk.Adapter({p.removeprefix("unet."): m for p, m in unet_adapter.modules.items()},
                               base_model=unet_adapter.base_model))
    expected = run(ours)
    assert (expected - before).abs().max() > 1e-3  # the trained adapter does change the output
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(run(pipe.unet), expected, atol=1e-5, rtol=0)


def test_v_prediction_from_the_scheduler_config(tiny_sd_config, tiny_sd: Path, tmp_path: Path) -> None:
    import json
    import shutil

    folder = tmp_path / "sd-v"
    shutil.copytree(tiny_sd, folder)
    conf_path = folder / "scheduler" / "scheduler_config.json"
    conf = json.loads(conf_path.read_text())
    conf_path.write_text(json.dumps({**conf, "prediction_type": "v_prediction"}))
    task = build_task(tiny_sd_config(tmp_path / "run", model={"name": str(folder)},
                                     diffusion={"min_snr_gamma": 5.0}))
    rows = [e for e in task.eval_set if e.bucket == (64, 64)]
    torch.manual_seed(0)
    batch = task.collate(rows)
    sched = _scheduler(tiny_sd_config, tmp_path)
    with torch.no_grad():
        got = task.loss(task.model.eval(), batch)
        t = batch["timesteps"]
        noisy = sched.add_noise(batch["latents"], batch["noise"], t)
        pred = task.model(noisy, t, batch["input_ids"])
        v = sched.get_velocity(batch["latents"], batch["noise"], t)
        s = snr(sched.alphas_cumprod, t)
    weights = torch.clamp(s, max=5.0) / (s + 1)  # v-prediction's min-SNR weight
    torch.testing.assert_close(got, ((pred - v).pow(2).mean(dim=(1, 2, 3)) * weights).mean())
    conf_path.write_text(json.dumps({**conf, "prediction_type": "sample"}))
    with pytest.raises(LorakitError, match=r"sd-v/scheduler: prediction_type 'sample' is not one of"):
        build_task(tiny_sd_config(tmp_path / "run", model={"name": str(folder)}))


def test_bf16_and_gradient_checkpointing_train(tiny_sd_config, tmp_path: Path, same_adapter) -> None:
    lora = {"targets": [r"re:unet\..*(to_q|to_k|to_v|to_out\.0)", r"re:text_encoder\..*q_proj"]}
    plain = train(tiny_sd_config(tmp_path / "a", optim={"max_steps": 2}, lora=lora))
    ckpt = train(tiny_sd_config(tmp_path / "b", optim={"max_steps": 2}, lora=lora,
                                diffusion={"gradient_checkpointing": True}))
    assert ckpt.model.unet.is_gradient_checkpointing and ckpt.model.text_encoder.is_gradient_checkpointing
    assert any(p.startswith("text_encoder.") and float(m.B.abs().sum()) > 0
               for p, m in lk.load(ckpt.adapter_last).modules.items())  # gradients reach the text encoder
    # recomputation gives the same gradients, so the same adapter
    same_adapter(plain.adapter_last, ckpt.adapter_last, rtol=1e-5)
    bf16 = train(tiny_sd_config(tmp_path / "c", optim={"max_steps": 2}, lora=lora, run={"precision": "bf16"}))
    assert abs(bf16.final_metrics["eval_loss"] - plain.final_metrics["eval_loss"]) < 0.05
    assert bf16.final_metrics["eval_loss"] != plain.final_metrics["eval_loss"]  # autocast did run in bf16


def test_the_sd15_config_targets_an_sd_pipeline(tiny_sd: Path, sd_images: Path, tmp_path: Path) -> None:
    from sd_tiny import shipped_config_task

    loaded, task, kinds = shipped_config_task("sd15-lora.yaml", tiny_sd, sd_images, tmp_path / "r")
    assert loaded.model.name == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert kinds == {"unet:to_q", "unet:to_k", "unet:to_v", "unet:0", "unet:proj_in", "unet:proj_out", "unet:proj",
                     "unet:2", "text_encoder:q_proj", "text_encoder:k_proj", "text_encoder:v_proj",
                     "text_encoder:out_proj"}
    assert task.param_lrs == {"text_encoder.": 5e-5} and task.model.unet.is_gradient_checkpointing


def test_frozen_text_encoder_outputs_are_cached(tiny_sd_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                same_adapter) -> None:
    from transformers import CLIPTextModel

    rows = []
    real = CLIPTextModel.forward
    monkeypatch.setattr(CLIPTextModel, "forward", lambda self, ids, *a, **k: rows.append(len(ids)) or real(self, ids))
    opts = {"max_steps": 4}
    cached = train(tiny_sd_config(tmp_path / "a", optim=opts))
    assert sum(rows) == 5  # the five distinct captions, once each (base eval, 4 steps of 2, final eval)
    rows.clear()
    plain = train(tiny_sd_config(tmp_path / "b", optim=opts, diffusion={"cache_text_encoder_outputs": False}))
    assert sum(rows) == 5 + 4 * 2 + 5
    same_adapter(cached.adapter_last, plain.adapter_last, rtol=0, atol=0)  # caching changes nothing
    rows.clear()
    train(tiny_sd_config(tmp_path / "c", optim=opts, lora={"targets": ["re:text_encoder\\..*q_proj"]}))
    assert sum(rows) == 5 + 4 * 2 + 5  # a text encoder with an adapter is run at every step
