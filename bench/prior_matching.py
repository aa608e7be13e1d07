"""Prior matching: a Fashion-MNIST autoencoder pretrained on classes 0–4, LoRA-adapted to classes 5–9 with
reconstruction only vs reconstruction + sliced-Wasserstein prior matching.

The base is :func:`lorakit.models.fashion_ae.pretrained_fashion_ae` (a sliced-Wasserstein autoencoder, pretrained by
``lorakit train`` with task ``autoencoder``; trained once and cached). Each adaptation is a ``lorakit`` training run
(task ``autoencoder``, model ``fashion-ae``: the train split of classes 5–9) with LoRA on every conv and linear
layer of encoder and decoder; the ``recon+SW`` runs add ``ot: {tap: encoder, pair: prior}``. Same steps, same
seeds. Figures are on the 5,000 held-out test images of classes 5–9, which no run trains on:

* posterior SW: SW₂² (2,000 fixed directions) between the codes of the held-out images (their aggregate posterior)
  and as many N(0, I) samples; MMD² (IMQ kernel, 2,000 of each) beside it;
* sample Fréchet distance: the FID formula on the 128-d features of the Fashion-MNIST classifier
  (:func:`lorakit.models.fashion_cnn.pretrained_fashion_cnn`, no Inception weights offline) between 5,000 decoded
  prior samples and the 5,000 held-out images;
* reconstruction MSE per pixel.

Usage: ``python bench/prior_matching.py [--quick] [--jobs N]``; writes ``bench/sections/45-prior-matching.md`` and
``.json`` and ``bench/figures/prior-matching.png`` (``--quick``: a smoke run, results under ``runs/`` only).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "src"))

from lorakit import find_targets  # noqa: E402
from lorakit.models.fashion_ae import RECIPE, FashionAE, pretrained_fashion_ae  # noqa: E402
from lorakit.models.fashion_cnn import pretrained_fashion_cnn  # noqa: E402
from lorakit.regularizers import frechet_distance, mmd, sliced_wasserstein  # noqa: E402
from lorakit.train import TrainConfig, train  # noqa: E402
from lorakit.train.config import apply_overrides  # noqa: E402
from lorakit.train.data import read_fashion_mnist  # noqa: E402
from lorakit.train.tasks.autoencoder import BASE_CLASSES, NEW_CLASSES, class_images  # noqa: E402
from lorakit.train.tasks.fashion_mnist import pixels  # noqa: E402

RUNS = ROOT / "runs" / "prior-matching"
SEEDS = (0, 1, 2)
#: The adaptation run (LoRA on every conv and linear of encoder and decoder, the SW prior term); the
#: reconstruction-only variant is the same config with ``ot=null``.
CONFIG = ROOT / "configs" / "fmnist-ae-adapt-sw.yaml"
VARIANTS = {"recon-only": ["ot=null"], "recon+SW": []}
#: Evaluation settings: directions of the posterior SW, samples of the MMD, seed of the prior samples.
EVAL_PROJECTIONS, MMD_SAMPLES, EVAL_SEED = 2000, 2000, 1234
#: Images per row of the PNG grid.
GRID = 12


def adapt_config(variant: str, seed: int, out_dir: Path, quick: bool) -> dict[str, Any]:
    """The shipped adaptation config with this run's seed, folder and variant (and fewer steps for ``quick``)."""
    raw = yaml.safe_load(CONFIG.read_text(encoding="utf-8"))
    overrides = [f"run.seed={seed}", f"run.out_dir={out_dir}", *VARIANTS[variant]]
    if quick:
        overrides += ["optim.max_steps=20", "optim.warmup_steps=2", "data.train_rows=5000"]
    return apply_overrides(raw, overrides)


