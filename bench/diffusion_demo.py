"""Diffusion LoRA, demonstrated offline (issue 13, item 6): a LoRA teaches lorakit's own pretrained latent diffusion
model a concept it never saw and a style, from 100 images each.

The base (``lorakit.models.fashion_ldm``): a text-conditional UNet pretrained by lorakit's loop on 64×64
Fashion-MNIST classes 0–7 in the latent space of the real TAEF2 autoencoder, conditioned on the real MiniLM-L6
sentence encoder, in the Stable Diffusion folder layout. The LoRA runs are ``lorakit train`` on
``configs/diffusion-concept.yaml`` (100 ankle boots, class 9, captioned "a photo of an ankle boot") and
``configs/diffusion-style.yaml`` (100 images of classes 0–7 in the ink-duotone style, captioned "…, ink style"), three
seeds each. Samples come from diffusers' own ``StableDiffusionPipeline`` (DDIM, classifier-free guidance) over the
live model with the adapter attached; strengths and per-block strengths are set at run time.

Figures, in the features of the pretrained Fashion-MNIST CNN (``lorakit.models.fashion_cnn``; images converted to
grey and resized to 28×28): the Fréchet distance between samples and real held-out test images, the CNN's accuracy
on the samples (the prompt's class), and for the style the "ink distance" (mean RGB distance of a pixel to the
ink–paper line of the duotone: 0 for the style, about 0.2 for grey images). Per-block rows switch on only the UNet's
down (IN), middle (M00) or up (OUT) blocks.

Usage: ``python bench/diffusion_demo.py [--quick] [--prepare] [--seeds 0 1 2] [--samples 256]``; writes
``bench/sections/60-diffusion.md`` and ``.json`` and ``bench/figures/diffusion-{concept,style}.png``
(``--quick``: a smoke run, results under ``runs/`` only; ``--prepare``: only build the model and image folders).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNS = ROOT / "runs" / "diffusion-demo"
SEEDS = (0, 1, 2)
#: Sampling: DDIM steps and classifier-free guidance scale.
STEPS, GUIDANCE = 25, 4.0
#: Per-block rows: which LBW blocks of the 3-level UNet (the SDXL numbering) are switched on.
BLOCK_ROWS = {"IN only": "IN", "M00 only": "M00", "OUT only": "OUT"}
STYLE_WORDS = "ink style"


def prepare(model: Path | None = None) -> Path:
    """Build (once) the pretrained model folder (unless ``model`` names one) and the two image folders; returns
    the model folder."""
    from lorakit.models.fashion_ldm import BASE_CLASSES, CONCEPT_CLASS, base_images, caption, pretrained_fashion_ldm, \
        write_image_folder
    from lorakit.models.style import ink_duotone

    folder = model or pretrained_fashion_ldm()
    concept = RUNS / "data" / "concept"
    if not concept.is_dir():
        images, labels = base_images(per_class=100, classes=(CONCEPT_CLASS,), seed=1)
        write_image_folder(concept, images, [caption(c) for c in labels], subfolder="1_ankle_boot")
    style = RUNS / "data" / "style"
    if not style.is_dir():
        images, labels = base_images(per_class=13, classes=BASE_CLASSES, seed=2)  # 104 → the first 100
        images, labels = ink_duotone(images[:100]), labels[:100]
        write_image_folder(style, images, [f"{caption(c)}, {STYLE_WORDS}" for c in labels], subfolder="1_ink")
    return folder


class Judge:
    """The pretrained Fashion CNN as the measuring instrument: features, class predictions, Fréchet distance."""

    def __init__(self) -> None:
        from lorakit.models.fashion_cnn import pretrained_fashion_cnn

        self.cnn = pretrained_fashion_cnn().eval()

    @staticmethod
    def grey28(images: torch.Tensor) -> torch.Tensor:
        """(N, 3, 64, 64) RGB in [0, 1] → (N, 1, 28, 28) luminance, area-resized."""
        luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        return F.interpolate((images * luma).sum(1, keepdim=True), size=28, mode="area")

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cnn.embed(self.grey28(b)) for b in images.split(256)])

    @torch.no_grad()
    def accuracy(self, images: torch.Tensor, labels: list[int]) -> float:
        pred = torch.cat([self.cnn(self.grey28(b)).argmax(1) for b in images.split(256)])
        return float((pred == torch.tensor(labels)).float().mean())

    def frechet(self, images: torch.Tensor, reference: torch.Tensor) -> float:
        from lorakit.regularizers.frechet import frechet_distance

        return frechet_distance(self.features(images).double(), reference.double())


def ink_distance(images: torch.Tensor) -> float:
    """Mean distance of each pixel's RGB to the ink–paper segment of the duotone (0 for the style)."""
    from lorakit.models.style import InkDuotone

    s = InkDuotone()
    ink, paper = torch.tensor(s.ink).view(1, 3, 1, 1), torch.tensor(s.paper).view(1, 3, 1, 1)
    d = paper - ink
    t = (((images - ink) * d).sum(1, keepdim=True) / d.pow(2).sum()).clamp(0, 1)
    return float((images - (ink + t * d)).norm(dim=1).mean())


