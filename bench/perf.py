"""Performance of lorakit against PEFT and against the frozen-base floor, on MiniLM-L6 geometry.

Every figure is a ratio measured side by side in this one process: the contenders run interleaved (A, B, C, A, B,
C, ...) after a warm-up, on the same inputs, and each ratio is the median over repetitions, with its spread
(min..max of the per-repetition ratios). Peak memory is measured in fresh subprocesses (peak RSS growth over one
training step). Writes ``bench/sections/10-perf.md`` and ``bench/perf.json``.

Run: ``python bench/perf.py [--reps N] [--quick]``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModel
from transformers.utils import logging as hf_logging

import lorakit as lk
from lorakit.models.hub import minilm_source

HERE = Path(__file__).resolve().parent
BATCH, SEQ, HIDDEN = 32, 64, 384


def load_base() -> torch.nn.Module:
    hf_logging.set_verbosity_error()
    model = AutoModel.from_pretrained(minilm_source())
    model.requires_grad_(False)
    return model


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, SEQ, HIDDEN, generator=g) * 0.5, torch.ones(BATCH, SEQ, dtype=torch.long)


def train_step(model, emb, mask) -> None:
    """Forward + backward to the input embeddings (the floor's cost: a frozen base still back-propagates)."""
    x = emb.detach().requires_grad_(True)
    out = model(inputs_embeds=x, attention_mask=mask).last_hidden_state
    out.pow(2).mean().backward()
    for p in model.parameters():
        p.grad = None


def infer(model, emb, mask) -> None:
    with torch.no_grad():
        model(inputs_embeds=emb, attention_mask=mask)


def peft_model(base, targets, rank=8, dropout=0.0):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=dropout)
    return get_peft_model(copy.deepcopy(base), cfg)


def lorakit_model(base, targets, rank=8, dropout=0.0):
    model = copy.deepcopy(base)
    lk.inject(model, targets if isinstance(targets, list) else [targets], rank=rank, alpha=2 * rank,
              dropout=dropout, seed=0)
    return model


