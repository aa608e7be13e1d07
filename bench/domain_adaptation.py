"""Unsupervised domain adaptation with LoRA + latent OT on Fashion-MNIST (issue 7, part 5).

Source: labelled Fashion-MNIST train (a fixed 5,000-image validation split held out). Target: the test split under a
deterministic corruption, cut into an unlabelled adaptation half and a held-out evaluation half. Base: the pretrained
FashionCNN (``lorakit.models.fashion_cnn.pretrained_fashion_cnn``). Every method is a real ``lorakit.train.train(cfg)``
run with LoRA on every conv and linear layer:

* ``source-only``: the base, no training;
* ``lora``: LoRA trained on the source loss alone;
* ``lora+sw`` / ``lora+sinkhorn`` / ``lora+deepjdot``: plus the OT term between the features tapped at ``features``
  on a source batch and on an unlabelled target batch (``ot.pair: domain``).

Weight selection never reads a target label: on seed 0, each OT method trains once per weight of its grid, and the
**largest weight whose source-validation accuracy stays within ``TOLERANCE`` of the LoRA-alone run** (same seed) is
kept for every seed. The reasoning is the domain-adaptation bound (target error ≤ source error + divergence + λ):
align as strongly as the source task allows. Target accuracy is measured on the held-out half only, for reporting.

Usage: ``python bench/domain_adaptation.py [--quick] [--jobs N]``; writes ``bench/sections/40-domain-adaptation.md``
and ``.json`` (``--quick``: a smoke run, results under ``runs/`` only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RUNS = ROOT / "runs" / "domain-adaptation"

CORRUPTIONS = ("contrast-noise", "blur", "invert")
#: OT methods: (divergence, weight grid). The weights are in normalised units (W₂²/d, see lorakit.regularizers.ot).
METHODS = {
    "lora+sw": ("sliced", (3.0, 10.0)),
    "lora+sinkhorn": ("sinkhorn", (3.0, 10.0)),
    "lora+deepjdot": ("deepjdot", (0.3, 1.0)),
}
SEEDS = (0, 1, 2)
#: Source-validation accuracy an OT weight may lose against LoRA alone and still be selected (fraction).
TOLERANCE = 0.02
#: The recipe shared by every method: LoRA rank (alpha = 2·rank), AdamW learning rate, optimiser steps.
RANK, LR, STEPS = 16, 1e-2, 300


def base_config(corruption: str, seed: int, out_dir: Path, quick: bool) -> dict[str, Any]:
    """The shared recipe: ``RANK`` LoRA on every conv and linear, AdamW, ``STEPS`` steps on a source subset."""
    return {
        "task": "fashion-mnist",
        "model": {"name": "fashion-cnn", "num_labels": 10},
        "data": {"dataset": "fashion-mnist", "train_rows": 2000 if quick else 10000, "eval_rows": 2000,
                 "target": {"corruption": corruption, "rows": 5000, "eval_rows": 1000 if quick else 2000,
                            "batch_size": 64}},
        "lora": {"targets": ["all-conv", "all-linear"], "rank": RANK, "alpha": 2 * RANK},
        "optim": {"lr": LR, "batch_size": 64, "max_steps": 20 if quick else STEPS, "warmup_steps": 10,
                  "schedule": "cosine", "max_grad_norm": 5.0},
        "run": {"out_dir": str(out_dir), "seed": seed, "eval_before": False, "log_every": 20},
    }


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """One training run in a worker process (one thread): the final source and target metrics. A finished run with
    the same resolved config in the run folder is reused (so an interrupted experiment picks up where it stopped)."""
    import torch

    from lorakit.train import TrainConfig, train

    torch.set_num_threads(1)
    cfg = TrainConfig.from_dict(job["config"])
    out = Path(cfg.run.out_dir)
    done = finished(out, cfg)
    if done is not None:
        return {**job["key"], **done, "reused": True}
    shutil.rmtree(out, ignore_errors=True)
    result = train(cfg)
    ot_terms = [r["ot_loss"] for r in result.history if r["kind"] == "train" and "ot_loss" in r]
    record = {"source_accuracy": result.final_metrics["accuracy"],
              "target_accuracy": result.final_metrics["target_accuracy"], "seconds": result.seconds,
              "last_ot_loss": ot_terms[-1] if ot_terms else None}
    (out / "result.json").write_text(json.dumps(record))
    return {**job["key"], **record}


def finished(out: Path, cfg: Any) -> dict[str, Any] | None:
    """The final figures of a completed run of ``cfg`` in ``out``, or None."""
    import yaml

    try:
        same = yaml.safe_load((out / "config.yaml").read_text()) == cfg.to_dict()
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    except (OSError, ValueError):
        return None
    evals = [r for r in records if r["kind"] == "eval" and r["step"] == cfg.optim.max_steps]
    if not same or not evals:
        return None
    ot_terms = [r["ot_loss"] for r in records if r["kind"] == "train" and "ot_loss" in r]
    saved = json.loads((out / "result.json").read_text()) if (out / "result.json").is_file() else {}
    return {"source_accuracy": evals[-1]["accuracy"], "target_accuracy": evals[-1]["target_accuracy"],
            "seconds": saved.get("seconds"), "last_ot_loss": ot_terms[-1] if ot_terms else None}


def job(corruption: str, method: str, weight: float | None, seed: int, quick: bool) -> dict[str, Any]:
    name = f"{method}-w{weight}-s{seed}" if weight is not None else f"{method}-s{seed}"
    cfg = base_config(corruption, seed, RUNS / corruption / name, quick)
    if weight is not None:
        cfg["ot"] = {"tap": "features", "divergence": METHODS[method][0], "weight": weight, "pair": "domain",
                     "warmup_steps": 20 if not quick else 2}
    return {"key": {"corruption": corruption, "method": method, "weight": weight, "seed": seed}, "config": cfg}


def base_metrics(corruption: str, quick: bool) -> dict[str, float]:
    """Source-only: the pretrained CNN evaluated as it is on the source validation and target evaluation sets."""
    import torch

    from lorakit.train import TrainConfig
    from lorakit.train.tasks import build_task

    task = build_task(TrainConfig.from_dict(base_config(corruption, 0, RUNS / "unused", quick)))
    with torch.no_grad():
        m = task.evaluate(task.model.eval(), task.eval_set)
    return {"source_accuracy": m["accuracy"], "target_accuracy": m["target_accuracy"]}


def run_all(jobs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    if workers == 1:
        return [run_one(j) for j in jobs]
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(run_one, jobs))


def select(results: list[dict[str, Any]], corruption: str, method: str) -> float:
    """The largest grid weight whose seed-0 source-validation accuracy is within TOLERANCE of LoRA alone's."""
    ref = next(r["source_accuracy"] for r in results
               if (r["corruption"], r["method"], r["seed"]) == (corruption, "lora", 0))
    ok = [r["weight"] for r in results if (r["corruption"], r["method"], r["seed"]) == (corruption, method, 0)
          and r["source_accuracy"] >= ref - TOLERANCE]
    return max(ok) if ok else min(METHODS[method][1])


