"""A tiny Stable Diffusion 1.5-layout pipeline folder built from configs (random weights), and a tiny image folder.

Sizes: 64×64 images; a 4-block AutoencoderKL (factor 8, 8 channels) gives 8×8 latents; a 2-block UNet (8, 16)
with cross-attention width 16; a 2-layer CLIP text encoder (hidden 16) with a byte-level BPE tokenizer (no merges,
16 positions) written by :func:`write_tokenizer`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

#: Tokens per caption of the tiny tokenizer (CLIP's 77 in SD).
MAX_TOKENS = 16


def write_tokenizer(folder: Path) -> None:
    """A CLIP tokenizer over single byte-level characters (and their word-final ``</w>`` forms), no merges."""
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    chars = list(bytes_to_unicode().values())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    CLIPTokenizer(vocab=vocab, merges=[], model_max_length=MAX_TOKENS).save_pretrained(str(folder))


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