def race(contenders: dict, reps: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per call of each contender, interleaved, after ``warmup`` untimed rounds."""
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for i in range(warmup + reps):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            fn()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def ratio(times: dict[str, list[float]], num: str, den: str) -> dict:
    per_rep = [a / b for a, b in zip(times[num], times[den])]
    return {"median": statistics.median(per_rep), "min": min(per_rep), "max": max(per_rep),
            "num_s": statistics.median(times[num]), "den_s": statistics.median(times[den])}


def overhead_ratio(times, ours, theirs, base) -> dict:
    """(ours − base) / (theirs − base), per repetition: the extra cost of unmerged adapters."""
    per_rep = [(a - c) / max(b - c, 1e-9) for a, b, c in zip(times[ours], times[theirs], times[base])]
    return {"median": statistics.median(per_rep), "min": min(per_rep), "max": max(per_rep),
            "num_s": statistics.median(times[ours]) - statistics.median(times[base]),
            "den_s": statistics.median(times[theirs]) - statistics.median(times[base])}


# -- rows -------------------------------------------------------------------------------------------------------

def bench_train(base, reps) -> dict:
    emb, mask = inputs()
    floor = copy.deepcopy(base)
    ours_all, peft_all = lorakit_model(base, "all-linear"), peft_model(base, "all-linear")
    t = race({"floor": lambda: train_step(floor, emb, mask), "lorakit": lambda: train_step(ours_all, emb, mask),
              "peft": lambda: train_step(peft_all, emb, mask)}, reps)
    out = {"train_all_linear_vs_peft": ratio(t, "lorakit", "peft"),
           "train_all_linear_vs_floor": ratio(t, "lorakit", "floor")}
    ours_qv = lorakit_model(base, ["query", "value"], dropout=0.1)
    peft_qv = peft_model(base, ["query", "value"], dropout=0.1)
    floor_train = copy.deepcopy(base)
    # In train mode the base's own dropout runs too; its floor shows how much of PEFT's step LoRA can still save.
    ours_qv.train(), peft_qv.train(), floor_train.train()
    t = race({"lorakit": lambda: train_step(ours_qv, emb, mask), "peft": lambda: train_step(peft_qv, emb, mask),
              "floor": lambda: train_step(floor_train, emb, mask)}, reps)
    out["train_qv_dropout_vs_peft"] = ratio(t, "lorakit", "peft")
    out["train_mode_floor_vs_peft_qv"] = ratio(t, "floor", "peft")
    return out


def bench_inference(base, reps) -> dict:
    emb, mask = inputs()
    ours, theirs = lorakit_model(base, "all-linear"), peft_model(base, "all-linear")
    plain = copy.deepcopy(base)
    for m in (ours, theirs, plain):
        m.eval()
    t = race({"base": lambda: infer(plain, emb, mask), "lorakit": lambda: infer(ours, emb, mask),
              "peft": lambda: infer(theirs, emb, mask)}, reps * 3, warmup=2)
    return {"inference_overhead_vs_peft": overhead_ratio(t, "lorakit", "peft", "base")}


def random_adapters(n: int, seed: int = 0) -> list[lk.Adapter]:
    """n adapters on query/value with different ranks and non-zero B."""
    base = load_base()
    out = []
    for i in range(n):
        model = copy.deepcopy(base)
        lk.inject(model, ["query", "value"], rank=4 + 4 * (i % 3), alpha=8, seed=seed + i)
        for _, layer in lk.lora_layers(model):
            torch.nn.init.normal_(layer.lora["default"].B, std=0.02)
        out.append(lk.extract(model))
    return out


def to_peft_dir(adapter: lk.Adapter, path: Path) -> None:
    """Write an adapter as a PEFT folder (the interop module's job; done by hand here to keep the bench alone)."""
    from safetensors.torch import save_file

    tensors = {}
    for p, m in adapter.modules.items():
        tensors[f"base_model.model.{p}.lora_A.weight"] = m.A.contiguous()
        tensors[f"base_model.model.{p}.lora_B.weight"] = m.B.contiguous()
    ranks = {m.rank for m in adapter.modules.values()}
    (path).mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    rank = ranks.pop()
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": next(iter(adapter.modules.values())).alpha,
           "target_modules": ["query", "value"], "lora_dropout": 0.0, "bias": "none", "task_type": None,
           "base_model_name_or_path": None}
    (path / "adapter_config.json").write_text(json.dumps(cfg))


def bench_mixed(base, reps, tmp: Path) -> dict:
    from peft import PeftModel

    adapters = random_adapters(8)
    emb, mask = inputs()
    ours = copy.deepcopy(base).eval()
    for i, a in enumerate(adapters):
        lk.attach(ours, a, name=f"a{i}")
    for i, a in enumerate(adapters):
        to_peft_dir(a, tmp / f"mixed{i}")
    theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / "mixed0"), adapter_name="a0").eval()
    for i in range(1, 8):
        theirs.load_adapter(str(tmp / f"mixed{i}"), adapter_name=f"a{i}")
    names = [f"a{i // (BATCH // 8)}" for i in range(BATCH)]  # 8 groups of 4 samples, grouped

    def ours_mixed():
        with torch.no_grad(), lk.mixed_batch(ours, names):
            ours(inputs_embeds=emb, attention_mask=mask)

    def ours_single():
        with torch.no_grad(), lk.disabled(ours, [f"a{i}" for i in range(1, 8)]):
            ours(inputs_embeds=emb, attention_mask=mask)

    def peft_mixed():
        with torch.no_grad():
            theirs(inputs_embeds=emb, attention_mask=mask, adapter_names=names)

    t = race({"lorakit": ours_mixed, "peft": peft_mixed, "single": ours_single}, reps * 2)
    return {"mixed8_vs_peft": ratio(t, "lorakit", "peft"), "mixed8_vs_single": ratio(t, "lorakit", "single")}


