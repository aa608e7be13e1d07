"""A small text-conditional latent diffusion model that lorakit pretrains itself: the offline stand-in for Stable
Diffusion in the diffusion-LoRA demonstration.

It has the Stable Diffusion folder layout and diffusers' classes, so ``task: diffusion``, diffusers' own
``StableDiffusionPipeline`` and every LoRA file dialect treat it as they treat SD-1.5:

* ``vae/``: the real pretrained TAEF2 autoencoder (FLUX.2 latent space, 32 channels at 1/8 resolution) as a
  :class:`~lorakit.models.taef2_vae.TAEF2Autoencoder`; frozen.
* ``text_encoder/`` + ``tokenizer/``: the real pretrained MiniLM-L6 sentence encoder (BERT, 384 wide); frozen,
  captions up to :data:`MAX_TOKENS` tokens.
* ``unet/``: a ``UNet2DConditionModel`` (6.3 M parameters, cross-attention on the MiniLM token states), trained from
  seeded random weights by lorakit's own loop on 64×64 Fashion-MNIST images of the base classes 0–7, captioned
  ``"a photo of a <class>"`` (10 % of captions dropped, for classifier-free guidance).
* ``scheduler/``: SD-1.5's scaled-linear betas (1000 steps) rescaled to zero terminal SNR, v-prediction, DDIM
  with trailing timesteps to sample (see :data:`VERSION` for why).

The classes 8 (bag) and 9 (ankle boot) are never seen: the concept LoRA teaches "ankle boot" from 100 images.
The pretrained folder is cached under :func:`lorakit.models.cache.cache_dir` (``fashion-ldm-v<N>/``); building it
takes about half an hour on two CPU cores, once.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lorakit.formats.atomic import atomic_write_dir
from lorakit.models.cache import cache_dir

#: Fashion-MNIST class names, as they appear in captions.
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
#: Classes the base model is pretrained on.
BASE_CLASSES = tuple(range(8))
#: The held-out class the concept LoRA learns.
CONCEPT_CLASS = 9
#: Image side in pixels (latents 8×8).
SIZE = 64
#: Longest caption in tokens (MiniLM's own limit is 512; captions here are a few words).
MAX_TOKENS = 16
#: 1 / the standard deviation of TAEF2 latents of 64×64 Fashion-MNIST images (0.80 measured on 256 of them).
LATENT_SCALE = 1.25
#: Bump when the architecture or recipe changes: the cached folder's name carries it. Measured on samples of its
#: own classes (guidance 4, the Fashion CNN): version 1 (SD-1.5's ε schedule, lr 3e-4) sampled shapeless images,
#: CNN accuracy 22 %; version 2 (lr 1e-3, min-SNR 5, EMA) drew the classes' shapes, 47 %, but every sample with a
#: random colour cast: under SD-1.5's schedule the noisiest step still holds signal (terminal SNR 0.005), so the
#: initial noise's per-channel mean is read as the image's and decoded as a tint, which the style LoRA could not
#: undo. Version 3 uses a zero-terminal-SNR schedule with v-prediction (Lin et al. 2024), as diffusers implements it.
VERSION = 3
#: The pretraining recipe (names the cached folder's training run); the folder holds the EMA of the UNet's weights.
#: No min-SNR weighting: for v-prediction its weight min(SNR, γ)/(SNR + 1) is 0 at the zero-SNR step, the one step
#: that must learn the image's overall tone.
RECIPE = {"seed": 0, "steps": 2500, "batch_size": 64, "lr": 1e-3, "images_per_class": 1000, "caption_dropout": 0.1,
          "ema_decay": 0.999}

UNET_CONFIG = dict(sample_size=SIZE // 8, in_channels=32, out_channels=32, block_out_channels=(64, 128, 128),
                   layers_per_block=1, down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                         "DownBlock2D"),
                   up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                   cross_attention_dim=384, attention_head_dim=8, norm_num_groups=32)
SCHEDULER_CONFIG = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def caption(label: int) -> str:
    """The caption of a Fashion-MNIST class: ``"a photo of a trouser"``, ``"a photo of an ankle boot"``."""
    name = CLASS_NAMES[label]
    return f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}"


def to_rgb(images: np.ndarray, size: int = SIZE) -> torch.Tensor:
    """uint8 (N, 28, 28) grey images → float (N, 3, size, size) RGB in [0, 1], bilinearly resized."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(255).unsqueeze(1)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False).clamp(0, 1).repeat(1, 3, 1, 1)


def write_image_folder(path: str | Path, images: torch.Tensor, captions: Sequence[str], *, subfolder: str = "1_images",
                       stems: Sequence[str] | None = None) -> Path:
    """An image folder the diffusion task reads: ``<path>/<subfolder>/<stem>.png`` + ``<stem>.txt`` (atomically).

    Args:
        path: the folder (replaced as a whole).
        images: (N, 3, H, W) RGB in [0, 1].
        captions: N captions.
        subfolder: kohya's ``<repeats>_<name>`` folder the images go in.
        stems: N file stems (default ``00000``, ``00001``, …).
    """
    from PIL import Image

    if len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    stems = stems or [f"{i:05d}" for i in range(len(images))]
    pixels = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    def write(tmp: Path) -> None:
        folder = tmp / subfolder
        folder.mkdir(parents=True)
        for stem, img, text in zip(stems, pixels, captions):
            Image.fromarray(img).save(folder / f"{stem}.png")
            (folder / f"{stem}.txt").write_text(text, encoding="utf-8")

    atomic_write_dir(path, write)
    return Path(path)


