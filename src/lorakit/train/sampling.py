"""Sample images of a Stable Diffusion model: kohya prompt files, rendering with diffusers' own pipelines, grids,
and ``lorakit generate`` from a finished run.

Prompt files follow kohya sd-scripts' syntax (``train_util.line_to_prompt_dict``): one prompt a line, options
after ``" --"``::

    # a comment; blank lines are skipped too
    a photo of sks dog on the beach --n blurry, lowres --s 28 --l 7 --d 42 --w 512 --h 768 --ss euler_a

========  =================================  ======================================================
option    meaning                            default
========  =================================  ======================================================
``--n``   negative prompt                    none
``--s``   denoising steps                    ``diffusion.sample_steps``
``--l``   classifier-free guidance scale     ``diffusion.sample_guidance``
``--d``   seed of the initial noise          ``run.seed`` + the prompt's index (0 for the first)
``--w``   width in pixels (a multiple of 8)  ``diffusion.resolution``
``--h``   height in pixels                   ``diffusion.resolution``
``--ss``  sampler (:data:`SAMPLERS`)         ``diffusion.sample_sampler``
========  =================================  ======================================================

Option letters are case-insensitive, as in kohya; unlike kohya, an unknown option or a bad value is an error
naming the file, the line and the option (kohya logs and ignores it), so a typo never silently samples something
else.

Rendering builds diffusers' ``StableDiffusionPipeline`` (``StableDiffusionXLPipeline`` for SDXL) around the
model's live parts, adapters and all, with a fresh sampler scheduler per prompt built from the model folder's
``scheduler/`` config, and one seeded ``torch.Generator`` per prompt: a prompt's image depends on the weights and
its line only. The training loop calls the task's sampler in eval mode, without gradients, and restores the
global RNG state after it, so sampling never changes what a run trains.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.errors import LorakitError

#: Sampler names (kohya's ``--ss`` / ``sample_sampler`` spellings) → diffusers scheduler class.
SAMPLERS: dict[str, str] = {"ddim": "DDIMScheduler", "ddpm": "DDPMScheduler", "pndm": "PNDMScheduler",
                            "euler": "EulerDiscreteScheduler", "euler_a": "EulerAncestralDiscreteScheduler",
                            "heun": "HeunDiscreteScheduler", "dpmsolver++": "DPMSolverMultistepScheduler"}
#: Sampler of ``auto`` when the folder's scheduler is DDPM (a training schedule, poor in few steps) or unknown;
#: kohya samples with DDIM by default too.
FALLBACK_SAMPLER = "ddim"
#: Prompt-file options → field of :class:`SamplePrompt`.
OPTIONS = {"n": "negative", "s": "steps", "l": "guidance", "d": "seed", "w": "width", "h": "height", "ss": "sampler"}


class PromptFileError(LorakitError):
    """A sample prompt file cannot be used; the message names the file, the line and the option."""


@dataclass(frozen=True)
class SamplePrompt:
    """One image to render.

    Attributes:
        prompt: the prompt text.
        negative: the negative prompt ("" for none).
        steps: denoising steps.
        guidance: classifier-free guidance scale (≤ 1 turns guidance off, as in diffusers).
        seed: seed of the initial latent noise.
        width, height: image size in pixels (multiples of 8).
        sampler: a key of :data:`SAMPLERS`, or ``auto``.
    """

    prompt: str
    negative: str = ""
    steps: int = 20
    guidance: float = 7.5
    seed: int = 0
    width: int = 512
    height: int = 512
    sampler: str = "auto"


def _value(name: str, text: str) -> Any:
    """The typed value of option ``--name`` (raises ValueError with the expectation on a bad one)."""
    if name == "n":
        return text
    if name == "ss":
        if text != "auto" and text not in SAMPLERS:
            raise ValueError(f"'auto' or one of {list(SAMPLERS)}")
        return text
    if name == "l":
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        if not (math.isfinite(v) and v >= 0):
            raise ValueError("a number >= 0")
        return v
    try:
        v = int(text)
    except ValueError:
        v = -1
    if name == "s" and v < 1:
        raise ValueError("an int >= 1")
    if name == "d" and v < 0:
        raise ValueError("an int >= 0")
    if name in ("w", "h") and (v < 8 or v % 8):
        raise ValueError("a multiple of 8, >= 8 (pixels)")
    return v


def parse_prompts(text: str, source: str | Path, *, steps: int = 20, guidance: float = 7.5, seed: int = 0,
                  width: int = 512, height: int = 512, sampler: str = "auto") -> list[SamplePrompt]:
    """The prompts of a kohya-syntax prompt file's text (see the module docstring); a pure function.

    Args:
        text: the file's text.
        source: the file's name, for messages.
        steps, guidance, width, height, sampler: defaults of the options a line leaves out.
        seed: the first prompt's default seed; the prompt with index i defaults to ``seed + i``.

    Raises:
        PromptFileError: an unknown or repeated option, a bad value, an empty prompt or no prompt at all; every
            bad line is listed, each with its line number and option, on one line.
    """
    prompts: list[SamplePrompt] = []
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        # kohya splits on " --"; a leading space lets a line start with an option (and so have no prompt text)
        prompt, *parts = (" " + line).split(" --")
        found: dict[str, Any] = {}
        bad = False
        for part in parts:
            name, _, value = part.strip().partition(" ")
            key, value = name.lower(), value.strip()
            where = f"{source}:{number}: option --{name}"
            if key not in OPTIONS:
                problems.append(f"{where}: unknown (known: {', '.join('--' + o for o in OPTIONS)})")
            elif key in found:
                problems.append(f"{where}: given twice")
            elif not value:
                problems.append(f"{where}: no value")
            else:
                try:
                    found[key] = _value(key, value)
                    continue
                except ValueError as e:
                    problems.append(f"{where}: expected {e}, got {value!r}")
            bad = True
        if not prompt.strip() and not bad:
            problems.append(f"{source}:{number}: no prompt text before the options")
            bad = True
        if bad:
            continue
        fields = {OPTIONS[k]: v for k, v in found.items()}
        fields.setdefault("seed", seed + len(prompts))
        prompts.append(SamplePrompt(prompt.strip(), **{"negative": "", "steps": steps, "guidance": float(guidance),
                                                       "width": width, "height": height, "sampler": sampler,
                                                       **fields}))
    if problems:
        raise PromptFileError("; ".join(problems))
    if not prompts:
        raise PromptFileError(f"{source}: no prompts (every line is blank or a # comment)")
    return prompts


def read_prompts(path: str | Path, **defaults: Any) -> list[SamplePrompt]:
    """:func:`parse_prompts` of the file at ``path`` (UTF-8); ``defaults`` as there.

    Raises:
        PromptFileError: the file cannot be read, is not UTF-8, or :func:`parse_prompts` refuses it.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PromptFileError(f"{path}: cannot read the sample prompt file (diffusion.sample_prompts): "
                              f"{e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: sample prompt file is not UTF-8 text ({e})") from None
    return parse_prompts(text, path, **defaults)