def summary(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values),
            "std": statistics.pstdev(values) if len(values) > 1 else 0.0}


def pct(s: dict[str, float]) -> str:
    return f"{100 * s['mean']:.1f} ({100 * s['min']:.1f}..{100 * s['max']:.1f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke run: one corruption, fewer steps, 2 seeds")
    parser.add_argument("--jobs", type=int, default=2, help="parallel training processes (one thread each)")
    args = parser.parse_args()
    import torch

    from lorakit.models.fashion_cnn import pretrained_fashion_cnn

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    pretrained_fashion_cnn()  # trained and cached once, before the workers start
    t_pre = time.perf_counter() - t0
    corruptions = CORRUPTIONS[-1:] if args.quick else CORRUPTIONS
    seeds = SEEDS[:2] if args.quick else SEEDS
    methods = {m: (d, g[-1:]) for m, (d, g) in METHODS.items()} if args.quick else METHODS

    base = {c: base_metrics(c, args.quick) for c in corruptions}
    # stage 1, seed 0: LoRA alone and every grid weight (the selection runs)
    stage1 = [job(c, "lora", None, 0, args.quick) for c in corruptions]
    stage1 += [job(c, m, w, 0, args.quick) for c in corruptions for m, (_, grid) in methods.items() for w in grid]
    results = run_all(stage1, args.jobs)
    chosen = {c: {m: (select(results, c, m) if not args.quick else methods[m][1][0]) for m in methods}
              for c in corruptions}
    # stage 2: the other seeds, with the chosen weights
    stage2 = [job(c, "lora", None, s, args.quick) for c in corruptions for s in seeds[1:]]
    stage2 += [job(c, m, chosen[c][m], s, args.quick) for c in corruptions for m in methods for s in seeds[1:]]
    results += run_all(stage2, args.jobs)
    seconds = time.perf_counter() - t0

    table: dict[str, dict[str, Any]] = {}
    for c in corruptions:
        rows: dict[str, Any] = {"source-only": {"target": summary([base[c]["target_accuracy"]]),
                                                "source": summary([base[c]["source_accuracy"]]), "weight": None}}
        for m in ("lora", *methods):
            w = chosen[c].get(m)
            picked = [r for r in results if (r["corruption"], r["method"], r["weight"]) == (c, m, w)]
            rows[m] = {"target": summary([r["target_accuracy"] for r in picked]),
                       "source": summary([r["source_accuracy"] for r in picked]), "weight": w,
                       "seeds": sorted(r["seed"] for r in picked)}
        table[c] = rows
    grid = [r for r in results if r["seed"] == 0 and r["method"] != "lora"]
    run_seconds = [r["seconds"] for r in results if r.get("seconds") is not None] or [0.0]
    report = {"base": base, "chosen_weights": chosen, "table": table, "grid_seed0": grid, "runs": results,
              "seconds_total": seconds, "seconds_pretrain": t_pre, "seconds_per_run_mean": statistics.fmean(run_seconds),
              "jobs": args.jobs, "reused": sum(bool(r.get("reused")) for r in results), "quick": args.quick, "tolerance": TOLERANCE, "cpu": platform.processor() or
              platform.machine(), "cpu_count": os.cpu_count()}
    print(render(report))
    if args.quick:
        (RUNS / "quick.json").write_text(json.dumps(report, indent=2))
        return 0
    (HERE / "sections" / "40-domain-adaptation.json").write_text(json.dumps(report, indent=2) + "\n")
    (HERE / "sections" / "40-domain-adaptation.md").write_text(render(report))
    return 0


