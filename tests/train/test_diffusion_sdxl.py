"""task diffusion on a tiny SDXL pipeline: conditioning equal to diffusers' StableDiffusionXLPipeline, time ids
from each image's size and crop, two text encoders (adapters, learning rate, caching, checkpointing), resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import lorakit as lk
from lorakit.errors import LorakitError
from lorakit.train import train
from lorakit.train.diffusion_data import fit_to_bucket
from lorakit.train.loop import param_groups, prepare
from lorakit.train.tasks import build_task
from lorakit.train.tasks.diffusion import StableDiffusionXL

pytest.importorskip("diffusers")

#: LoRA on the UNet's attention and on both text encoders' query projections.
ALL_PARTS = {"targets": [r"re:unet\..*(to_q|to_k|to_v|to_out\.0)", r"re:text_encoder(_2)?\..*q_proj"]}


def _pipeline(folder: Path):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(str(folder), add_watermarker=False)


def test_a_few_steps_lower_the_loss(tiny_sdxl_config, tmp_path: Path) -> None:
    result = train(tiny_sdxl_config(tmp_path / "run", optim={"max_steps": 6}))
    assert isinstance(result.model, StableDiffusionXL)
    assert result.base_metrics["eval_loss"] == pytest.approx(PINNED_BASE, abs=1e-4)
    assert result.final_metrics["eval_loss"] == pytest.approx(PINNED_FINAL, abs=1e-4)
    assert result.final_metrics["eval_loss"] < result.base_metrics["eval_loss"] - 0.01
    adapter = lk.load(result.adapter_last)
    # 4 transformer blocks (down 1, mid 1, up 2) × (attn1, attn2) × (q, k, v, out)
    assert len(adapter.modules) == 32 and all(p.startswith("unet.") for p in adapter.modules)


PINNED_BASE = 1.09562
PINNED_FINAL = 1.08004


def test_time_ids_are_each_images_original_size_and_crop(tiny_sdxl_config, sd_images: Path, tmp_path: Path) -> None:
    from PIL import Image

    cfg = tiny_sdxl_config(tmp_path / "run")
    task = build_task(cfg)
    by_name = {e.path.name: e for e in task.eval_set}
    torch.manual_seed(0)
    batch = task.collate([by_name["img1.png"], by_name["img3.png"]])  # 96×64 and 128×80, both in bucket 80×48
    # (original h, w, crop top, left, target h, w): 96×64 → 80×53, top (53 - 48) // 2; 128×80 → 80×50, top 1
    assert batch["time_ids"].tolist() == [[64, 96, 2, 0, 48, 80], [80, 128, 1, 0, 48, 80]]
    tall = task.collate([by_name["img2.png"]])  # 64×96 → 53×80 in bucket 48×80: the crop is on the left
    assert tall["time_ids"].tolist() == [[96, 64, 0, 2, 80, 48]]
    # the recorded crop is where fit_to_bucket really cut: resize by hand, crop at the recorded offset
    with Image.open(sd_images / "2_ink" / "img1.png") as im:
        pixels = fit_to_bucket(im, (80, 48))
        by_hand = im.convert("RGB").resize((80, 53), Image.BICUBIC).crop((0, 2, 80, 50))
    expected = torch.from_numpy(np.asarray(by_hand, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    torch.testing.assert_close(pixels, expected)
    # a second build reads the cached latents and gets the same geometry
    again = {e.path.name: e for e in build_task(cfg).eval_set}
    assert [(e.original_size, e.crop_top_left) for e in again.values()] == [
        (by_name[n].original_size, by_name[n].crop_top_left) for n in again]


def test_prediction_equals_diffusers_sdxl_pipeline(tiny_sdxl, tiny_sdxl_config, tmp_path: Path) -> None:
    task = build_task(tiny_sdxl_config(tmp_path / "run"))
    model = task.model.eval()
    pipe = _pipeline(tiny_sdxl)
    by_name = {e.path.name: e for e in task.eval_set}
    rows = [by_name["img1.png"], by_name["img3.png"]]  # one bucket, two captions, two original sizes and crops
    torch.manual_seed(0)
    batch = task.collate(rows)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt([e.caption for e in rows], device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        context, ours_pooled = model.encode_text(batch["input_ids"], batch["input_ids_2"])
        torch.testing.assert_close(context, embeds, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours_pooled, pooled, atol=1e-6, rtol=0)
        time_ids = torch.cat([pipe._get_add_time_ids(e.original_size, e.crop_top_left, (48, 80), torch.float32,
                                                     pipe.text_encoder_2.config.projection_dim) for e in rows])
        g = torch.Generator().manual_seed(0)
        noisy, t = torch.randn(2, 4, 6, 10, generator=g), torch.tensor([10, 700])
        expected = pipe.unet(noisy, t, encoder_hidden_states=embeds,
                             added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        got = model(noisy, t, **{k: batch[k] for k in model.INPUTS})
        # the time ids matter: the same inputs at another original size predict otherwise
        other = model(noisy, t, batch["input_ids"], batch["input_ids_2"], batch["time_ids"] * 2)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    assert (other - got).abs().max() > 1e-5


def test_both_text_encoders_get_their_rate_and_checkpointing(tiny_sdxl_config, tmp_path: Path,
                                                             same_adapter) -> None:
    cfg = tiny_sdxl_config(tmp_path / "run", lora=ALL_PARTS,
                           diffusion={"text_encoder_lr": 1e-4, "gradient_checkpointing": True})
    task, _ = prepare(cfg)
    assert task.param_lrs == {"text_encoder.": 1e-4, "text_encoder_2.": 1e-4}
    groups = param_groups(task.model, cfg.optim.lr, 1.0, task.param_lrs)
    names = {id(p): n for n, p in task.model.named_parameters()}
    by_lr = {g["lr"]: sorted({names[id(p)].split(".")[0] for p in g["params"]}) for g in groups}
    assert by_lr == {1e-2: ["unet"], 1e-4: ["text_encoder", "text_encoder_2"]}
    m = task.model
    assert m.unet.is_gradient_checkpointing
    assert m.text_encoder.is_activation_checkpointing and m.text_encoder_2.is_activation_checkpointing
    # recomputation through both encoders' hidden states gives the same gradients, so the same adapter
    plain = train(tiny_sdxl_config(tmp_path / "a", optim={"max_steps": 2}, lora=ALL_PARTS))
    ckpt = train(tiny_sdxl_config(tmp_path / "b", optim={"max_steps": 2}, lora=ALL_PARTS,
                                  diffusion={"gradient_checkpointing": True}))
    same_adapter(plain.adapter_last, ckpt.adapter_last, rtol=1e-5)


def test_lora_on_unet_and_both_text_encoders_resumes_exactly(tiny_sdxl_config, tmp_path: Path, interrupt_after,
                                                              same_adapter) -> None:
    opts = {"max_steps": 5}
    extra = {"caption_dropout": 0.3, "shuffle_captions": True, "noise_offset": 0.05, "text_encoder_lr": 5e-3}
    full = train(tiny_sdxl_config(tmp_path / "full", optim=opts, lora=ALL_PARTS, diffusion=extra))
    trained = lk.load(full.adapter_last).modules
    for part in ("unet.", "text_encoder.", "text_encoder_2."):  # gradients reach all three
        assert any(p.startswith(part) and float(m.B.abs().sum()) > 0 for p, m in trained.items()), part
    cfg = tiny_sdxl_config(tmp_path / "cut", optim=opts, lora=ALL_PARTS, diffusion=extra,
                           run={"checkpoint_every": 2})
    torch.manual_seed(1234)
    interrupt_after(cfg, 3)
    torch.manual_seed(999)
    resumed = train(cfg, resume=True)
    same_adapter(full.adapter_last, resumed.adapter_last, rtol=1e-5)


def test_frozen_text_encoders_outputs_are_cached(tiny_sdxl_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 same_adapter) -> None:
    rows = []
    real = StableDiffusionXL.encode_text
    monkeypatch.setattr(StableDiffusionXL, "encode_text",
                        lambda self, ids, ids_2: rows.append(len(ids)) or real(self, ids, ids_2))
    opts = {"max_steps": 4}
    cached = train(tiny_sdxl_config(tmp_path / "a", optim=opts))
    assert sum(rows) == 5  # the five distinct captions once each, context and pooled together
    rows.clear()
    plain = train(tiny_sdxl_config(tmp_path / "b", optim=opts, diffusion={"cache_text_encoder_outputs": False}))
    assert sum(rows) == 5 + 4 * 2 + 5
    same_adapter(cached.adapter_last, plain.adapter_last, rtol=0, atol=0)  # caching changes nothing
    rows.clear()
    train(tiny_sdxl_config(tmp_path / "c", optim=opts, lora={"targets": [r"re:text_encoder_2\..*q_proj"]}))
    assert sum(rows) == 5 + 4 * 2 + 5  # an adapter on the second encoder alone turns the cache off


def test_an_sdxl_folder_without_its_second_encoder_is_refused(tiny_sdxl: Path, tiny_sdxl_config,
                                                              tmp_path: Path) -> None:
    folder = tmp_path / "sdxl"
    shutil.copytree(tiny_sdxl, folder)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(LorakitError, match=r"sdxl: an SDXL folder \(unet addition_embed_type 'text_time'\) lacks "
                                           r"text_encoder_2/$"):
        build_task(tiny_sdxl_config(tmp_path / "run", model={"name": str(folder)}))
    shutil.copytree(tiny_sdxl / "text_encoder_2", folder / "text_encoder_2")
    conf_path = folder / "text_encoder_2" / "config.json"
    conf_path.write_text(json.dumps({**json.loads(conf_path.read_text()), "architectures": ["CLIPTextModel"]}))
    with pytest.raises(LorakitError, match=r"text_encoder_2/config.json: architectures 'CLIPTextModel' is not one of "
                                           r"\['CLIPTextModelWithProjection'\]"):
        build_task(tiny_sdxl_config(tmp_path / "run", model={"name": str(folder)}))


def test_the_sdxl_config_targets_an_sdxl_pipeline(tiny_sdxl: Path, sd_images: Path, tmp_path: Path) -> None:
    from sd_tiny import shipped_config_task

    loaded, task, kinds = shipped_config_task("sdxl-lora.yaml", tiny_sdxl, sd_images, tmp_path / "r")
    assert loaded.model.name == "stabilityai/stable-diffusion-xl-base-1.0" and loaded.diffusion.resolution == 1024
    assert kinds == {"unet:to_q", "unet:to_k", "unet:to_v", "unet:0", "unet:proj_in", "unet:proj_out", "unet:proj",
                     "unet:2", "text_encoder:q_proj", "text_encoder:k_proj", "text_encoder:v_proj",
                     "text_encoder:out_proj", "text_encoder_2:q_proj", "text_encoder_2:k_proj",
                     "text_encoder_2:v_proj", "text_encoder_2:out_proj"}
    assert task.param_lrs == {"text_encoder.": 1e-5, "text_encoder_2.": 1e-5}
    assert task.model.unet.is_gradient_checkpointing


def test_kohya_file_loads_in_diffusers_sdxl_and_matches_attach(tiny_sdxl_config, tiny_sdxl: Path,
                                                               tmp_path: Path) -> None:
    import copy

    from lorakit.formats import detect, kohya

    cfg = tiny_sdxl_config(tmp_path / "run", optim={"max_steps": 3, "lr": 5e-2},
                           lora={"targets": [r"re:unet\..*(to_q|to_k|to_v|to_out\.0|conv1)",
                                             r"re:text_encoder(_2)?\..*self_attn\.(q_proj|k_proj|v_proj|out_proj)"]})
    result = train(cfg)
    adapter = lk.load(result.adapter_last)
    path = tmp_path / "lora_kohya.safetensors"
    detect.write(adapter, path, "kohya")
    assert detect.detect(path) == "kohya"
    assert {k.split("_", 2)[1] for k in kohya.to_tensors(adapter)[0]} == {"unet", "te1", "te2"}

    pipe = _pipeline(tiny_sdxl)
    g = torch.Generator().manual_seed(0)
    sample, t = torch.randn(2, 4, 6, 10, generator=g), torch.tensor([10, 500])
    cond = {"encoder_hidden_states": torch.randn(2, 5, 32, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(2, 16, generator=g),
                                  "time_ids": torch.tensor([[64.0, 96, 2, 0, 48, 80], [80, 128, 1, 0, 48, 80]])}}

    def run(unet):
        with torch.no_grad():
            return unet(sample, t, **cond).sample

    before = run(pipe.unet)
    ours = copy.deepcopy(pipe.unet)
    lk.attach(ours, lk.Adapter({p.removeprefix("unet."): m for p, m in adapter.modules.items()
                                if p.startswith("unet.")}, base_model=adapter.base_model))
    expected = run(ours)
    assert (expected - before).abs().max() > 1e-3  # the trained adapter does change the output
    pipe.load_lora_weights(str(path))
    torch.testing.assert_close(run(pipe.unet), expected, atol=1e-5, rtol=0)
    # the lora_te1_ / lora_te2_ parts land on diffusers' two text encoders: its prompt embeddings are the trained
    # model's (attention projections on both encoders, as configs/sdxl-lora.yaml targets them)
    prompts = ["ink, drawing 1, duotone", "a plain picture"]
    ids = [tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids for tok in (pipe.tokenizer, pipe.tokenizer_2)]
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        trained = result.model.eval().encode_text(*ids)
        plain = _pipeline(tiny_sdxl).encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                                                   do_classifier_free_guidance=False)
    assert (plain[0] - embeds).abs().max() > 1e-3 and (plain[2] - pooled).abs().max() > 1e-3
    torch.testing.assert_close(embeds, trained[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(pooled, trained[1], atol=1e-5, rtol=0)
