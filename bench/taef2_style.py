"""Generative LoRA on real pre-trained weights: teach the TAEF2 decoder a visual style (issue 7, part 3).

The frozen TAEF2 encoder (real FLUX.2-latent weights, ``../shared/data/pretrained/taef2``) encodes CIFAR-10 images
bilinearly upsampled to 64×64; a conv LoRA (LoCon) on every decoder convolution learns ``decode(encode(x)) ≈
style(x)``, where the style is the deterministic *ink duotone* of :mod:`lorakit.models.style` (contrast curve,
4-tone posterisation, ink along edges, navy on cream). The base decoder reconstructs its input and cannot produce it.

Training images come from CIFAR-10 train; every figure is on held-out CIFAR-10 test images. The trained adapter is
switched per decoder level at run time (``lorakit.ops.control.set_block_strengths``, block family ``taef2``:
``DEC0``/``DEC1`` are the 1/8 and 1/4 resolution levels, ``DEC2``/``DEC3`` the 1/2 and full ones), saved in native
form, exported to kohya (``lora_unet_decoder_…`` keys, root ``unet``), and both files are read back and attached to
a fresh TAEF2, which must decode the same images to 1e-5.

Usage: ``python bench/taef2_style.py [--quick] [--threads N] [--steps N]``; writes ``bench/figures/taef2-style.png``,
``bench/sections/50-taef2-style.md`` and ``bench/taef2_style.json``, adapters under ``runs/taef2-style/``
(``--quick``: a smoke run, everything under ``runs/taef2-style-quick/``).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import textwrap
import time
from pathlib import Path

import torch

import lorakit as lk
from lorakit.formats import read_any, write
from lorakit.formats.safetensors_io import read_header
from lorakit.models.style import fit_decoder, images_to_tensor, ink_duotone, inject_decoder_locon, psnr
from lorakit.models.taef2 import load_taef2
from lorakit.ops.control import set_block_strengths
from lorakit.train.data import read_cifar10_jpg

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
#: Grid columns made by run-time block strengths: label → strength per decoder level.
STRENGTH_COLUMNS = {
    "low-res only (DEC0-1)": {"DEC0": 1.0, "DEC1": 1.0, "DEC2": 0.0, "DEC3": 0.0},
    "high-res only (DEC2-3)": {"DEC0": 0.0, "DEC1": 0.0, "DEC2": 1.0, "DEC3": 1.0},
    "all at 0.5": {"DEC0": 0.5, "DEC1": 0.5, "DEC2": 0.5, "DEC3": 0.5},
}
ALL_ON = {"DEC0": 1.0, "DEC1": 1.0, "DEC2": 1.0, "DEC3": 1.0}


def decode_batched(model: torch.nn.Module, z: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """Decoder outputs for latents ``z`` (N, 32, h, w) → (N, 3, 8h, 8w), clamped to [0, 1]."""
    with torch.no_grad():
        return torch.cat([model.decode(z[i:i + batch]) for i in range(0, len(z), batch)]).clamp(0, 1)


def encode_batched(model: torch.nn.Module, x: torch.Tensor, batch: int = 32) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model.encode(x[i:i + batch]) for i in range(0, len(x), batch)])


def save_grid(columns: dict[str, torch.Tensor], path: Path, scale: int = 2) -> None:
    """Columns of images (label → (R, 3, H, W) in [0, 1]) as one labelled PNG, one row per image."""
    from PIL import Image, ImageDraw

    labels = list(columns)
    rows, _, h, w = columns[labels[0]].shape
    tile_h, tile_w, header = h * scale, w * scale, 28
    canvas = Image.new("RGB", (tile_w * len(labels), header + tile_h * rows), "white")
    draw = ImageDraw.Draw(canvas)
    for c, label in enumerate(labels):
        # Long labels take two lines: the tiles are narrow.
        words = label.split(" ")
        lines = [label] if len(label) <= 18 else [" ".join(words[:len(words) // 2]), " ".join(words[len(words) // 2:])]
        for k, line in enumerate(lines):
            draw.text((c * tile_w + 3, 2 + 12 * k), line, fill="black")
        imgs = (columns[label].clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        for r in range(rows):
            tile = Image.fromarray(imgs[r]).resize((tile_w, tile_h), Image.NEAREST)
            canvas.paste(tile, (c * tile_w, header + r * tile_h))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: few steps, results under runs/ only")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: the machine is shared)")
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (default 160, quick 8)")
    parser.add_argument("--train-images", type=int, default=None, help="CIFAR-10 train images (default 1024)")
    parser.add_argument("--eval-images", type=int, default=None, help="held-out CIFAR-10 test images (default 128)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (multiple of 8)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    steps = args.steps if args.steps is not None else (8 if args.quick else 160)
    n_train = args.train_images or (64 if args.quick else 1024)
    n_eval = args.eval_images or (16 if args.quick else 128)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    out = ROOT / "runs" / ("taef2-style-quick" if args.quick else "taef2-style")
    out.mkdir(parents=True, exist_ok=True)
    figure = out / "taef2-style.png" if args.quick else HERE / "figures" / "taef2-style.png"
    section = out / "50-taef2-style.md" if args.quick else HERE / "sections" / "50-taef2-style.md"
    summary = out / "taef2_style.json" if args.quick else HERE / "taef2_style.json"

    t0 = time.perf_counter()
    train_u8, _ = read_cifar10_jpg("train")
    test_u8, _ = read_cifar10_jpg("test")
    # A fixed, class-mixed subset: CIFAR members are in tar order (grouped by class), so take an even stride.
    x_train = images_to_tensor(train_u8[:: len(train_u8) // n_train][:n_train], args.size)
    x_eval = images_to_tensor(test_u8[:: len(test_u8) // n_eval][:n_eval], args.size)
    y_train, y_eval = ink_duotone(x_train), ink_duotone(x_eval)

    model = load_taef2()
    z_train, z_eval = encode_batched(model, x_train), encode_batched(model, x_eval)
    base = decode_batched(model, z_eval)
    report = inject_decoder_locon(model, rank=args.rank, seed=args.seed)
    print(f"data + encoding {time.perf_counter() - t0:.1f}s; LoCon r={args.rank} on {len(report.modules)} decoder "
          f"convs, {report.trainable_params:,} trainable of {report.total_params:,}", flush=True)

    model.train()
    t1, c1 = time.perf_counter(), time.process_time()
    losses = fit_decoder(model, z_train, y_train, steps=steps, lr=args.lr, batch_size=args.batch_size,
                         seed=args.seed)
    train_s, train_cpu_s = time.perf_counter() - t1, time.process_time() - c1
    model.eval()
    print(f"trained {steps} steps in {train_s:.1f}s wall, {train_cpu_s:.1f}s CPU, "
          f"loss {losses[0]:.4f} → {losses[-1]:.4f}", flush=True)

    adapted = decode_batched(model, z_eval)
    variants = {}
    for label, strengths in STRENGTH_COLUMNS.items():
        set_block_strengths(model, strengths)
        variants[label] = decode_batched(model, z_eval)
    set_block_strengths(model, dict.fromkeys(ALL_ON, 0.0))
    off_diff = max_diff(decode_batched(model, z_eval), base)  # strength 0 everywhere must be the base
    set_block_strengths(model, ALL_ON)

    # Save, export, read back, attach to a fresh model: both files must decode like the trained model.
    adapter = lk.extract(model)
    native_path, kohya_path = out / "taef2-style.safetensors", out / "taef2-style.kohya.safetensors"
    write(adapter, native_path, "native")
    write(adapter, kohya_path, "kohya", root="unet")
    kohya_keys = list(read_header(kohya_path)[0])
    roundtrip = {}
    for dialect, path in (("native", native_path), ("kohya", kohya_path)):
        fresh = load_taef2()
        lk.attach(fresh, read_any(path, root="unet" if dialect == "kohya" else None))
        roundtrip[dialect] = max_diff(decode_batched(fresh, z_eval), adapted)
    ok = all(v <= 1e-5 for v in roundtrip.values()) and off_diff <= 1e-5
    ok = ok and all(k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha")) for k in kohya_keys)

    def mean_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
        return round(psnr(a, b).mean().item(), 2)

    rows = [("base decoder", mean_psnr(base, y_eval), mean_psnr(base, x_eval)),
            ("adapted (all levels)", mean_psnr(adapted, y_eval), mean_psnr(adapted, x_eval))]
    rows += [(f"adapter, {label}", mean_psnr(v, y_eval), mean_psnr(v, x_eval)) for label, v in variants.items()]
    for name, to_style, to_input in rows:
        print(f"{name:40s} PSNR to styled target {to_style:6.2f} dB, to input {to_input:6.2f} dB")
    print(f"round trip max |Δ|: {roundtrip}; all strengths 0 vs base: {off_diff:.2e}; ok={ok}")

    shown = torch.linspace(0, n_eval - 1, 6).round().long()  # spread over the classes (the split is class-ordered)
    save_grid({"input": x_eval[shown], "styled target": y_eval[shown], "base decode": base[shown],
               "adapted decode": adapted[shown], **{k: v[shown] for k, v in variants.items()}}, figure)

    command = "python bench/taef2_style.py" + (" --quick" if args.quick else "")
    result = {
        "command": command, "steps": steps, "batch_size": args.batch_size, "lr": args.lr, "rank": args.rank,
        "size": args.size, "train_images": n_train, "eval_images": n_eval, "threads": args.threads,
        "modules": len(report.modules), "trainable_params": report.trainable_params,
        "total_params": report.total_params, "train_seconds": round(train_s, 1),
        "train_cpu_seconds": round(train_cpu_s, 1),
        "loss_first": round(losses[0], 5), "loss_last": round(losses[-1], 5),
        "psnr": {name: {"to_style": s, "to_input": i} for name, s, i in rows},
        "roundtrip_max_abs_diff": roundtrip, "strength0_vs_base_max_abs_diff": off_diff,
        "kohya_tensors": len(kohya_keys), "figure": str(figure.relative_to(ROOT)), "ok": ok,
        "machine": f"{platform.machine()}, torch {torch.__version__}",
    }
    summary.write_text(json.dumps(result, indent=2) + "\n")
    section.write_text(render(result, rows, kohya_keys))
    print(f"wrote {figure}, {section}, {summary}")
    return 0 if ok else 1


def reflow(markdown: str, width: int = 116) -> str:
    """Re-wrap the prose paragraphs of ``markdown`` to ``width`` (headings and tables stay as they are)."""
    paragraphs = markdown.strip().split("\n\n")
    keep = ("#", "|")
    return "\n\n".join(p if p.startswith(keep) else textwrap.fill(" ".join(p.split()), width)
                       for p in paragraphs) + "\n"


def render(r: dict, rows: list[tuple[str, float, float]], kohya_keys: list[str]) -> str:
    """The markdown section for ``bench/results.md``."""
    table = "\n".join(f"| {name} | {s:.2f} | {i:.2f} |" for name, s, i in rows)
    example = next(k for k in kohya_keys if k.endswith(".lora_down.weight"))
    return reflow(f"""## Generative LoRA: a style for the TAEF2 decoder (`bench/taef2_style.py`)

