"""A diffusion run's adapter as the kohya file A1111, ComfyUI and diffusers read, with kohya's ``ss_*`` metadata.

Beside each native ``adapter-<which>.safetensors`` the diffusion task writes ``adapter-<which>.kohya.safetensors``:
the same factors under kohya's names (:mod:`lorakit.formats.kohya`) and the training facts kohya sd-scripts records
(``train_network.py``), so tools that show or sort LoRAs by them (A1111's LoRA tab, the civitai uploader, ComfyUI
metadata viewers) see what they expect: network module/dim/alpha/args, base model name, version and hashes,
resolution and buckets, steps, epoch, images, learning rates, noise options, the dataset folders and the tag
frequency of their captions, a training comment, and the ``sshs_*`` hashes the additional-networks extension reads.
Values are written as kohya writes them (Python's ``str()``), so :func:`lorakit.formats.kohya_metadata.parse`
reads them back typed.

The metadata is a pure function of the run's config, its dataset facts and the adapter (:func:`training_metadata`);
:func:`write` adds the file hashes and writes atomically.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from lorakit.adapter import Adapter
from lorakit.formats import kohya, kohya_metadata
from lorakit.formats.safetensors_io import write_safetensors

#: kohya's network module for LoRA and LoCon (conv layers through ``conv_dim`` / ``conv_alpha``).
NETWORK_MODULE = "networks.lora"
#: ``ss_base_model_version`` by base kind (kohya's ``sd_v1``, ``sd_v2``, ``sdxl_base_v1-0``).
BASE_VERSIONS = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}
#: File name part of the kohya export: ``adapter-last.safetensors`` → ``adapter-last.kohya.safetensors``.
SUFFIX = ".kohya.safetensors"


@dataclass(frozen=True)
class DatasetFacts:
    """What kohya records about a training folder.

    Attributes:
        folders: dataset subfolder name (``10_name``; the root folder's own name for images directly in it) →
            (repeats, images).
        tag_frequency: subfolder name → caption tag → number of images whose caption has it (repeats not counted).
        num_train_images: images × repeats, over all folders (kohya's ``ss_num_train_images``).
    """

    folders: dict[str, tuple[int, int]]
    tag_frequency: dict[str, dict[str, int]]
    num_train_images: int


def dataset_facts(root: str | os.PathLike, images: Iterable[tuple[Path, str, int]]) -> DatasetFacts:
    """The :class:`DatasetFacts` of the images a run trains on.

    Args:
        root: the data folder (``data.path``).
        images: (image path, caption as read, repeats) of every image used (skipped bad images left out).
    """
    root = Path(root)
    folders: dict[str, list[int]] = {}
    tags: dict[str, dict[str, int]] = {}
    total = 0
    for path, caption, repeats in images:
        name = path.parent.name if path.parent != root else root.name
        entry = folders.setdefault(name, [repeats, 0])
        entry[1] += 1
        total += repeats
        counts = tags.setdefault(name, {})
        # kohya splits on commas and counts each tag once per image
        for tag in dict.fromkeys(t.strip() for t in caption.split(",")):
            if tag:
                counts[tag] = counts.get(tag, 0) + 1
    return DatasetFacts({k: (v[0], v[1]) for k, v in folders.items()}, tags, total)


def _common(values: list[float]) -> str:
    """kohya's value of a per-module quantity: the value when all modules share it, else ``Dynamic``."""
    distinct = set(values)
    if len(distinct) != 1:
        return kohya_metadata.DYNAMIC
    return str(distinct.pop())


def _is_conv(m) -> bool:
    """A convolution with a kernel larger than 1×1: kohya's ``conv_dim`` modules (1×1 convs count as linear)."""
    return m.kind in ("conv1d", "conv2d") and math.prod(m.kernel_size) > 1


def training_metadata(cfg, adapter: Adapter, facts: DatasetFacts, *, base: str, step: int, started_at: float,
                      finished_at: float, model_hashes: tuple[str, str] | None = None) -> dict[str, str]:
    """kohya's ``ss_*`` keys for ``adapter`` trained by ``cfg`` (a :class:`lorakit.train.config.TrainConfig` of task
    ``diffusion``) up to optimiser step ``step``.

    Args:
        base: ``sd15``, ``sd2`` or ``sdxl`` (:data:`BASE_VERSIONS`).
        started_at, finished_at: Unix times of the training session.
        model_hashes: ``(ss_sd_model_hash, ss_new_sd_model_hash)`` of the base weights
            (:func:`lorakit.formats.kohya_metadata.model_hashes`), or ``None`` when the base is not local.
    """
    d, o = cfg.diffusion, cfg.optim
    linear = [m for m in adapter.modules.values() if not _is_conv(m)]
    conv = [m for m in adapter.modules.values() if _is_conv(m)]
    args: dict[str, str] = {}
    if conv:  # kohya writes network args as strings
        args = {"conv_dim": _common([m.rank for m in conv]), "conv_alpha": _common([float(m.alpha) for m in conv])}
    per_step = o.batch_size * o.grad_accum
    epoch = math.ceil(step * per_step / facts.num_train_images) if facts.num_train_images else 0
    text_lr = d.text_encoder_lr if d.text_encoder_lr is not None else o.lr
    trains_text = any(p.startswith("text_encoder") for p in adapter.modules)
    name = str(cfg.model.name)
    meta = {
        "ss_network_module": NETWORK_MODULE,
        "ss_network_dim": _common([m.rank for m in linear or conv]),
        "ss_network_alpha": _common([float(m.alpha) for m in linear or conv]),
        "ss_network_args": json.dumps(args),
        "ss_network_train_unet_only": str(not trains_text),
        "ss_network_dropout": str(cfg.lora.dropout),
        "ss_sd_model_name": Path(name).name if Path(name).exists() else name,
        "ss_base_model_version": BASE_VERSIONS[base],
        "ss_v2": str(base == "sd2"),
        "ss_resolution": f"({d.resolution}, {d.resolution})",
        "ss_enable_bucket": str(d.bucketing),
        "ss_min_bucket_reso": str(d.min_bucket_resolution),
        "ss_max_bucket_reso": str(d.max_bucket_resolution),
        "ss_bucket_reso_steps": str(d.bucket_step),
        "ss_steps": str(step),
        "ss_max_train_steps": str(step),
        "ss_epoch": str(epoch),
        "ss_num_train_images": str(facts.num_train_images),
        "ss_num_reg_images": "0",
        "ss_batch_size_per_device": str(o.batch_size),
        "ss_total_batch_size": str(per_step),
        "ss_gradient_accumulation_steps": str(o.grad_accum),
        "ss_learning_rate": str(o.lr),
        "ss_unet_lr": str(o.lr),
        "ss_text_encoder_lr": str(text_lr),
        "ss_lr_scheduler": o.schedule,
        "ss_lr_warmup_steps": str(o.warmup_steps),
        "ss_max_grad_norm": str(o.max_grad_norm),
        "ss_seed": str(cfg.run.seed),
        "ss_mixed_precision": "no" if cfg.run.precision == "fp32" else cfg.run.precision,  # accelerate's spelling
        "ss_noise_offset": str(d.noise_offset) if d.noise_offset else "None",
        "ss_min_snr_gamma": str(d.min_snr_gamma) if d.min_snr_gamma else "None",
        "ss_cache_latents": str(d.cache_latents),
        "ss_shuffle_caption": str(d.shuffle_captions),
        "ss_keep_tokens": str(d.keep_tokens),
        "ss_caption_dropout_rate": str(float(d.caption_dropout)),
        "ss_gradient_checkpointing": str(d.gradient_checkpointing),
        "ss_dataset_dirs": json.dumps({k: {"n_repeats": r, "img_count": n} for k, (r, n) in facts.folders.items()}),
        "ss_tag_frequency": json.dumps(facts.tag_frequency),
        "ss_training_comment": d.training_comment or "None",
        "ss_output_name": Path(cfg.run.out_dir).name,
        "ss_training_started_at": str(started_at),
        "ss_training_finished_at": str(finished_at),
    }
    if model_hashes is not None:
        meta["ss_sd_model_hash"], meta["ss_new_sd_model_hash"] = model_hashes
    return meta


def write(adapter: Adapter, path: str | os.PathLike, metadata: Mapping[str, str]) -> Path:
    """Write ``adapter`` as a kohya file at ``path`` (atomically) with ``metadata`` and its ``sshs_*`` hashes.

    Raises:
        NotRepresentableError: a part kohya cannot hold (embedding LoRA, full-module overrides).
    """
    adapter.validate(str(path))
    tensors, header = kohya.to_tensors(adapter)
    header.update(metadata)
    header["sshs_model_hash"], header["sshs_legacy_hash"] = kohya_metadata.addnet_hashes(tensors, header)
    write_safetensors(tensors, path, header)
    return Path(path)


def exporter(cfg, facts: DatasetFacts, base: str, weight_files: list[Path] | None):
    """The diffusion task's ``Task.export``: ``export(adapter, native_path, meta)`` writes the kohya file beside the
    native one, ``meta["step"]`` being the adapter's optimiser step, and returns its path.

    Args:
        weight_files: the base model's weight files to hash (hashed once, at the first export), or ``None``.
    """
    started = time.time()
    hashes: list[tuple[str, str] | None] = []

    def export(adapter: Adapter, native: Path, meta: Mapping[str, object]) -> Path:
        if not hashes:
            hashes.append(kohya_metadata.model_hashes(weight_files) if weight_files else None)
        metadata = training_metadata(cfg, adapter, facts, base=base, step=int(meta["step"]), started_at=started,
                                     finished_at=time.time(), model_hashes=hashes[0])
        return write(adapter, export_path(native), metadata)

    return export


def export_path(native: str | os.PathLike) -> Path:
    """``adapter-last.safetensors`` → ``adapter-last.kohya.safetensors`` (beside it)."""
    native = Path(native)
    return native.with_name(native.name.removesuffix(".safetensors") + SUFFIX)
