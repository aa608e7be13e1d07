"""Stable Diffusion LoRA training (task ``diffusion``) on diffusers' own classes.

``model.name`` is a diffusers folder or hub id with the SD-1.5 layout: ``unet/`` (``UNet2DConditionModel``),
``vae/`` (``AutoencoderKL``), ``text_encoder/`` (``CLIPTextModel``), ``tokenizer/`` (``CLIPTokenizer``) and
``scheduler/`` (its config builds the ``DDPMScheduler`` that noises the latents, whatever sampler it names). The
task's model is one :class:`StableDiffusion` module holding ``unet``, ``text_encoder`` and the frozen ``vae``, so
targets read ``unet.…to_q`` / ``text_encoder.…q_proj`` and the kohya writer names them ``lora_unet_…`` /
``lora_te_…``.

SDXL folders (the UNet's config has ``addition_embed_type: text_time``, which is what diffusers' UNet keys on to
require the added conditioning) also have ``text_encoder_2/`` (``CLIPTextModelWithProjection``) and
``tokenizer_2/``; the model is then a :class:`StableDiffusionXL`, conditioned as diffusers' SDXL pipeline does:
the penultimate hidden states of both encoders side by side, the second encoder's pooled projection, and per image
the ``(original_size, crops_coords_top_left, target_size)`` time ids from the data pipeline's resize and crop.

Data: ``data.dataset: image-folder`` at ``data.path`` (see :mod:`lorakit.train.diffusion_data`). A step's noise,
noise offset, timesteps and caption options are drawn in ``collate`` from the global torch generator, which the
loop's checkpoints restore, so a resumed run draws what an uninterrupted one would. The loss is the scheduler's
``prediction_type`` target (ε or v), optionally min-SNR-γ weighted. Metric: ``eval_loss``, the same loss on every
image once, at noise and timesteps fixed by a seed of their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from lorakit.errors import LorakitError
from lorakit.formats import kohya_metadata
from lorakit.train import kohya_export
from lorakit.train.config import ConfigError, TrainConfig
from lorakit.train.data import subset
from lorakit.train.device import device_of, to_device
from lorakit.train.diffusion_data import (Example, bucket_order, load_examples, make_buckets, process_caption,
                                          scan_folder, vae_identity)
from lorakit.train.diffusion_loss import denoising_loss, min_snr_weights, offset_noise, snr
from lorakit.train.sampling import task_sampler
from lorakit.train.tasks import Task

#: Subfolders a Stable Diffusion folder must have.
COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
#: Further subfolders of an SDXL folder.
SDXL_COMPONENTS = ("text_encoder_2", "tokenizer_2")
#: ``text_encoder_2/config.json`` ``architectures`` accepted: SDXL needs the projection's pooled ``text_embeds``,
#: which ``AutoModel`` (a plain ``CLIPTextModel``) would drop.
TEXT_ENCODER_2_CLASSES = ("CLIPTextModelWithProjection",)
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

    #: Children that are text encoders (each gets ``diffusion.text_encoder_lr`` and checkpointing).
    TEXT_ENCODERS = ("text_encoder",)
    #: Batch keys :meth:`forward` takes, and those of them :meth:`encode_text` reads.
    INPUTS = TEXT_INPUTS = ("input_ids",)
    #: Names of :meth:`encode_text`'s outputs as :meth:`forward` takes them precomputed.
    TEXT_OUTPUTS = ("context",)

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, vae: nn.Module) -> None:
        super().__init__()
        self.unet, self.text_encoder, self.vae = unet, text_encoder, vae

    def text_encoders(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.TEXT_ENCODERS]

    def encode_text(self, input_ids: Tensor) -> tuple[Tensor]:
        """(N, T) token ids → ((N, T, cross_attention_dim) the text encoder's last hidden states,)."""
        return (self.text_encoder(input_ids)[0],)

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
            (context,) = self.encode_text(input_ids)  # (N, T, cross_attention_dim)
        return self.unet(noisy, timesteps, encoder_hidden_states=context).sample


class StableDiffusionXL(StableDiffusion):
    """The trainable parts of an SDXL pipeline in one module.

    Attributes:
        unet: the ``UNet2DConditionModel`` (``addition_embed_type: text_time``).
        text_encoder: the first ``CLIPTextModel`` (CLIP ViT-L in SDXL).
        text_encoder_2: the ``CLIPTextModelWithProjection`` (OpenCLIP ViT-bigG in SDXL).
        vae: the ``AutoencoderKL`` (frozen).
    """

    TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
    INPUTS = ("input_ids", "input_ids_2", "time_ids")
    TEXT_INPUTS = ("input_ids", "input_ids_2")
    TEXT_OUTPUTS = ("context", "pooled")

    def __init__(self, unet: nn.Module, text_encoder: nn.Module, text_encoder_2: nn.Module, vae: nn.Module) -> None:
        super().__init__(unet, text_encoder, vae)
        self.text_encoder_2 = text_encoder_2

    def encode_text(self, input_ids: Tensor, input_ids_2: Tensor) -> tuple[Tensor, Tensor]:
        """The prompt embeddings as diffusers' ``StableDiffusionXLPipeline.encode_prompt`` builds them.

        Args:
            input_ids: (N, T) ids of ``tokenizer``.
            input_ids_2: (N, T) ids of ``tokenizer_2``.

        Returns:
            context: (N, T, D1 + D2) both encoders' penultimate hidden states, concatenated on the feature axis.
            pooled: (N, projection_dim) ``text_encoder_2``'s projected pooled output (``text_embeds``).
        """
        out_1 = self.text_encoder(input_ids, output_hidden_states=True)
        out_2 = self.text_encoder_2(input_ids_2, output_hidden_states=True)
        return torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1), out_2.text_embeds

    def forward(self, noisy: Tensor, timesteps: Tensor, input_ids: Tensor, input_ids_2: Tensor, time_ids: Tensor,
                context: Tensor | None = None, pooled: Tensor | None = None) -> Tensor:
        """The UNet's prediction for noisy latents under the captions and the images' size conditioning.

        Args:
            noisy: (N, 4, h, w) noisy latents.
            timesteps: (N,) integer timesteps.
            input_ids, input_ids_2: (N, T) caption token ids of the two tokenizers.
            time_ids: (N, 6) per image (original height, width, crop top, left, target height, width).
            context, pooled: :meth:`encode_text`'s outputs when already known (cached), else None.

        Returns:
            (N, 4, h, w) the predicted noise (or velocity).
        """
        if context is None or pooled is None:
            context, pooled = self.encode_text(input_ids, input_ids_2)
        return self.unet(noisy, timesteps, encoder_hidden_states=context,
                         added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


class TextCache:
    """The text encoders' outputs per caption while they are all frozen (no trainable parameter, so no adapter):
    a caption is encoded once per run instead of once per step. Outputs (:meth:`StableDiffusion.encode_text`'s,
    e.g. SDXL's context and pooled embedding) are kept in memory, at most ``limit`` captions (further ones are
    encoded each time); with a trainable text encoder nothing is cached.
    """

    def __init__(self, model: StableDiffusion, limit: int = 4096) -> None:
        self.model, self.limit = model, limit
        self.outputs: dict[tuple, tuple[Tensor, ...]] = {}

    def __call__(self, *input_ids: Tensor) -> tuple[Tensor, ...] | None:
        """(N, T) token ids per tokenizer → the (N, …) outputs, or None when a text encoder trains (the model
        encodes)."""
        if any(p.requires_grad for te in self.model.text_encoders() for p in te.parameters()):
            return None
        rows = list(zip(*([tuple(r) for r in ids.tolist()] for ids in input_ids)))  # one key per caption
        todo = [r for r in dict.fromkeys(rows) if r not in self.outputs]
        fresh: dict[tuple, tuple[Tensor, ...]] = {}
        if todo:
            device = input_ids[0].device
            with torch.no_grad():
                outs = self.model.encode_text(*(torch.tensor(col, device=device) for col in zip(*todo)))
            fresh = dict(zip(todo, zip(*outs)))
            for r, o in list(fresh.items())[:max(0, self.limit - len(self.outputs))]:
                self.outputs[r] = o
        per_row = [self.outputs.get(r, fresh.get(r)) for r in rows]
        return tuple(torch.stack(col) for col in zip(*per_row))


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


@contextmanager
def _loading(name: str):
    """Turn from_pretrained's errors on missing / unreachable / malformed files into a :class:`ModelFolderError`."""
    try:
        yield
    except (OSError, ValueError) as e:
        raise ModelFolderError(f"{name}: cannot load the Stable Diffusion model (model.name): "
                               f"{str(e).splitlines()[0]}") from None


def load_parts(name: str):
    """(model, tokenizer, DDPM noise scheduler) from a diffusers folder or hub id.

    The model is a :class:`StableDiffusion`, or a :class:`StableDiffusionXL` when the UNet's config has
    ``addition_embed_type: text_time`` (diffusers' UNet then requires SDXL's added conditioning); for SDXL the
    tokenizer is the pair ``(tokenizer, tokenizer_2)``, in the order of the model's text encoders. The VAE's class
    comes from ``vae/config.json`` (:data:`VAE_CLASSES`), the first text encoder's and the tokenizers' from their
    configs through transformers' Auto classes (CLIP for Stable Diffusion; any encoder whose first output is the
    token states, e.g. the MiniLM of lorakit's own pretrained model), SDXL's second text encoder's from its config's
    ``architectures`` (:data:`TEXT_ENCODER_2_CLASSES`).

    Raises:
        ModelFolderError: a local folder lacks one of :data:`COMPONENTS` (or, for SDXL, :data:`SDXL_COMPONENTS`),
            a component's class or size does not fit, or loading fails (named).
    """
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer

    folder = Path(name)
    if folder.is_dir():
        missing = [f"{c}/" for c in COMPONENTS if not (folder / c).is_dir()]
        if missing:
            raise ModelFolderError(f"{folder}: model.name is not a Stable Diffusion folder: missing "
                                   f"{', '.join(missing)}")
    with _loading(name):
        sdxl = UNet2DConditionModel.load_config(name, subfolder="unet").get("addition_embed_type") == "text_time"
    if sdxl and folder.is_dir():
        missing = [f"{c}/" for c in SDXL_COMPONENTS if not (folder / c).is_dir()]
        if missing:
            raise ModelFolderError(f"{folder}: an SDXL folder (unet addition_embed_type 'text_time') lacks "
                                   f"{', '.join(missing)}")
    with _loading(name):
        unet = UNet2DConditionModel.from_pretrained(name, subfolder="unet")
        vae = _vae_class(name).from_pretrained(name, subfolder="vae")
        text_encoder = AutoModel.from_pretrained(name, subfolder="text_encoder")
        tokenizer = AutoTokenizer.from_pretrained(name, subfolder="tokenizer")
        scheduler = DDPMScheduler.from_pretrained(name, subfolder="scheduler")
        if sdxl:
            text_encoder_2 = _text_encoder_2(name)
            tokenizer = (tokenizer, AutoTokenizer.from_pretrained(name, subfolder="tokenizer_2"))
    vae.requires_grad_(False)
    if not sdxl:
        return StableDiffusion(unet, text_encoder, vae), tokenizer, scheduler
    # diffusers' _get_add_time_ids check: 6 time ids of addition_time_embed_dim each, then the pooled embedding
    # (a refiner's 5 ids with an aesthetic score would not fit)
    got = 6 * unet.config.addition_time_embed_dim + text_encoder_2.config.projection_dim
    if unet.config.projection_class_embeddings_input_dim != got:
        raise ModelFolderError(f"{name}/unet/config.json: projection_class_embeddings_input_dim "
                               f"{unet.config.projection_class_embeddings_input_dim} is not 6 time ids x "
                               f"addition_time_embed_dim {unet.config.addition_time_embed_dim} + text_encoder_2 "
                               f"projection_dim {text_encoder_2.config.projection_dim} = {got}")
    return StableDiffusionXL(unet, text_encoder, text_encoder_2, vae), tokenizer, scheduler


def _text_encoder_2(name: str) -> nn.Module:
    """SDXL's second text encoder, its class from ``text_encoder_2/config.json``'s ``architectures``."""
    import transformers

    arch = (transformers.AutoConfig.from_pretrained(name, subfolder="text_encoder_2").architectures or [None])[0]
    if arch not in TEXT_ENCODER_2_CLASSES:
        raise ModelFolderError(f"{name}/text_encoder_2/config.json: architectures {arch!r} is not one of "
                               f"{list(TEXT_ENCODER_2_CLASSES)} (SDXL needs its pooled projection)")
    return getattr(transformers, arch).from_pretrained(name, subfolder="text_encoder_2")


def build(cfg: TrainConfig) -> Task:
    d = cfg.diffusion
    if cfg.data.dataset != "image-folder":
        raise ConfigError(f"config field 'data.dataset': task diffusion reads 'image-folder', got "
                          f"{cfg.data.dataset!r}")
    model, tok, scheduler = load_parts(cfg.model.name)
    sample = task_sampler(cfg, tok)  # reads diffusion.sample_prompts now: a bad file stops before any encoding
    prediction = scheduler.config.prediction_type
    if prediction not in PREDICTION_TYPES:
        raise ConfigError(f"{cfg.model.name}/scheduler: prediction_type {prediction!r} is not one of "
                          f"{list(PREDICTION_TYPES)}")
    if d.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
        for te in model.text_encoders():  # transformers 5 renamed the switch (the old name warns)
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

    tokenizers = dict(zip(model.TEXT_INPUTS, tok if isinstance(model, StableDiffusionXL) else (tok,)))

    def tokens(captions: list[str]) -> dict[str, Tensor]:
        """Each tokenizer's (N, T) ids, padded to its length as diffusers' pipelines pad."""
        return {key: t(captions, padding="max_length", max_length=t.model_max_length, truncation=True,
                       return_tensors="pt").input_ids for key, t in tokenizers.items()}

    def draw(batch: list[Example], captions: list[str], g: torch.Generator | None) -> dict[str, Tensor]:
        latents = torch.stack([e.latent for e in batch])  # (N, 4, h, w)
        n, c = latents.shape[:2]
        out = {"latents": latents, **tokens(captions),
               "noise": torch.randn(latents.shape, generator=g), "offset": torch.randn((n, c, 1, 1), generator=g),
               "timesteps": torch.randint(0, steps, (n,), generator=g)}
        if "time_ids" in model.INPUTS:  # SDXL: (original_size, crops_coords_top_left, target_size), all (h, w)
            out["time_ids"] = torch.tensor([[*e.original_size, *e.crop_top_left, e.bucket[1], e.bucket[0]]
                                            for e in batch], dtype=torch.float32)
        return out

    def collate(batch: list[Example]) -> dict[str, Tensor]:
        """latents, noise: (N, 4, h, w); offset: (N, 4, 1, 1); input_ids (and SDXL's input_ids_2): (N, T);
        timesteps: (N,); SDXL's time_ids: (N, 6)."""
        # caption dropout empties the caption for SDXL too, as kohya's dataset does for every model (the empty
        # prompt is encoded; the pipeline's zeroed embeddings are for negative prompts at inference only)
        captions = [process_caption(e.caption, prefix=d.caption_prefix, shuffle=d.shuffle_captions,
                                    keep_tokens=d.keep_tokens, dropout=d.caption_dropout) for e in batch]
        return draw(batch, captions, None)

    text_cache = TextCache(model) if d.cache_text_encoder_outputs else None

    def loss(m: nn.Module, batch: dict[str, Tensor]) -> Tensor:
        latents, t = batch["latents"], batch["timesteps"]
        noise = offset_noise(batch["noise"], d.noise_offset, batch["offset"])
        noisy = scheduler.add_noise(latents, noise, t)
        cached = text_cache(*(batch[k] for k in model.TEXT_INPUTS)) if text_cache is not None else None
        pred = m(noisy, t, **{k: batch[k] for k in model.INPUTS}, **dict(zip(model.TEXT_OUTPUTS, cached or ())))
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

    param_lrs = {f"{te}.": float(d.text_encoder_lr) for te in model.TEXT_ENCODERS} if d.text_encoder_lr else None
    return Task(model, train_set, eval_set, collate, loss, evaluate, "eval_loss", False, cfg.model.name,
                order=order, param_lrs=param_lrs, sample=sample, sample_every=d.sample_every,
                export=_kohya_exporter(cfg, model, images, repeats))


def _kohya_exporter(cfg: TrainConfig, model: StableDiffusion, images: Sequence[Example], repeats: dict[Path, int]):
    """``Task.export``: the kohya file with kohya's training metadata beside each saved adapter."""
    facts = kohya_export.dataset_facts(cfg.data.path, [(e.path, e.caption, repeats[e.path]) for e in images])
    sdxl = isinstance(model, StableDiffusionXL)
    base = "sdxl" if sdxl else "sd2" if model.unet.config.cross_attention_dim == 1024 else "sd15"
    folder = Path(cfg.model.name)
    weights = (kohya_metadata.model_weight_files(folder, ("unet", *model.TEXT_ENCODERS, "vae"))
               if folder.is_dir() else None)  # a hub id: no local bytes to hash
    return kohya_export.exporter(cfg, facts, base, weights)