def bench_attach(base, tmp: Path) -> dict:
    from peft import PeftModel

    adapters = random_adapters(50, seed=100)
    for i, a in enumerate(adapters):
        to_peft_dir(a, tmp / f"attach{i}")
        lk.save(a, tmp / f"attach{i}.safetensors")
    rounds = []
    for _ in range(3):  # a whole attach sequence is one sample; the median of three rounds damps GC and OS pauses
        ours = copy.deepcopy(base)
        ours_t = []
        for i in range(50):
            t0 = time.perf_counter()
            lk.attach(ours, lk.load(tmp / f"attach{i}.safetensors"), name=f"a{i}")
            ours_t.append(time.perf_counter() - t0)
        theirs_t = []
        t0 = time.perf_counter()
        theirs = PeftModel.from_pretrained(copy.deepcopy(base), str(tmp / "attach0"), adapter_name="a0")
        theirs_t.append(time.perf_counter() - t0)
        for i in range(1, 50):
            t0 = time.perf_counter()
            theirs.load_adapter(str(tmp / f"attach{i}"), adapter_name=f"a{i}")
            theirs_t.append(time.perf_counter() - t0)
        rounds.append((ours_t, theirs_t))
        del ours, theirs
    totals = {"lorakit": [sum(o) for o, _ in rounds], "peft": [sum(t) for _, t in rounds]}
    ends = {"ours_last": [sum(o[-10:]) for o, _ in rounds], "ours_first": [sum(o[:10]) for o, _ in rounds],
            "peft_last": [sum(t[-10:]) for _, t in rounds], "peft_first": [sum(t[:10]) for _, t in rounds]}
    return {"attach50_vs_peft": ratio(totals, "lorakit", "peft"),
            "attach_last10_over_first10": ratio(ends, "ours_last", "ours_first"),
            "peft_attach_last10_over_first10": ratio(ends, "peft_last", "peft_first")}


def bench_merge(base, reps) -> dict:
    ours, theirs = lorakit_model(base, "all-linear"), peft_model(base, "all-linear")
    for _, layer in lk.lora_layers(ours):
        torch.nn.init.normal_(layer.lora["default"].B, std=0.02)

    def ours_merge():
        lk.merge(ours)
        lk.unmerge(ours)

    def peft_merge():
        theirs.merge_adapter()
        theirs.unmerge_adapter()

    t = race({"lorakit": ours_merge, "peft": peft_merge}, reps * 3)
    return {"merge_unmerge_vs_peft": ratio(t, "lorakit", "peft")}


def bench_svd(reps) -> dict:
    """resize 64→16 on factors vs a full SVD of B·A; extract rank 16 from a dense delta vs a full SVD."""
    try:
        from lorakit.ops import svd as ops_svd
    except ImportError:
        return {}
    g = torch.Generator().manual_seed(0)
    out_f, in_f, r = 1536, 384, 64
    # A decaying spectrum, as trained adapters have.
    A = torch.randn(r, in_f, generator=g) * torch.logspace(0, -2, r)[:, None]
    B = torch.randn(out_f, r, generator=g)
    adapter = lk.Adapter({f"m{i}": lk.ModuleLora(A.clone(), B.clone(), alpha=64.0) for i in range(12)})
    dense = B @ A

    def full_resize():
        for _ in adapter.modules:
            U, S, Vh = torch.linalg.svd(dense, full_matrices=False)
            (U[:, :16] * S[:16]) @ Vh[:16]

    def ours_resize():
        ops_svd.resize(adapter, rank=16)

    t = race({"lorakit": ours_resize, "full": full_resize}, reps)
    res = {"resize_vs_full_svd": ratio(t, "lorakit", "full")}
    S = torch.linalg.svdvals(dense)
    optimal = float(S[16:].pow(2).sum().sqrt())
    small, _ = ops_svd.resize(adapter, rank=16)
    err = float((small.delta("m0") - adapter.delta("m0")).norm())
    res["resize_error_over_optimal"] = {"median": err / optimal, "min": None, "max": None}

    base_w = {f"m{i}.weight": torch.randn(out_f, in_f, generator=g) for i in range(4)}
    tuned = {k: v + dense / 64 for k, v in base_w.items()}

    def full_extract():
        for k in base_w:
            U, S, Vh = torch.linalg.svd(tuned[k] - base_w[k], full_matrices=False)
            (U[:, :16] * S[:16]) @ Vh[:16]

    kinds = {k.removesuffix(".weight"): "linear" for k in base_w}

    def ours_extract():
        ops_svd.extract(base_w, tuned, kinds, rank=16)

    t = race({"lorakit": ours_extract, "full": full_extract}, reps)
    res["extract_vs_full_svd"] = ratio(t, "lorakit", "full")
    ext, _ = ops_svd.extract(base_w, tuned, kinds, rank=16)
    key = next(iter(ext.modules))
    err = float((ext.delta(key) - dense / 64).norm())
    opt = float(torch.linalg.svdvals(dense / 64)[16:].pow(2).sum().sqrt())
    res["extract_error_over_optimal"] = {"median": err / opt, "min": None, "max": None}
    return res


