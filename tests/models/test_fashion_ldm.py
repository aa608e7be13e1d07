"""lorakit's own latent diffusion model: TAEF2 as a diffusers VAE, the SD-layout folder, and the diffusion task and
diffusers' pipeline running on it (MiniLM text encoder, TAEF2 latents)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.models import fashion_ldm
from lorakit.models.taef2 import load_taef2, taef2_weights_dir
from lorakit.models.taef2_vae import TAEF2Autoencoder, pretrained_taef2_vae
from lorakit.train import TrainConfig, train
from lorakit.train.tasks.diffusion import load_parts

pytestmark = pytest.mark.skipif(not (taef2_weights_dir() / "taef2_encoder.pth").is_file(),
                                reason=f"TAEF2 weights not found under {taef2_weights_dir()} (set LORAKIT_DATA)")


def test_taef2_vae_is_taef2_in_the_pipelines_pixel_range(tmp_path: Path) -> None:
    vae, taef2 = pretrained_taef2_vae(1.25), load_taef2()
    x = torch.rand(2, 3, 16, 24)
    with torch.no_grad():
        z = vae.encode(x * 2 - 1).latents
        assert torch.equal(z, taef2.encode(x))
        assert torch.equal(vae.decode(z).sample, taef2.decode(z) * 2 - 1)
        assert torch.equal(vae.decode(z, return_dict=False)[0], vae.decode(z).sample)
    vae.save_pretrained(tmp_path / "vae")
    again = TAEF2Autoencoder.from_pretrained(tmp_path / "vae")
    assert again.config.scaling_factor == 1.25 and len(again.config.block_out_channels) == 4
    assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), again.state_dict().values()))
    with pytest.raises(ValueError, match="32 latent channels"):
        TAEF2Autoencoder(latent_channels=4)


def test_captions_and_images() -> None:
    assert fashion_ldm.caption(1) == "a photo of a trouser"
    assert fashion_ldm.caption(9) == "a photo of an ankle boot"
    images, labels = fashion_ldm.base_images("test", per_class=2, classes=(0, 9))
    assert images.shape == (4, 3, 64, 64) and labels == [0, 0, 9, 9]
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert torch.equal(images[:, 0], images[:, 2])  # grey


@pytest.fixture(scope="module")
def ldm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fashion_ldm.write_model_folder(tmp_path_factory.mktemp("ldm") / "model", seed=0)


def test_the_folder_loads_as_a_stable_diffusion_model_and_in_diffusers_pipeline(ldm_folder: Path) -> None:
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    sd, tok, scheduler = load_parts(str(ldm_folder))
    assert type(sd.vae).__name__ == "TAEF2Autoencoder" and type(sd.text_encoder).__name__ == "BertModel"
    assert tok.model_max_length == fashion_ldm.MAX_TOKENS and scheduler.config.num_train_timesteps == 1000
    ids = tok(["a photo of a coat"], padding="max_length", max_length=tok.model_max_length,
              return_tensors="pt").input_ids
    with torch.no_grad():
        pred = sd(torch.randn(1, 32, 8, 8), torch.tensor([10]), ids)
    assert pred.shape == (1, 32, 8, 8)
    pipe = StableDiffusionPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=tok, unet=sd.unet,
                                   scheduler=DDIMScheduler.from_pretrained(ldm_folder, subfolder="scheduler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(["a photo of a coat"], num_inference_steps=2, height=64, width=64, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 3, 64, 64)


def test_the_diffusion_task_trains_a_lora_on_it(ldm_folder: Path, tmp_path: Path) -> None:
    images, labels = fashion_ldm.base_images("test", per_class=2, classes=(0, 1))
    data = fashion_ldm.write_image_folder(tmp_path / "data", images, [fashion_ldm.caption(c) for c in labels])
    assert sorted(p.name for p in (data / "1_images").iterdir())[:2] == ["00000.png", "00000.txt"]
    cfg = {"task": "diffusion", "model": {"name": str(ldm_folder)},
           "data": {"dataset": "image-folder", "path": str(data)},
           "lora": {"targets": [r"re:unet\..*attn2\.(to_k|to_v)"], "rank": 2, "alpha": 2},
           "diffusion": {"resolution": 64, "bucketing": False, "min_bucket_resolution": 64,
                         "max_bucket_resolution": 64},
           "optim": {"lr": 1e-2, "batch_size": 4, "max_steps": 3, "warmup_steps": 0},
           "run": {"out_dir": str(tmp_path / "run"), "seed": 0, "eval_every": 0, "log_every": 1}}
    result = train(TrainConfig.from_dict(cfg))
    adapter = lk.load(tmp_path / "run" / "adapter-last.safetensors")
    assert adapter.modules and all(p.startswith("unet.") and p.endswith(("to_k", "to_v")) for p in adapter.modules)
    assert result.final_metrics["eval_loss"] > 0