def make_pipeline(folder: Path):
    """(StableDiffusionPipeline over the live parts, the StableDiffusion module the adapter attaches to)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    from lorakit.train.tasks.diffusion import load_parts

    sd, tokenizer, _ = load_parts(str(folder))
    sd.eval()
    pipe = StableDiffusionPipeline(vae=sd.vae, text_encoder=sd.text_encoder, tokenizer=tokenizer, unet=sd.unet,
                                   scheduler=DDIMScheduler.from_pretrained(str(folder), subfolder="scheduler"),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe, sd


@torch.no_grad()
def sample(pipe, prompts: list[str], seed: int, batch: int = 128) -> torch.Tensor:
    """(N, 3, 64, 64) images in [0, 1] for ``prompts``, one fixed generator per call (same seed → same noise)."""
    g = torch.Generator().manual_seed(seed)
    out = [pipe(prompts[i:i + batch], num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=64, width=64,
                generator=g, output_type="pt").images for i in range(0, len(prompts), batch)]
    return torch.cat(out).clamp(0, 1)


def real_sets(judge: Judge, n: int) -> dict[str, Any]:
    """Reference features of held-out real test images: the concept class, the base classes, the base classes
    styled; and the Fréchet floor of the autoencoder itself (real images through TAEF2 and back)."""
    from lorakit.models.fashion_ldm import BASE_CLASSES, CONCEPT_CLASS, base_images
    from lorakit.models.style import ink_duotone
    from lorakit.models.taef2_vae import pretrained_taef2_vae

    concept, _ = base_images("test", per_class=1000, classes=(CONCEPT_CLASS,))
    base, base_labels = base_images("test", per_class=125, classes=BASE_CLASSES)
    styled = ink_duotone(base)
    vae = pretrained_taef2_vae()
    with torch.no_grad():
        recon = torch.cat([vae(b * 2 - 1) for b in concept[:n].split(128)]).add(1).div(2).clamp(0, 1)
    ref = {"concept": judge.features(concept), "base": judge.features(base), "styled": judge.features(styled)}
    return {"features": ref, "base_labels": base_labels,
            "floor_concept": judge.frechet(recon, ref["concept"]),
            "real_concept_acc": judge.accuracy(concept, [CONCEPT_CLASS] * len(concept)),
            "ink_real_styled": ink_distance(styled[:n]), "ink_real_base": ink_distance(base[:n])}


def block_strengths(only: str) -> dict[str, float]:
    from lorakit.blocks import block_vocabulary

    return {b: (1.0 if b.startswith(only) else 0.0) for b in block_vocabulary("sdxl") if b not in ("BASE", "OTHER")}


def train_run(study: str, folder: Path, seed: int, quick: bool) -> tuple[Path, float]:
    """Train (once: a finished run of the same study, model, mode and seed is reused) and return the last adapter
    and the run's wall time in seconds."""
    from lorakit.train import train
    from lorakit.train.config import load_config

    # the folder names everything the adapter depends on, so a smoke run is never taken for a full one
    out = RUNS / f"{study}-{folder.name}{'-quick' if quick else ''}-s{seed}"
    sets = [f"run.seed={seed}", f"run.out_dir={out}", f"model.name={folder}",
            f"data.path={RUNS / 'data' / study}"] + (["optim.max_steps=20", "run.eval_every=10"] if quick else [])
    cfg = load_config(ROOT / "configs" / f"diffusion-{study}.yaml", sets)
    if not (out / "adapter-last.safetensors").is_file():
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        train(cfg)
    return out / "adapter-last.safetensors", run_seconds(out)


