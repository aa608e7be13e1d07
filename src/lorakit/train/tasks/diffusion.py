"""Stable Diffusion LoRA training (task ``diffusion``) on diffusers' own classes.

``model.name`` is a diffusers folder or hub id with the SD-1.5 layout: ``unet/`` (``UNet2DConditionModel``),
``vae/`` (``AutoencoderKL``), ``text_encoder/`` (``CLIPTextModel``), ``tokenizer/`` (``CLIPTokenizer``) and
``scheduler/`` (its config builds the ``DDPMScheduler`` that noises the latents, whatever sampler it names). The
task's model is one :class:`StableDiffusion` module holding ``unet``, ``text_encoder`` and the frozen ``vae``, so
targets read ``unet.…to_q`` / ``text_encoder.…q_proj`` and the kohya writer names them ``lora_unet_…`` /
``lora_te_…``.

Data: ``data.dataset: image-folder`` at ``data.path`` (see :mod:`lorakit.train.diffusion_data`). A step's noise,
noise offset, timesteps and caption options are drawn in ``collate`` from the global torch generator, which the
loop's checkpoints restore, so a resumed run draws what an uninterrupted one would. The loss is the scheduler's
``prediction_type`` target (ε or v), optionally min-SNR-γ weighted. Metric: ``eval_loss``, the same loss on every
image once, at noise and timesteps fixed by a seed of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.train.config import ConfigError, TrainConfig
from lorakit.train.data import subset
from lorakit.train.device import device_of, to_device
from lorakit.train.diffusion_data import (Example, bucket_order, load_examples, make_buckets, process_caption,
                                          scan_folder, vae_identity)
from lorakit.train.diffusion_loss import denoising_loss, min_snr_weights, offset_noise, snr
from lorakit.train.tasks import Task

#: Subfolders a Stable Diffusion folder must have.
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
#: Prediction types the loss knows (the scheduler config's ``prediction_type``).
PREDICTION_TYPES = ("epsilon", "v_prediction")
#: Seed of the evaluation's fixed noise and timesteps.
EVAL_SEED = 1234
#: Images per evaluation batch.
EVAL_BATCH = 8


class ModelFolderError(LorakitError):
    """``model.name`` is not a usable Stable Diffusion folder or hub id; the message names the folder."""


class StableDiffusion(nn.Module):
    """The trainable parts of a Stable Diffusion pipeline in one module.

    Attributes:
        unet: the ``UNet2DConditionModel``.
        text_encoder: the ``CLIPTextModel``.
        vae: the ``AutoencoderKL`` (frozen; used to encode the training images once).
    """

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, vae: nn.Module) -> None:
        super().__init__()
        self.unet, self.text_encoder, self.vae = unet, text_encoder, vae

    def forward(self, noisy: Tensor, timesteps: Tensor, input_ids: Tensor, context: Tensor | None = None) -> Tensor:
        """The UNet's prediction for noisy latents under the captions' text embeddings.

        Args:
            noisy: (N, 4, h, w) noisy latents.
            timesteps: (N,) integer timesteps.
            input_ids: (N, T) caption token ids.
            context: (N, T, cross_attention_dim) the text encoder's output for ``input_ids`` when already known
                (cached), else None.

        Returns:
            (N, 4, h, w) the predicted noise (or velocity).
        """
        if context is None:
            context = self.text_encoder(input_ids)[0]  # (N, T, cross_attention_dim)
        return self.unet(noisy, timesteps, encoder_hidden_states=context).sample


class TextCache:
    """The text encoder's outputs per caption while it is frozen (no trainable parameter in it, so no adapter):
    a caption is encoded once per run instead of once per step. Outputs are kept in memory, at most ``limit``
    captions (further ones are encoded each time); with a trainable text encoder nothing is cached.
    """

    def __init__(self, text_encoder: nn.Module, limit: int = 4096) -> None:
        self.text_encoder, self.limit = text_encoder, limit
        self.outputs: dict[tuple[int, ...], Tensor] = {}

    def __call__(self, input_ids: Tensor) -> Tensor | None:
        """(N, T) token ids → (N, T, D) outputs, or None when the text encoder trains (the model encodes)."""
        if any(p.requires_grad for p in self.text_encoder.parameters()):
            return None
        rows = [tuple(r) for r in input_ids.tolist()]
        todo = [r for r in dict.fromkeys(rows) if r not in self.outputs]
        fresh: dict[tuple[int, ...], Tensor] = {}
        if todo:
            with torch.no_grad():
                out = self.text_encoder(torch.tensor(todo, device=input_ids.device))[0]
            fresh = dict(zip(todo, out))
            for r, o in list(fresh.items())[:max(0, self.limit - len(self.outputs))]:
                self.outputs[r] = o
        return torch.stack([self.outputs.get(r, fresh.get(r)) for r in rows])


#: ``vae/config.json`` ``_class_name`` → where the class lives: diffusers' VAEs, or lorakit's TAEF2 component.
VAE_CLASSES = {"AutoencoderKL": "diffusers", "AutoencoderTiny": "diffusers",
               "TAEF2Autoencoder": "lorakit.models.taef2_vae"}


def _vae_class(name: str) -> type:
    """The VAE class that ``<name>/vae/config.json`` names (diffusers' own config reader, folder or hub id)."""
    import importlib

    from diffusers import AutoencoderKL

    class_name = AutoencoderKL.load_config(name, subfolder="vae").get("_class_name", "AutoencoderKL")
    if class_name not in VAE_CLASSES:
        raise ModelFolderError(f"{name}/vae/config.json: _class_name {class_name!r} is not one of "
                               f"{sorted(VAE_CLASSES)}")
    return getattr(importlib.import_module(VAE_CLASSES[class_name]), class_name)


def load_parts(name: str):
    """(:class:`StableDiffusion`, tokenizer, DDPM noise scheduler) from a diffusers folder or hub id.

    The VAE's class comes from ``vae/config.json`` (:data:`VAE_CLASSES`), the text encoder's and tokenizer's from
    their configs through transformers' Auto classes (CLIP for Stable Diffusion; any encoder whose first output is
    the token states, e.g. the MiniLM of lorakit's own pretrained model).

    Raises:
        ModelFolderError: a local folder lacks one of :data:`COMPONENTS`, or loading fails (named).
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer

    folder = Path(name)
    if folder.is_dir():
        missing = [f"{c}/" for c in COMPONENTS if not (folder / c).is_dir()]
        if missing:
            raise ModelFolderError(f"{folder}: model.name is not a Stable Diffusion folder: missing "
                                   f"{', '.join(missing)}")
    try:
        unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet")
        vae = _vae_class(name).from_pretrained(name, subfolder="vae")
        text_encoder = AutoModel.from_pretrained(name, subfolder="text_encoder")
        tokenizer = AutoTokenizer.from_pretrained(name, subfolder="tokenizer")
        scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler")
    except (OSError, ValueError) as e:  # from_pretrained's errors on missing / unreachable / malformed files
        raise ModelFolderError(f"{name}: cannot load the Stable Diffusion model (model.name): "
                               f"{str(e).splitlines()[0]}") from None
    vae.requires_grad_(False)
    return StableDiffusion(unet, text_encoder, vae), tokenizer, scheduler


def build(cfg: TrainConfig) -> Task:
    d = cfg.diffusion
    if cfg.data.dataset != "image-folder":
        raise ConfigError(f"config field 'data.dataset': task diffusion reads 'image-folder', got "
                          f"{cfg.data.dataset!r}")
    model, tok, scheduler = load_parts(cfg.model.name)
    prediction = scheduler.config.prediction_type
    if prediction not in PREDICTION_TYPES:
        raise ConfigError(f"{cfg.model.name}/scheduler: prediction_type {prediction!r} is not one of "
                          f"{list(PREDICTION_TYPES)}")
    if d.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        te = model.text_encoder  # transformers 5 renamed the switch (the old name warns)
        (getattr(te, "activation_checkpointing_enable", None) or te.gradient_checkpointing_enable)()

    vae = model.vae
    scale = float(vae.config.scaling_factor)

    def encode(pixels: Tensor) -> Tensor:
        """(1, 3, H, W) in [-1, 1] → (1, C, H/8, W/8): the posterior mean (or a deterministic encoder's latents),
        scaled (deterministic: the cache and the global RNG stay the same whether a run encodes or reads the
        cache)."""
        with torch.no_grad():
            out = vae.encode(pixels.to(device_of(vae)))  # AutoencoderKL: a posterior; AutoencoderTiny-like: latents
            return (out.latent_dist.mean if hasattr(out, "latent_dist") else out.latents) * scale

    records = scan_folder(cfg.data.path)
    buckets = (make_buckets(d.resolution, d.min_bucket_resolution, d.max_bucket_resolution, d.bucket_step)
               if d.bucketing else [(d.resolution, d.resolution)])
    cache = Path(cfg.run.out_dir) / "cache" / "latents" if d.cache_latents else None
    images = load_examples(records, buckets, encode, vae_identity(vae, cfg.model.name), cache,
                           cfg.data.skip_bad_images)
    repeats = {r.path: r.repeats for r in records}
    train_set = [e for e in images for _ in range(repeats[e.path])]
    train_set = [train_set[i] for i in subset(len(train_set), cfg.data.train_rows, cfg.run.seed)]
    eval_set = images[:cfg.data.eval_rows] if cfg.data.eval_rows else images
    steps = scheduler.config.num_train_timesteps

    def tokens(captions: list[str]) -> Tensor:
        return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids  # (N, T)

    def draw(batch: list[Example], captions: list[str], g: torch.Generator | None) -> dict[str, Tensor]:
        latents = torch.stack([e.latent for e in batch])  # (N, 4, h, w)
        n, c = latents.shape[:2]
        return {"latents": latents, "input_ids": tokens(captions),
                "noise": torch.randn(latents.shape, generator=g), "offset": torch.randn((n, c, 1, 1), generator=g),
                "timesteps": torch.randint(0, steps, (n,), generator=g)}

    def collate(batch: list[Example]) -> dict[str, Tensor]:
        """latents, noise: (N, 4, h, w); offset: (N, 4, 1, 1); input_ids: (N, T); timesteps: (N,)."""
        captions = [process_caption(e.caption, prefix=d.caption_prefix, shuffle=d.shuffle_captions,
                                    keep_tokens=d.keep_tokens, dropout=d.caption_dropout) for e in batch]
        return draw(batch, captions, None)

    text_cache = TextCache(model.text_encoder) if d.cache_text_encoder_outputs else None

    def loss(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        latents, t = batch["latents"], batch["timesteps"]
        noise = offset_noise(batch["noise"], d.noise_offset, batch["offset"])
        noisy = scheduler.add_noise(latents, noise, t)
        context = text_cache(batch["input_ids"]) if text_cache is not None else None
        pred = m(noisy, t, batch["input_ids"], context=context)
        target = noise if prediction == "epsilon" else scheduler.get_velocity(latents, noise, t)
        weights = (min_snr_weights(snr(scheduler.alphas_cumprod, t), d.min_snr_gamma, prediction)
                   if d.min_snr_gamma else None)
        return denoising_loss(pred, target, weights)

    def evaluate(m: nn.Module, rows: Sequence[Example]) -> dict[str, float]:
        g = torch.Generator().manual_seed(EVAL_SEED)
        by_bucket: dict[tuple[int, int], list[Example]] = {}
        for e in rows:
            by_bucket.setdefault(e.bucket, []).append(e)
        total = 0.0
        for b in sorted(by_bucket):
            group = by_bucket[b]
            for start in range(0, len(group), EVAL_BATCH):
                part = group[start:start + EVAL_BATCH]
                captions = [process_caption(e.caption, prefix=d.caption_prefix, shuffle=False, keep_tokens=0,
                                            dropout=0.0) for e in part]
                total += float(loss(m, to_device(draw(part, captions, g), device_of(m)))) * len(part)
        return {"eval_loss": total / len(rows)}

    def order(seed: int, epoch: int, batch_size: int) -> list[int]:
        return bucket_order([e.bucket for e in train_set], batch_size, seed, epoch)

    param_lrs = {"text_encoder.": float(d.text_encoder_lr)} if d.text_encoder_lr else None
    return Task(model, train_set, eval_set, collate, loss, evaluate, "eval_loss", False, cfg.model.name,
                order=order, param_lrs=param_lrs)