def base_images(split: str = "train", per_class: int = RECIPE["images_per_class"], classes: Sequence[int] = BASE_CLASSES,
                seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """``per_class`` seeded Fashion-MNIST images of each of ``classes`` as (N, 3, 64, 64) RGB, and their labels."""
    from lorakit.train.data import read_fashion_mnist

    x, y = read_fashion_mnist(split)
    g = np.random.default_rng(seed)
    idx = np.concatenate([g.permutation(np.flatnonzero(y == c))[:per_class] for c in classes])
    return to_rgb(x[idx]), [int(v) for v in y[idx]]


def write_model_folder(path: str | Path, unet_state: dict[str, torch.Tensor] | None = None, seed: int = 0) -> Path:
    """The model folder (SD layout) with a seeded random UNet, or the UNet weights ``unet_state``, written aside
    and swapped in.

    Args:
        path: the folder.
        unet_state: the UNet's state dict (keys without ``unet.``); None: seeded random initial weights.
        seed: the seed of the random initial weights.
    """
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer

    from lorakit.models.hub import minilm_source
    from lorakit.models.taef2_vae import pretrained_taef2_vae

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    if unet_state is not None:
        unet.load_state_dict(unet_state, strict=True)
    source = minilm_source()

    def write(tmp: Path) -> None:
        unet.save_pretrained(tmp / "unet")
        pretrained_taef2_vae(LATENT_SCALE).save_pretrained(tmp / "vae")
        AutoModel.from_pretrained(source).save_pretrained(tmp / "text_encoder")
        AutoTokenizer.from_pretrained(source, model_max_length=MAX_TOKENS).save_pretrained(tmp / "tokenizer")
        DDIMScheduler(**SCHEDULER_CONFIG).save_pretrained(tmp / "scheduler")  # the sampler; training reads DDPM from it
        index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                 "vae": ["lorakit.models.taef2_vae", "TAEF2Autoencoder"], "text_encoder": ["transformers", "BertModel"],
                 "tokenizer": ["transformers", "BertTokenizerFast"], "scheduler": ["diffusers", "DDIMScheduler"],
                 "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))

    atomic_write_dir(path, write)
    return Path(path)


def pretrain_config(run_dir: str | Path, scratch: str | Path, data: str | Path) -> dict:
    """The :data:`RECIPE` as a training config: task ``diffusion`` on the random-UNet folder ``scratch``, the whole
    UNet trained (``lora.train: [unet]``, no adapter), on the captioned image folder ``data``."""
    r = RECIPE
    return {
        "task": "diffusion", "model": {"name": str(scratch)},
        "data": {"dataset": "image-folder", "path": str(data), "eval_rows": 256},
        "lora": {"targets": [], "train": ["unet"]},
        "diffusion": {"resolution": SIZE, "bucketing": False, "caption_dropout": r["caption_dropout"],
                      "min_bucket_resolution": SIZE, "max_bucket_resolution": SIZE},
        "optim": {"lr": r["lr"], "batch_size": r["batch_size"], "max_steps": r["steps"], "warmup_steps": 100,
                  "schedule": "cosine", "weight_decay": 0.0, "ema_decay": r["ema_decay"]},
        "run": {"out_dir": str(run_dir), "seed": r["seed"], "eval_before": False, "eval_every": 500,
                "checkpoint_every": 250, "log_every": 50, "device": "cpu"},
    }


def folder_name() -> str:
    r = RECIPE
    return f"fashion-ldm-v{VERSION}-s{r['seed']}-n{r['steps']}"


def pretrained_fashion_ldm(cache: str | Path | None = None, *, train_if_missing: bool = True) -> Path:
    """The pretrained model folder (see the module docstring), built on first use.

    The pretraining run lives in ``<cache>/<folder>-run/`` (metrics, plot, checkpoints), so an interrupted build
    continues where it stopped when called again.

    Raises:
        FileNotFoundError: the folder is absent and ``train_if_missing`` is False.
    """
    from lorakit.formats import load
    from lorakit.train import TrainConfig, train
    from lorakit.train.checkpoint import latest_checkpoint

    root = Path(cache) if cache is not None else cache_dir()
    folder = root / folder_name()
    if (folder / "model_index.json").is_file():
        return folder
    if not train_if_missing:
        raise FileNotFoundError(f"{folder}: no pretrained Fashion-MNIST diffusion model (train_if_missing=False)")
    scratch, data, run_dir = root / f"{folder.name}-scratch", root / f"{folder.name}-data", root / f"{folder.name}-run"
    if not (scratch / "model_index.json").is_file():
        write_model_folder(scratch, seed=RECIPE["seed"])
    if not (data / "1_images").is_dir():
        images, labels = base_images()
        write_image_folder(data, images, [caption(c) for c in labels])
    cfg = TrainConfig.from_dict(pretrain_config(run_dir, scratch, data))
    train(cfg, resume=latest_checkpoint(run_dir) is not None)
    overrides = load(run_dir / "adapter-last.safetensors").overrides  # the UNet, trained fully
    unet = {k.removeprefix("unet."): v for k, v in overrides.items()}
    write_model_folder(folder, unet)
    return folder