Command: `{r["command"]}` ({r["threads"]} CPU thread, shared machine). The real pre-trained TAEF2 autoencoder
(FLUX.2 latent space) stays frozen; a conv LoRA (LoCon) of rank {r["rank"]} on all {r["modules"]} decoder
convolutions ({r["trainable_params"]:,} trainable parameters, {100 * r["trainable_params"] / r["total_params"]:.1f}% of
the model) learns `decode(encode(x)) ≈ style(x)`. The style is the deterministic *ink duotone* of
`lorakit.models.style` (contrast curve, 4-tone posterisation, ink along luminance edges, navy on cream). Training:
{r["train_images"]:,} CIFAR-10 train images at {r["size"]}×{r["size"]} px, {r["steps"]} Adam steps of
{r["batch_size"]}, lr {r["lr"]:g} with cosine decay, **{r["train_seconds"]:.0f} s** wall
({r["train_cpu_seconds"]:.0f} s of CPU time; the wall time includes waiting for other jobs on the machine); loss {r["loss_first"]:.4f} →
{r["loss_last"]:.4f}. PSNR is the mean over {r["eval_images"]} held-out CIFAR-10 test images.

| decoder | PSNR to styled target (dB) | PSNR to unstyled input (dB) |
| --- | --- | --- |
{table}

The per-level rows switch the trained adapter at run time with `set_block_strengths` (block family `taef2`,
`DEC0`–`DEC3` from the latent to full resolution); no retraining, no merge. Grid: `{r["figure"]}` (columns: input,
styled target, base decode, adapted decode, then the per-level strengths; rows: held-out images).

The adapter was saved in native form and exported to kohya (`{len(kohya_keys)}` tensors such as `{example}`); both
files, read back and attached to a fresh TAEF2, decode the held-out images like the trained model (max |Δ|
native {r["roundtrip_max_abs_diff"]["native"]:.1e}, kohya {r["roundtrip_max_abs_diff"]["kohya"]:.1e}), and strength
0 on every level gives the base decoder back (max |Δ| {r["strength0_vs_base_max_abs_diff"]:.1e}).
""")


if __name__ == "__main__":
    sys.exit(main())