# -- peak memory in subprocesses --------------------------------------------------------------------------------

def _peak_child(kind: str) -> None:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    base = load_base()
    if kind == "floor":
        model = base
    else:
        model = (lorakit_model(base, "all-linear", dropout=0.1) if kind == "lorakit"
                 else peft_model(base, "all-linear", dropout=0.1))
        del base
    model.train()
    emb, mask = inputs()
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # restart VmHWM from the current RSS (Linux ≥ 4.0)
        f.write("5")
    now = _status_kb("VmRSS")
    train_step(model, emb, mask)
    # VmHWM is this process's own high-water mark: ru_maxrss is not, since Linux carries the parent's peak RSS
    # across fork and exec, which made every child's "growth" the size of the parent process.
    peak = _status_kb("VmHWM")
    print(json.dumps({"peak_growth_kb": peak - now, "before_kb": now}))


def _status_kb(field: str) -> int:
    """A memory figure (kB) from /proc/self/status: ``VmRSS`` now, ``VmHWM`` the peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def bench_memory(reps: int) -> dict:
    results: dict[str, list[float]] = {"lorakit": [], "peft": [], "floor": []}
    # A fixed mmap threshold makes glibc return every large freed block at once: peak RSS then follows the live
    # tensors. With its default sliding threshold, freed activations may stay in the heap and the peak of the same
    # step varied by 50% from run to run.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    for _ in range(reps):
        for kind in results:
            proc = subprocess.run([sys.executable, __file__, "--peak-child", kind], capture_output=True, text=True,
                                  check=True, env=env)
            results[kind].append(json.loads(proc.stdout.strip().splitlines()[-1])["peak_growth_kb"] / 1024)
    return {"peak_train_memory_vs_peft": ratio(results, "lorakit", "peft"),
            "peak_train_memory_vs_floor": ratio(results, "lorakit", "floor")}


# -- report -----------------------------------------------------------------------------------------------------

ROWS = [
    ("train step, all-linear r=8, dropout 0", "train_all_linear_vs_peft", "lorakit / PEFT", 0.80),
    ("train step, all-linear r=8, dropout 0", "train_all_linear_vs_floor", "lorakit / frozen floor", 1.10),
    ("train step, query/value r=8, dropout 0.1", "train_qv_dropout_vs_peft", "lorakit / PEFT", 0.85),
    ("train step, query/value r=8, dropout 0.1", "train_mode_floor_vs_peft_qv", "frozen floor (train mode) / PEFT",
     None),
    ("peak training memory, all-linear, dropout 0.1", "peak_train_memory_vs_peft", "lorakit / PEFT (MiB growth)", 0.80),
    ("peak training memory, all-linear, dropout 0.1", "peak_train_memory_vs_floor", "lorakit / frozen floor", None),
    ("unmerged inference overhead over base", "inference_overhead_vs_peft", "lorakit / PEFT (extra time)", 0.40),
    ("mixed batch of 8 adapters", "mixed8_vs_peft", "lorakit / PEFT adapter_names", 0.50),
    ("mixed batch of 8 adapters", "mixed8_vs_single", "lorakit mixed / lorakit single", 1.20),
    ("attach 50 adapters", "attach50_vs_peft", "lorakit / PEFT (total)", 0.10),
    ("attach 50 adapters", "attach_last10_over_first10", "lorakit last 10 / first 10", None),
    ("attach 50 adapters", "peft_attach_last10_over_first10", "PEFT last 10 / first 10 (reference)", None),
    ("merge + unmerge all-linear adapter", "merge_unmerge_vs_peft", "lorakit / PEFT", 0.20),
    ("resize 12 modules 1536×384 r 64→16", "resize_vs_full_svd", "lorakit / full SVD of B·A", 0.02),
    ("resize 64→16", "resize_error_over_optimal", "error / Eckart–Young optimum", 1.01),
    ("extract r=16 from dense 1536×384 deltas", "extract_vs_full_svd", "lorakit / full SVD", 0.10),
    ("extract r=16", "extract_error_over_optimal", "error / Eckart–Young optimum", 1.01),
]


def render(results: dict, env: dict) -> str:
    lines = ["## Performance (MiniLM-L6 geometry, CPU)", "",
             f"Batch {BATCH} × {SEQ} tokens, hidden {HIDDEN}, {env['threads']} threads, {env['reps']} interleaved "
             f"repetitions after warm-up; ratio = median of per-repetition ratios (min..max). Measured "
             f"{env['date']} on {env['machine']}; torch {env['torch']}, transformers {env['transformers']}, "
             f"peft {env['peft']}.", "",
             "| row | ratio | value | spread | goal | lorakit | other |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for title, key, what, goal in ROWS:
        r = results.get(key)
        if r is None:
            lines.append(f"| {title} | {what} | not measured | | {'≤ %.2f' % goal if goal else ''} | | |")
            continue
        spread = f"{r['min']:.2f}..{r['max']:.2f}" if r.get("min") is not None else ""
        ok = "" if goal is None else (" ✓" if r["median"] <= goal else " ✗")
        num = f"{r['num_s']:.3f}" if "num_s" in r else ""
        den = f"{r['den_s']:.3f}" if "den_s" in r else ""
        lines.append(f"| {title} | {what} | **{r['median']:.3f}**{ok} | {spread} | "
                     f"{'≤ %.2f' % goal if goal else ''} | {num} | {den} |")
    lines += ["", "Times in seconds (memory rows: MiB of peak RSS growth during one training step, measured in "
                  "fresh subprocesses)."]
    if env.get("note"):
        lines += ["", env["note"]]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--peak-child", default=None)
    parser.add_argument("--note", default="", help="a paragraph added under the table (e.g. that the CPU was shared)")
    args = parser.parse_args()
    if args.peak_child:
        _peak_child(args.peak_child)
        return
    torch.set_num_threads(args.threads)
    os.environ["BENCH_THREADS"] = str(args.threads)
    import tempfile

    import peft
    import transformers

    env = {"threads": args.threads, "reps": args.reps, "date": time.strftime("%Y-%m-%d"),
           "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.system()}",
           "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
           "note": args.note}
    base = load_base()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in [("train", lambda: bench_train(base, args.reps)),
                         ("inference", lambda: bench_inference(base, args.reps)),
                         ("mixed", lambda: bench_mixed(base, args.reps, Path(tmp))),
                         ("attach", lambda: bench_attach(base, Path(tmp))),
                         ("merge", lambda: bench_merge(base, args.reps)),
                         ("svd", lambda: bench_svd(args.reps)),
                         ("memory", lambda: bench_memory(3))]:
            t0 = time.perf_counter()
            results.update(fn())
            print(f"[perf] {name}: {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    (HERE / "perf.json").write_text(json.dumps({"env": env, "results": results}, indent=2))
    (HERE / "sections").mkdir(exist_ok=True)
    (HERE / "sections" / "10-perf.md").write_text(render(results, env))
    print(render(results, env))


if __name__ == "__main__":
    main()