def render(report: dict[str, Any]) -> str:
    lines = ["## Domain adaptation: LoRA + latent OT on corrupted Fashion-MNIST", "",
             "Reproduce: `python bench/domain_adaptation.py` (part of `make experiments`; `--quick` for a smoke run).",
             "",
             "Source: labelled Fashion-MNIST train (10,000-image subset; a fixed 5,000-image split held out for "
             "source validation, 2,000 of them scored). Target: the test split under a deterministic corruption, "
             "halved into 5,000 unlabelled images for adaptation and 5,000 held-out images, 2,000 of which are scored "
             "for the target accuracy (their labels are read only to report it). Base: the pretrained `FashionCNN` (no batch norm). LoRA "
             f"rank {RANK} (alpha {2 * RANK}) on every conv and linear layer, {STEPS} AdamW steps (lr {LR:g}, cosine) "
             "of 64 source + 64 target images; OT term on the 128-d `features` tap (`ot.pair: domain`, normalised "
             "weights, 20-step warm-up). Each run goes through `lorakit.train.train(cfg)`.", "",
             "**How the recipe was chosen:** rank, learning rate and steps (shared by all methods, LoRA alone "
             "included) were picked in a pilot on the *invert* corruption, seed 0, that did read target accuracy "
             "(rank 4 / lr 3e-3 / 100 steps gave LoRA + SW 41.5% over three seeds; rank 8 or 16, lr 1e-2 and 300 "
             "steps raised it). The OT weights below are chosen without target labels.", "",
             f"**Weight selection, no target labels:** on seed 0, each OT method is trained once per weight of its "
             f"grid; the largest weight whose *source-validation* accuracy is within {100 * report['tolerance']:.0f} "
             "points of LoRA alone (same seed) is kept for all seeds. Figures: accuracy in %, mean over seeds "
             "(min..max).", ""]
    for c, rows in report["table"].items():
        lines += [f"**{c}**", "", "| method | weight | target accuracy | source accuracy | Δ source vs base |",
                  "| --- | --- | --- | --- | --- |"]
        base_src = rows["source-only"]["source"]["mean"]
        for m, r in rows.items():
            w = "—" if r["weight"] is None else f"{r['weight']:g}"
            delta = 100 * (r["source"]["mean"] - base_src)
            lines.append(f"| {m} | {w} | {pct(r['target'])} | {pct(r['source'])} | {delta:+.1f} |")
        lines.append("")
    lines += ["Selection grid (seed 0; source-val accuracy decides, target accuracy shown for transparency):", "",
              "| corruption | method | weight | source acc | target acc |", "| --- | --- | --- | --- | --- |"]
    for r in sorted(report["grid_seed0"], key=lambda r: (r["corruption"], r["method"], r["weight"])):
        lines.append(f"| {r['corruption']} | {r['method']} | {r['weight']:g} | {100 * r['source_accuracy']:.1f} | "
                     f"{100 * r['target_accuracy']:.1f} |")
    lines += ["", f"Timings: {len(report['runs'])} training runs, {report['seconds_per_run_mean']:.0f} s each on "
              f"average (one thread), {report['jobs']} in parallel; whole experiment {report['seconds_total'] / 60:.1f}"
              f" min on {report['cpu_count']} cores (pretraining the base: {report['seconds_pretrain']:.0f} s, cached "
              "after the first time)." + (f" {report['reused']} runs were reused from an earlier, interrupted "
              "invocation (same resolved config), so the total covers only the rest; the per-run mean covers runs "
              "trained in this invocation." if report.get("reused") else ""), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
