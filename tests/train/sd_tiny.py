"""A tiny Stable Diffusion 1.5-layout pipeline folder built from configs (random weights), and a tiny image folder.

Sizes: 64×64 images; a 4-block AutoencoderKL (factor 8, 8 channels) gives 8×8 latents; a 2-block UNet (8, 16)
with cross-attention width 16; a 2-layer CLIP text encoder (hidden 16) with a byte-level BPE tokenizer (no merges,
16 positions) written by :func:`write_tokenizer`.

:func:`build_sdxl_pipeline` writes the SDXL layout at the same sizes: a UNet with ``addition_embed_type: text_time``
(time ids of 8 features each, so 6 × 8 + 16 pooled = 64 added inputs) and cross-attention width 32 = 16 + 16, two
2-layer CLIP text encoders (the second ``CLIPTextModelWithProjection``, projection 16) and two tokenizers (the second
padding with ``!`` as SDXL's ``tokenizer_2`` does).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

#: Tokens per caption of the tiny tokenizer (CLIP's 77 in SD).
MAX_TOKENS = 16


def write_tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """A CLIP tokenizer over single byte-level characters (and their word-final ``</w>`` forms), no merges."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS, pad_token=pad_token).save_pretrained(
        str(folder))


def build_pipeline(folder: Path) -> Path:
    """Write ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/`` and ``model_index.json``."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(str(folder / "tokenizer"))
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4).save_pretrained(str(folder / "unet"))
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=64).save_pretrained(str(folder / "vae"))
    conf = CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                          num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=16,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    CLIPTextModel(conf).save_pretrained(str(folder / "text_encoder"))
    DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  clip_sample=False, steps_offset=1).save_pretrained(str(folder / "scheduler"))
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "scheduler": ["diffusers", "DDPMScheduler"], "safety_checker": [None, None],
             "feature_extractor": [None, None], "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


def build_sdxl_pipeline(folder: Path) -> Path:
    """Write an SDXL-layout folder: ``unet/``, ``vae/``, ``text_encoder/``, ``text_encoder_2/``, ``tokenizer/``,
    ``tokenizer_2/``, ``scheduler/`` and ``model_index.json`` (``StableDiffusionXLPipeline``)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    write_tokenizer(folder / "tokenizer")
    write_tokenizer(folder / "tokenizer_2", pad_token="!")
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=4, use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 16).save_pretrained(str(folder / "unet"))
    AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
        sample_size=64, scaling_factor=0.13025).save_pretrained(str(folder / "vae"))
    for sub, model_class in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
        tok = CLIPTokenizer.from_pretrained(str(folder / sub.replace("text_encoder", "tokenizer")))
        conf = CLIPTextConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                              num_attention_heads=2, max_position_embeddings=MAX_TOKENS, projection_dim=16,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id)
        model_class(conf).save_pretrained(str(folder / sub))
    # SDXL base's own scheduler config (its pipeline samples with Euler; training noises with DDPM from it)
    EulerDiscreteScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                           beta_schedule="scaled_linear", steps_offset=1).save_pretrained(str(folder / "scheduler"))
    index = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.42.1",
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
             "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "image_encoder": [None, None], "feature_extractor": [None, None], "force_zeros_for_empty_prompt": True}
    (folder / "model_index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    return folder


def write_image(path: Path, width: int, height: int, seed: int) -> Path:
    """A smooth random RGB PNG (coarse noise upsampled), so the VAE sees structure, not white noise."""
    from PIL import Image

    g = np.random.default_rng(seed)
    coarse = (g.random((4, 4, 3)) * 255).astype(np.uint8)
    Image.fromarray(coarse).resize((width, height), Image.BILINEAR).save(path)
    return path


def build_images(folder: Path) -> Path:
    """``folder/2_ink/`` (repeats 2): four images of three aspects with captions; ``folder/1_plain/`` one more."""
    sizes = [(64, 64), (96, 64), (64, 96), (128, 80)]
    ink = folder / "2_ink"
    ink.mkdir(parents=True)
    for n, (w, h) in enumerate(sizes):
        write_image(ink / f"img{n}.png", w, h, seed=n)
        (ink / f"img{n}.txt").write_text(f"ink, drawing {n}, duotone", encoding="utf-8")
    plain = folder / "1_plain"
    plain.mkdir()
    write_image(plain / "p0.png", 64, 64, seed=9)
    (plain / "p0.txt").write_text("a plain picture", encoding="utf-8")
    return folder


def shipped_config_task(name: str, model: Path, images: Path, out_dir: Path):
    """A shipped config (``configs/<name>``) prepared on a tiny pipeline at 64 px: (the config as shipped, the
    prepared task, the set of ``component:leaf`` names of its adapted modules)."""
    import lorakit as lk
    from lorakit.train.config import load_config
    from lorakit.train.loop import prepare

    config = Path(__file__).parents[2] / "configs" / name
    cfg = load_config(config, [f"model.name={model}", f"data.path={images}", f"run.out_dir={out_dir}",
                               "diffusion.resolution=64", "diffusion.min_bucket_resolution=32",
                               "diffusion.bucket_step=16"])
    task, _ = prepare(cfg)
    kinds = {p.split(".")[0] + ":" + p.rsplit(".", 1)[-1] for p in lk.extract(task.model).modules}
    return load_config(config), task, kinds