def run_seconds(run_dir: Path) -> float:
    """Wall time of a finished training run: its config is written first, its last adapter last."""
    last = run_dir / "adapter-last.safetensors"
    return last.stat().st_mtime - (run_dir / "config.yaml").stat().st_mtime if last.is_file() else float("nan")


def evaluate(study: str, folder: Path, adapter_path: Path, seed: int, n: int, judge: Judge, real: dict[str, Any],
             grids: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Every figure of one seed of one study."""
    import lorakit as lk
    from lorakit.models.fashion_ldm import BASE_CLASSES, CONCEPT_CLASS, caption
    from lorakit.ops.control import set_block_strengths

    pipe, sd = make_pipeline(folder)
    feats = real["features"]
    per = max(1, n // len(BASE_CLASSES))
    base_labels = [c for c in BASE_CLASSES for _ in range(per)]
    plain = [caption(c) for c in base_labels]
    if study == "concept":
        target, target_labels, target_ref = [caption(CONCEPT_CLASS)] * n, [CONCEPT_CLASS] * n, feats["concept"]
    else:
        target, target_labels, target_ref = [f"{p}, {STYLE_WORDS}" for p in plain], base_labels, feats["styled"]

    def figures(images: torch.Tensor, labels: list[int], ref: torch.Tensor) -> dict[str, float]:
        return {"frechet": judge.frechet(images, ref), "accuracy": judge.accuracy(images, labels),
                "ink": ink_distance(images)}

    r: dict[str, Any] = {}
    t0 = time.perf_counter()
    base_target = sample(pipe, target, seed)
    base_plain = sample(pipe, plain, seed + 100)
    r["base"] = figures(base_target, target_labels, target_ref)
    r["base_preserve"] = figures(base_plain, base_labels, feats["base"])
    lk.attach(sd, lk.load(adapter_path))
    lora_target = sample(pipe, target, seed)
    r["lora"] = figures(lora_target, target_labels, target_ref)
    grids.setdefault("base", base_target[:8])
    grids.setdefault("LoRA", lora_target[:8])
    r["lora_preserve"] = figures(sample(pipe, plain, seed + 100), base_labels, feats["base"])
    lk.set_strength(sd, "default", 0.0)
    zero_plain = sample(pipe, plain, seed + 100)
    r["zero_preserve"] = figures(zero_plain, base_labels, feats["base"])
    r["zero_max_diff"] = float((zero_plain - base_plain).abs().max())  # strength 0 is the base, exactly
    rows = {}
    for row, only in BLOCK_ROWS.items():
        set_block_strengths(sd, block_strengths(only), family="sdxl")
        images = sample(pipe, target, seed)
        rows[row] = figures(images, target_labels, target_ref)
        grids.setdefault(row, images[:8])
    r["blocks"] = rows
    r["eval_s"] = time.perf_counter() - t0
    return r


def save_grid(rows: dict[str, torch.Tensor], path: Path, scale: int = 2) -> None:
    from PIL import Image, ImageDraw

    names = list(rows)
    n = max(len(v) for v in rows.values())
    side, label_w = 64 * scale, 90
    canvas = Image.new("RGB", (label_w + n * side, len(names) * side), "white")
    draw = ImageDraw.Draw(canvas)
    for i, name in enumerate(names):
        draw.text((4, i * side + side // 2 - 6), name, fill="black")
        for j, img in enumerate(rows[name]):
            arr = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            canvas.paste(Image.fromarray(arr).resize((side, side), Image.NEAREST), (label_w + j * side, i * side))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def mean_sd(values: list[float], fmt: str = "{:.1f}") -> str:
    m = statistics.mean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{fmt.format(m)} ± {fmt.format(s)}"


def render(results: dict[str, Any]) -> str:
    meta, real = results["meta"], results["real"]
    lines = ["## Diffusion LoRA: a concept and a style taught to lorakit's own pretrained latent diffusion model", "",
             f"`{meta['command']}` — {meta['threads']} CPU threads, {meta['machine']}, seeds {meta['seeds']}, "
             f"{meta['samples']} samples per figure, DDIM {STEPS} steps, guidance {GUIDANCE}. Base: "
             f"`{meta['model']}` (UNet {meta['unet_params'] / 1e6:.1f} M parameters, pretrained by lorakit on "
             "Fashion-MNIST classes 0–7 at 64×64 in TAEF2's FLUX.2 latent space, MiniLM-L6 text encoder; "
             f"pretraining {meta['pretrain']}). LoRA: {meta['lora']}, through "
             "`lorakit train configs/diffusion-<study>.yaml`. "
             "Mean ± standard deviation over the seeds; Fréchet distance and accuracy in the pretrained Fashion "
             "CNN's 128-d features (lower Fréchet is closer to the real held-out images).", ""]
    for study, title in (("concept", "Concept: \"a photo of an ankle boot\" (class 9, never in pretraining)"),
                         ("style", "Style: \"a photo of a <class>, ink style\" (ink duotone)")):
        runs = results["studies"].get(study)
        if not runs:
            continue
        ink = study == "style"
        col = "ink distance" if ink else "CNN accuracy (class 9)"
        key = "ink" if ink else "accuracy"
        fmt = "{:.3f}" if ink else "{:.1%}"
        lines += [f"### {title}", "", f"| model | Fréchet to real targets | {col} |", "| --- | --- | --- |"]
        for label, k in (("base (no LoRA)", "base"), ("LoRA, strength 1", "lora")):
            lines.append(f"| {label} | {mean_sd([r[k]['frechet'] for r in runs])} | "
                         f"{mean_sd([r[k][key] for r in runs], fmt)} |")
        for row in BLOCK_ROWS:
            lines.append(f"| LoRA, {row} | {mean_sd([r['blocks'][row]['frechet'] for r in runs])} | "
                         f"{mean_sd([r['blocks'][row][key] for r in runs], fmt)} |")
        lines += ["", "Base preservation (prompts of the pretraining classes, Fréchet to real test images of classes "
                  "0–7, CNN accuracy of the prompt's class, ink distance):", "",
                  "| model | Fréchet | accuracy | ink distance |", "| --- | --- | --- | --- |"]
        for label, k in (("base", "base_preserve"), ("LoRA at strength 0", "zero_preserve"),
                         ("LoRA at strength 1", "lora_preserve")):
            lines.append(f"| {label} | {mean_sd([r[k]['frechet'] for r in runs])} | "
                         f"{mean_sd([r[k]['accuracy'] for r in runs], '{:.1%}')} | "
                         f"{mean_sd([r[k]['ink'] for r in runs], '{:.3f}')} |")
        zero = max(r["zero_max_diff"] for r in runs)
        lines += ["", f"Strength 0 against the base, largest pixel difference over all samples: {zero:.1e}. Run "
                  f"times: training {mean_sd([r['train_s'] for r in runs], '{:.0f}')} s, figures "
                  f"{mean_sd([r['eval_s'] for r in runs], '{:.0f}')} s per seed. Samples: "
                  f"`bench/figures/diffusion-{study}.png` (seed {meta['seeds'][0]}; rows base, LoRA, per-block).", ""]
    lines += [f"References: the autoencoder's own floor (real ankle boots through TAEF2 and back) is Fréchet "
              f"{real['floor_concept']:.1f}; the CNN classifies {real['real_concept_acc']:.1%} of real test ankle "
              f"boots as ankle boots; ink distance of real styled images {real['ink_real_styled']:.3f}, of real grey "
              f"ones {real['ink_real_base']:.3f}.", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prepare", action="store_true")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(SEEDS))
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--studies", nargs="+", default=["concept", "style"])
    ap.add_argument("--model", type=Path, help="a model folder instead of the pretrained one (smoke tests)")
    args = ap.parse_args()
    folder = prepare(args.model)
    if args.prepare:
        print(folder)
        return 0
    n = 16 if args.quick else args.samples
    judge = Judge()
    real = real_sets(judge, n)
    run_dir = folder.parent / f"{folder.name}-run"
    evals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line] if (run_dir / "metrics.jsonl").is_file() else []
    pretrain_s = run_seconds(run_dir)
    from diffusers import UNet2DConditionModel

    unet_params = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(folder, subfolder="unet").parameters())
    results: dict[str, Any] = {"meta": {
        "command": "python bench/diffusion_demo.py " + " ".join(sys.argv[1:]), "threads": torch.get_num_threads(),
        "machine": platform.machine(), "seeds": args.seeds, "samples": n, "model": folder.name,
        "unet_params": unet_params,
        "pretrain": (f"{pretrain_note()}; {pretrain_s / 60:.0f} min, eval loss "
                     + " → ".join(f"{e['eval_loss']:.3f}" for e in evals[:1] + evals[-1:])),
        "lora": lora_note()},
        "real": {k: v for k, v in real.items() if k not in ("features", "base_labels")}, "studies": {}}
    for study in args.studies:
        grids: dict[str, torch.Tensor] = {}
        runs = []
        for seed in args.seeds:
            adapter, train_s = train_run(study, folder, seed, args.quick)
            r = evaluate(study, folder, adapter, seed, n, judge, real, grids)
            r["train_s"] = train_s
            runs.append(r)
            print(f"{study} seed {seed}: base {r['base']} lora {r['lora']} ({train_s:.0f}+{r['eval_s']:.0f} s)",
                  flush=True)
        results["studies"][study] = runs
        figure = (RUNS if args.quick else HERE / "figures") / f"diffusion-{study}.png"
        save_grid(grids, figure)
    text = render(results)
    out = RUNS if args.quick else HERE / "sections"
    out.mkdir(parents=True, exist_ok=True)
    (out / "60-diffusion.md").write_text(text)
    (out / "60-diffusion.json").write_text(json.dumps(results, indent=1, default=float))
    print(text)
    return 0


def pretrain_note() -> str:
    """The pretraining recipe in words, from :data:`lorakit.models.fashion_ldm.RECIPE`."""
    from lorakit.models.fashion_ldm import BASE_CLASSES, RECIPE as r

    return (f"{r['steps']:,} steps of batch {r['batch_size']} on {r['images_per_class'] * len(BASE_CLASSES):,} "
            f"images through `lorakit.train`, lr {r['lr']:g}, min-SNR γ {r['min_snr_gamma']:g}, EMA "
            f"{r['ema_decay']:g}")


def lora_note() -> str:
    """The LoRA runs' recipe in words, from ``configs/diffusion-concept.yaml`` (the style config has the same)."""
    from lorakit.train.config import load_config

    cfg = load_config(ROOT / "configs" / "diffusion-concept.yaml", [])
    conv = next(iter(cfg.lora.ranks.values()), cfg.lora.rank)
    return (f"rank {cfg.lora.rank} on attention/feed-forward, LoCon rank {conv} on the ResNet convs, "
            f"{cfg.optim.max_steps} steps of batch {cfg.optim.batch_size} at lr {cfg.optim.lr:g} from 100 images")

if __name__ == "__main__":
    raise SystemExit(main())