def held_out(quick: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Test images of the new classes and of the base classes: (N, 1, 28, 28) each, in [0, 1]."""
    images, labels = read_fashion_mnist("test")
    n = 1000 if quick else None
    return pixels(class_images(images, labels, NEW_CLASSES)[:n]), pixels(class_images(images, labels, BASE_CLASSES)[:n])


@torch.no_grad()
def measure(model: FashionAE, x: torch.Tensor, classifier: torch.nn.Module) -> tuple[dict[str, float], np.ndarray]:
    """The figures of one model on held-out images ``x`` (N, 1, 28, 28), and its rows of the PNG grid."""
    model.eval()
    z = torch.cat([model.encode(chunk) for chunk in x.split(1000)])  # (N, d) the aggregate posterior
    recon = torch.cat([model.decode(chunk) for chunk in z.split(1000)])
    g = torch.Generator().manual_seed(EVAL_SEED)
    prior = torch.randn(z.shape, generator=g)
    samples = torch.cat([model.decode(chunk) for chunk in prior.split(1000)])  # (N, 1, 28, 28)
    features = [torch.cat([classifier.embed(chunk) for chunk in imgs.split(1000)]) for imgs in (samples, x)]
    figures = {
        "posterior_sw": float(sliced_wasserstein(z, torch.randn(z.shape, generator=g),
                                                 num_projections=EVAL_PROJECTIONS, generator=g)),
        "posterior_mmd": float(mmd(z[:MMD_SAMPLES], prior[:MMD_SAMPLES])),
        "frechet": frechet_distance(*features),
        "mse": float((recon - x).pow(2).mean()),
    }
    rows = np.stack([recon[:GRID, 0].numpy(), samples[:GRID, 0].numpy()])  # (2, GRID, 28, 28)
    return figures, rows


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One adaptation run (in a worker process, one thread) and its figures."""
    torch.set_num_threads(1)
    out_dir = Path(job["config"]["run"]["out_dir"])
    shutil.rmtree(out_dir, ignore_errors=True)  # each run starts afresh
    t0 = time.perf_counter()
    result = train(TrainConfig.from_dict(job["config"]))
    seconds = time.perf_counter() - t0
    x, _ = held_out(job["quick"])
    figures, rows = measure(result.model, x, pretrained_fashion_cnn().eval())
    return {**job["key"], **figures, "train_seconds": seconds, "trainable": result.trainable_params,
            "total": result.total_params, "rows": rows}


def summarize(runs: list[dict[str, Any]], keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Per variant: mean and spread (sample standard deviation; 0 for one seed) of each figure over seeds."""
    out: dict[str, dict[str, float]] = {}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        for k in keys:
            values = [r[k] for r in mine]
            out.setdefault(variant, {})[k] = statistics.fmean(values)
            out[variant][k + "_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out


def figure(real: np.ndarray, rows: dict[str, np.ndarray], path: Path) -> None:
    """PNG grid: held-out images, then per model its reconstructions and its decoded prior samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labelled = [("held-out test images (classes 5-9)", real)]
    for name, r in rows.items():
        labelled += [(f"{name}: reconstructions", r[0]), (f"{name}: prior samples z~N(0,I)", r[1])]
    fig, axes = plt.subplots(len(labelled), 1, figsize=(GRID * 0.75, len(labelled) * 0.95))
    for ax, (label, imgs) in zip(axes, labelled):
        ax.imshow(np.concatenate(list(imgs), axis=1), cmap="gray", vmin=0, vmax=1)
        ax.set_title(label, fontsize=9, loc="left")
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def render(report: dict[str, Any]) -> str:
    def pm(stats: dict[str, float], k: str, fmt: str) -> str:
        return f"{stats[k]:{fmt}} ± {stats[k + '_sd']:{fmt}}"

    base, ctx, s = report["base"], report["context"], report["summary"]
    a, n = report["adapt"], len(report["seeds"])
    lines = [
        "## Prior matching: LoRA on a Fashion-MNIST autoencoder (`bench/prior_matching.py`)", "",
        f"A sliced-Wasserstein autoencoder (latent d = {report['latent_dim']}, {report['total_params']:,} "
        f"parameters), pretrained by `lorakit train` on classes 0-4 (`configs/fmnist-ae-pretrain.yaml`: "
        f"{RECIPE['steps']} steps, reconstruction + SW prior term, weight {RECIPE['sw_weight']}), then LoRA-adapted "
        f"to classes 5-9 (`configs/fmnist-ae-adapt-sw.yaml`): r = {a['rank']}, alpha = {a['alpha']:g} on all "
        f"{report['lora_modules']} convs and linears of encoder and decoder ({report['trainable']:,} trainable), "
        f"{a['max_steps']} steps of batch {a['batch_size']}, lr {a['lr']:g}, {a['schedule']}; recon+SW adds "
        f"`ot: {{tap: encoder, pair: prior, weight: {a['ot']['weight']:g}}}`; the same steps and seeds "
        f"({', '.join(map(str, report['seeds']))}) for both variants, mean ± sd over {n} seed{'s' * (n > 1)}. "
        "Figures on the "
        f"{report['held_out']:,} held-out test images of classes 5-9: posterior SW = SW₂² between their codes "
        f"and N(0, I) ({EVAL_PROJECTIONS} directions), MMD² (IMQ, {MMD_SAMPLES} codes), Fréchet distance of "
        f"{report['held_out']:,} decoded prior samples to the held-out images in the 128-d features of the "
        "Fashion-MNIST classifier (`pretrained_fashion_cnn`; no Inception weights offline), reconstruction MSE per "
        "pixel.", "",
        "| model | posterior SW ↓ | posterior MMD² ↓ | sample Fréchet ↓ | recon MSE ↓ | training time |",
        "| --- | --- | --- | --- | --- | --- |",
        f"| base (pretrained on 0-4, not adapted) | {base['posterior_sw']:.4f} | {base['posterior_mmd']:.4f} | "
        f"{base['frechet']:.1f} | {base['mse']:.4f} | – |",
    ]
    for variant in VARIANTS:
        st = s[variant]
        lines.append(f"| LoRA, {variant} | {pm(st, 'posterior_sw', '.4f')} | {pm(st, 'posterior_mmd', '.4f')} | "
                     f"{pm(st, 'frechet', '.1f')} | {pm(st, 'mse', '.4f')} | {st['train_seconds']:.0f} s |")
    better_sw = s["recon+SW"]["posterior_sw"] < s["recon-only"]["posterior_sw"]
    better_fd = s["recon+SW"]["frechet"] < s["recon-only"]["frechet"]
    wins = sum(r["posterior_sw"] < o["posterior_sw"] and r["frechet"] < o["frechet"]
               for r, o in zip(report["per_seed"]["recon+SW"], report["per_seed"]["recon-only"]))
    lines += [
        "",
        f"Prior matching gives {'lower' if better_sw else 'NOT lower'} posterior-to-prior SW and "
        f"{'lower' if better_fd else 'NOT lower'} sample Fréchet distance than reconstruction only (both lower on "
        f"{wins} of {n} seeds).",
        f"For scale: the base model on its own classes 0-4 has posterior SW {ctx['base_on_0_4']['posterior_sw']:.4f} "
        f"and Fréchet {ctx['base_on_0_4']['frechet']:.1f} (to test images 0-4); the Fréchet distance between "
        f"held-out 5-9 images and as many train images of 5-9 (the metric's floor at this size) is "
        f"{ctx['frechet_floor']:.1f}, and between test images of 0-4 and of 5-9 {ctx['frechet_0_4_vs_5_9']:.1f}.",
        "", "![prior matching samples](figures/prior-matching.png)", "",
        f"Rows: held-out images; then per model (seed {report['seeds'][0]}) reconstructions and decoded prior "
        "samples (the same z for every model).", "",
        f"Reproduce: `python bench/prior_matching.py` (part of `make experiments`; `--quick` for a smoke run). "
        f"Wall time {report['wall_seconds']:.0f} s with {report['jobs']} parallel jobs on {report['cpu']} "
        "(shared with other jobs, so an upper bound); the pretrained weights are cached under `runs/pretrained/`.",
    ]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 20 steps, 1,000 held-out images")
    parser.add_argument("--jobs", type=int, default=2, help="parallel training processes (one thread each)")
    args = parser.parse_args()
    t0 = time.perf_counter()
    torch.set_num_threads(1)
    seeds = SEEDS[:1] if args.quick else SEEDS
    runs_dir = RUNS.with_name(RUNS.name + "-quick") if args.quick else RUNS

    t_pre = time.perf_counter()
    base_model = pretrained_fashion_ae()  # trains and caches the base on first use
    pretrain_seconds = time.perf_counter() - t_pre
    classifier = pretrained_fashion_cnn().eval()
    x_new, x_base = held_out(args.quick)
    base, base_rows = measure(base_model, x_new, classifier)
    on_base_classes, _ = measure(base_model, x_base, classifier)
    with torch.no_grad():
        train_images, train_labels = read_fashion_mnist("train")
        x_train_new = pixels(class_images(train_images, train_labels, NEW_CLASSES)[:len(x_new)])
        embed = [torch.cat([classifier.embed(c) for c in imgs.split(1000)]) for imgs in (x_new, x_train_new, x_base)]
    context = {"base_on_0_4": on_base_classes, "frechet_floor": frechet_distance(embed[0], embed[1]),
               "frechet_0_4_vs_5_9": frechet_distance(embed[2], embed[0])}

    jobs = [{"key": {"variant": v, "seed": seed}, "quick": args.quick,
             "config": adapt_config(v, seed, runs_dir / f"{v}-s{seed}", args.quick)}
            for seed in seeds for v in VARIANTS]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        runs = list(pool.map(run_one, jobs))
    keys = ("posterior_sw", "posterior_mmd", "frechet", "mse", "train_seconds")
    rows = {"base": base_rows, **{f"LoRA {r['variant']}": r["rows"] for r in runs if r["seed"] == seeds[0]}}
    report = {
        "adapt": {**jobs[-1]["config"]["lora"], **jobs[-1]["config"]["optim"], "ot": jobs[-1]["config"]["ot"]},
        "pretrain": RECIPE, "variants": VARIANTS, "config": str(CONFIG.relative_to(ROOT)), "seeds": list(seeds),
        "quick": args.quick,
        "latent_dim": base_model.latent_dim, "total_params": sum(p.numel() for p in base_model.parameters()),
        "lora_modules": len(find_targets(FashionAE(), jobs[0]["config"]["lora"]["targets"])),
        "trainable": runs[0]["trainable"],
        "held_out": len(x_new), "base": base, "context": context, "summary": summarize(runs, keys),
        "per_seed": {v: [{k: r[k] for k in ("seed", *keys)} for r in runs if r["variant"] == v] for v in VARIANTS},
        "pretrain_seconds_this_run": pretrain_seconds, "jobs": args.jobs,
        "cpu": platform.processor() or platform.machine(), "wall_seconds": time.perf_counter() - t0,
    }
    if args.quick:
        figure(x_new[:GRID, 0].numpy(), rows, runs_dir / "prior-matching.png")
        (runs_dir / "quick.json").write_text(json.dumps(report, indent=2))
        print(render(report))
        return 0
    figure(x_new[:GRID, 0].numpy(), rows, HERE / "figures" / "prior-matching.png")
    (HERE / "sections" / "45-prior-matching.json").write_text(json.dumps(report, indent=2) + "\n")
    (HERE / "sections" / "45-prior-matching.md").write_text(render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