def scheduler_config(name: str) -> dict[str, Any]:
    """The ``scheduler/`` config of a diffusers folder or hub id, with its ``_class_name``."""
    from diffusers import DDPMScheduler

    return dict(DDPMScheduler.load_config(name, subfolder="scheduler"))


def sampler_class(config: dict[str, Any], sampler: str = "auto") -> type:
    """The diffusers scheduler class that renders with ``sampler`` (``auto``: the config's own class when it is
    one of :data:`SAMPLERS` other than DDPM, else :data:`FALLBACK_SAMPLER`).

    Raises:
        LorakitError: an unknown sampler name.
    """
    import diffusers

    if sampler == "auto":
        own = config.get("_class_name")
        usable = [c for c in SAMPLERS.values() if c != "DDPMScheduler"]
        class_name = own if own in usable else SAMPLERS[FALLBACK_SAMPLER]
    elif sampler in SAMPLERS:
        class_name = SAMPLERS[sampler]
    else:
        raise LorakitError(f"sampler {sampler!r}: expected 'auto' or one of {list(SAMPLERS)}")
    return getattr(diffusers, class_name)


def pipeline(model: nn.Module, tokenizer: Any, scheduler: Any) -> Any:
    """diffusers' pipeline around the live parts of ``model`` (a ``StableDiffusion`` or ``StableDiffusionXL``
    of :mod:`lorakit.train.tasks.diffusion`), no copies: adapters on the UNet or text encoders take part.

    Args:
        tokenizer: the task's tokenizer (a ``(tokenizer, tokenizer_2)`` pair for SDXL).
        scheduler: the sampler scheduler instance.
    """
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from lorakit.train.tasks.diffusion import StableDiffusionXL

    if isinstance(model, StableDiffusionXL):
        tok, tok_2 = tokenizer
        pipe = StableDiffusionXLPipeline(vae=model.vae, text_encoder=model.text_encoder,
                                         text_encoder_2=model.text_encoder_2, tokenizer=tok, tokenizer_2=tok_2,
                                         unet=model.unet, scheduler=scheduler, add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=model.vae, text_encoder=model.text_encoder, tokenizer=tokenizer,
                                       unet=model.unet, scheduler=scheduler, safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)  # the library never prints
    return pipe


def render(model: nn.Module, tokenizer: Any, prompts: Sequence[SamplePrompt], config: dict[str, Any]) -> list:
    """One PIL image per prompt, rendered by :func:`pipeline` on the model's device.

    Each prompt gets a fresh scheduler of its sampler (built from ``config``, the folder's scheduler config, so
    the noise schedule and prediction type are the model's) and its own CPU ``torch.Generator``: the initial
    noise, hence the image, is the same on every device and whatever was rendered before.

    The caller puts the model in eval mode; gradients are off here.
    """
    images = []
    with torch.no_grad():
        for p in prompts:
            cls = sampler_class(config, p.sampler)
            # PNDM's Runge-Kutta warm-up needs more steps than a preview has; SD's own PNDM config skips it (PLMS)
            pndm = cls.__name__ == "PNDMScheduler" and "skip_prk_steps" not in config
            extra = {"skip_prk_steps": True} if pndm else {}
            scheduler = cls.from_config(config, **extra)
            pipe = pipeline(model, tokenizer, scheduler)
            out = pipe(p.prompt, negative_prompt=p.negative or None, num_inference_steps=p.steps,
                       guidance_scale=p.guidance, width=p.width, height=p.height,
                       generator=torch.Generator().manual_seed(p.seed), output_type="pil")
            images.append(out.images[0])
    return images


def grid(images: Sequence[Any]) -> Any:
    """The images in a grid of ``ceil(sqrt(n))`` columns, row by row, each at the top left of a cell as large as
    the largest image (the rest black).

    Args:
        images: PIL images, any sizes.

    Returns:
        An RGB PIL image of (columns × max width) × (rows × max height) pixels.
    """
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    cell_w, cell_h = max(im.width for im in images), max(im.height for im in images)
    out = Image.new("RGB", (cols * cell_w, rows * cell_h))
    for i, im in enumerate(images):
        out.paste(im.convert("RGB"), ((i % cols) * cell_w, (i // cols) * cell_h))
    return out


def save_png(image: Any, path: str | Path) -> Path:
    """Write a PIL image as PNG, atomically (a sibling temporary file, then ``os.replace``)."""
    from lorakit.formats.atomic import atomic_write

    path = Path(path)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path


def write_samples(images: Sequence[Any], folder: str | Path, step: int) -> list[Path]:
    """``folder/step-000123.png`` (the :func:`grid`) and ``folder/step-000123/prompt-00.png`` … (one per prompt).

    Returns:
        The grid's path, then each prompt's.
    """
    folder = Path(folder)
    name = f"step-{step:06d}"
    each = [save_png(im, folder / name / f"prompt-{i:02d}.png") for i, im in enumerate(images)]
    return [save_png(grid(images), folder / f"{name}.png"), *each]


def task_sampler(cfg: Any, tokenizer: Any) -> Callable[[nn.Module, int, Path], list[Path]] | None:
    """The diffusion task's ``Task.sample``: render ``diffusion.sample_prompts`` into a folder at a step; None
    without a prompt file. The file is read now, so a bad one stops the run before training.

    Args:
        cfg: the run's :class:`lorakit.train.config.TrainConfig`.
        tokenizer: the task's tokenizer (a pair for SDXL).
    """
    d = cfg.diffusion
    if d.sample_prompts is None:
        return None
    prompts = read_prompts(d.sample_prompts, steps=d.sample_steps, guidance=d.sample_guidance, seed=cfg.run.seed,
                           width=d.resolution, height=d.resolution, sampler=d.sample_sampler)
    config = scheduler_config(cfg.model.name)

    def sample(model: nn.Module, step: int, folder: Path) -> list[Path]:
        return write_samples(render(model, tokenizer, prompts, config), folder, step)

    return sample


def generate(run_dir: str | Path, prompt: str, out: str | Path, *, negative: str = "", steps: int | None = None,
             guidance: float | None = None, seed: int = 0, width: int | None = None, height: int | None = None,
             strength: float = 1.0, blocks: str | None = None, which: str = "best", sampler: str | None = None,
             adapter: bool = True) -> Path:
    """Render one image with a finished diffusion run's adapter and write it as PNG (atomically).

    The base model is loaded from the run's ``config.yaml`` (``model.name``; the training images are not read),
    the run's ``adapter-<which>.safetensors`` attached at ``strength``, with per-block weights ``blocks``
    multiplying it.

    Args:
        run_dir: the run directory.
        prompt, negative: the prompt and negative prompt.
        steps, guidance, sampler: default the run's ``diffusion.sample_steps`` / ``sample_guidance`` /
            ``sample_sampler``.
        seed: seed of the initial noise.
        width, height: pixels (multiples of 8); default ``diffusion.resolution``.
        strength: the adapter's strength (0: the base model's image, exactly).
        blocks: an LBW string or preset over the family's blocks (``OUTALL``, ``1,0,0,…``; SD-1.5 presets are
            17-block), as :func:`lorakit.ops.control.set_block_strengths` reads it.
        which: ``best`` or ``last``.
        adapter: False renders the base model without the adapter (for comparisons).

    Returns:
        ``out``.

    Raises:
        RunDirError: not a run directory, or it has no such adapter (named).
        LorakitError: not a diffusion run, a bad option value, an unknown block preset (named).
    """
    from lorakit.formats import load
    from lorakit.inject import attach, lora_layers, set_strength
    from lorakit.ops.control import set_block_strengths
    from lorakit.train.config import load_config
    from lorakit.train.device import resolve_device
    from lorakit.train.loop import RunDirError
    from lorakit.train.tasks.diffusion import StableDiffusionXL, load_parts

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir}: not a run directory (no config.yaml)")
    if which not in ("best", "last"):
        raise LorakitError(f"option '--adapter': expected 'best' or 'last', got {which!r}")
    cfg = load_config(run_dir / "config.yaml")
    if cfg.task != "diffusion":
        raise RunDirError(f"{run_dir}: a {cfg.task!r} run; lorakit generate renders diffusion runs")
    d = cfg.diffusion
    defaults = {"steps": d.sample_steps, "guidance": d.sample_guidance, "width": d.resolution,
                "height": d.resolution, "sampler": d.sample_sampler}
    given = {"steps": steps, "guidance": guidance, "width": width, "height": height, "sampler": sampler,
             "seed": seed}
    letters = {"steps": "s", "guidance": "l", "width": "w", "height": "h", "sampler": "ss", "seed": "d"}
    for name, value in given.items():  # a prompt-file line's checks, naming the CLI option
        if value is not None:
            try:
                _value(letters[name], str(value))
            except ValueError as e:
                raise LorakitError(f"option '--{name}': expected {e}, got {value!r}") from None
    job = SamplePrompt(prompt, negative=negative, **{k: (v if v is not None else defaults.get(k)) for k, v in
                                                      given.items()})

    model, tokenizer, _ = load_parts(cfg.model.name)
    if adapter:
        file = run_dir / f"{'model' if cfg.lora.full_finetune else 'adapter'}-{which}.safetensors"
        if not file.is_file():
            raise RunDirError(f"{run_dir}: no {file.name} (has the run finished?)")
        if cfg.lora.full_finetune:
            if strength != 1.0 or blocks is not None:
                raise LorakitError(f"{run_dir}: a full fine-tune has no adapter to weaken (--strength, --blocks)")
            from lorakit.formats.safetensors_io import read_safetensors

            model.load_state_dict(read_safetensors(file)[0])
        else:
            attach(model, load(file))
            if any("default" in layer.lora for _, layer in lora_layers(model)):
                set_strength(model, "default", float(strength))
                if blocks is not None:
                    family = "sdxl" if isinstance(model, StableDiffusionXL) else "sd15"
                    weights = _block_weights(blocks, family)
                    set_block_strengths(model, {b: strength * w for b, w in weights.items()}, family=family)
            elif strength != 1.0 or blocks is not None:
                raise LorakitError(f"{file}: holds no LoRA modules (overrides only); --strength and --blocks "
                                   "cannot apply")
    model.to(resolve_device(cfg.run.device)).eval()
    (image,) = render(model, tokenizer, [job], scheduler_config(cfg.model.name))
    return save_png(image, out)


def _block_weights(blocks: str, family: str) -> dict[str, float]:
    """Block → weight of an LBW string or preset, the error naming the option."""
    from lorakit.blocks import parse_lbw

    try:
        return parse_lbw(blocks, family)
    except LorakitError as e:
        raise LorakitError(f"option '--blocks': {e}") from None
