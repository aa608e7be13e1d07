"""The one training loop shared by every task: AdamW (optionally LoRA+), warm-up schedule, gradient accumulation,
bf16/fp16 autocast, an optional moving average of the weights (``optim.ema_decay``), periodic eval, best/last
adapters and step snapshots, atomic checkpoints, exact resume and DDP, on the CPU or a GPU.

The model and every batch live on the run's device (``run.device``; by default ``cuda:{LOCAL_RANK}`` when CUDA is
available); ``precision: bf16`` (or ``fp16``, with a gradient scaler) autocasts on that device's type, so it runs
in half precision on the CPU too.

Data order is a pure function of ``(seed, epoch)`` and the position a pure function of the optimiser step, so a
resumed run sees exactly the batches an uninterrupted one would. Under DDP every global micro-batch is cut into
equal contiguous shards, one per process; gradient averaging then gives the single-process gradient.

With an ``ot:`` section the loss of each micro-batch gains a latent OT term (:func:`lorakit.regularizers.ot_loss`)
on the features tapped at ``ot.tap``: against a standard normal prior, or against the same tap on a batch of the
task's unlabelled target stream. The target stream follows the same rule as the source (its order a pure function
of the seed and its epoch, its position of the step), and so do the OT term's random directions and prior samples,
so resume stays exact without extra checkpoint state. Under DDP the OT term is computed on each process's shards
(a minibatch OT estimate on smaller batches): the run equals a single-process one whose micro-batches are those
shards (``batch_size / world``, ``grad_accum × world``). Without ``ot`` no hook is ever
registered.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from lorakit.errors import LorakitError
from lorakit.formats import save
from lorakit.formats.safetensors_io import write_safetensors
from lorakit.adapter import Adapter
from lorakit.inject import extract, freeze_except, inject, trainable_parameters, trained_tensors
from lorakit.layers.base import LoraFactors
from lorakit.regularizers import OTConfig, ot_loss, tap
from lorakit.train import report
from lorakit.train.checkpoint import (latest_checkpoint, load_checkpoint, remove_stale, rng_state, save_checkpoint,
                                      trained_state)
from lorakit.train.config import ConfigError, TrainConfig
from lorakit.train.device import to_device
from lorakit.train.distributed import Dist, setup
from lorakit.train.ema import EMA
from lorakit.train.tasks import Task, build_task


class TrainingDivergedError(LorakitError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


class RunDirError(LorakitError):
    """The run directory cannot be used (holds another run, or has nothing to resume)."""


class Reporter(Protocol):
    """Receives progress; the CLI draws it, the library itself never prints."""

    def start(self, total_steps: int, start_step: int) -> None: ...
    def step(self, step: int, record: dict[str, Any]) -> None: ...
    def evaluated(self, step: int, metrics: dict[str, float]) -> None: ...
    def end(self) -> None: ...


@dataclass
class TrainResult:
    """What a run produced (figures are from the main process)."""

    run_dir: Path
    steps: int
    base_metrics: dict[str, float] | None
    final_metrics: dict[str, float]
    best_metrics: dict[str, float]
    metric: str
    trainable_params: int
    total_params: int
    adapter_last: Path | None
    adapter_best: Path | None
    """The adapter files (None for ``lora.full_finetune``, which writes ``model_last`` / ``model_best`` instead)."""
    plot: Path
    seconds: float
    history: list[dict[str, Any]] = field(default_factory=list)
    model: nn.Module | None = None
    """The trained model (base + adapter layers, or fully trained for ``lora.full_finetune``), on the run's device;
    with ``optim.ema_decay``, holding the average (what ``adapter_last`` holds)."""
    model_last: Path | None = None
    """``lora.full_finetune``: the whole trained model's state dict (``model-last.safetensors``)."""
    model_best: Path | None = None
    """``lora.full_finetune``: the state dict at the best evaluation (``model-best.safetensors``)."""
    samples: list[Path] = field(default_factory=list)
    """Files the task's ``sample`` hook wrote under ``<run_dir>/samples/`` during this run (main process)."""


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based): linear warm-up, then decay."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, lr: float, lora_plus_ratio: float,
                 prefix_lrs: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Trainable parameters in groups: LoRA B factors at ``lr * lora_plus_ratio`` (LoRA+), the rest at ``lr``;
    parameters under a path prefix of ``prefix_lrs`` (first match) take that prefix's rate instead of ``lr``."""
    b_ids = {id(m.B) for m in model.modules() if isinstance(m, LoraFactors)}
    params = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    rates = list(dict.fromkeys([lr, *(prefix_lrs or {}).values()]))

    def rate(name: str) -> float:
        return next((r for prefix, r in (prefix_lrs or {}).items() if name.startswith(prefix)), lr)

    groups = [{"params": [p for name, p in params if rate(name) == r and (id(p) in b_ids) == is_b],
               "lr": r * (lora_plus_ratio if is_b else 1.0), "base_lr": r * (lora_plus_ratio if is_b else 1.0)}
              for r in rates for is_b in (False, True)]
    return [g for g in groups if g["params"]]


def order(n: int, seed: int, epoch: int, lengths: Sequence[int] | None = None, per_step: int = 1) -> list[int]:
    """The example order of one epoch: a seeded permutation; with ``lengths``, each run of 32 steps' examples is
    sorted by length, so that batches need little padding while the epoch still visits examples at random."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    if lengths is None:
        return perm
    chunk = 32 * per_step
    return [i for start in range(0, n, chunk) for i in sorted(perm[start:start + chunk], key=lambda j: -lengths[j])]


def prepare(cfg: TrainConfig) -> tuple[Task, tuple[int, int]]:
    """Build the task and put the adapter on its model (or unfreeze everything for ``lora.full_finetune``)."""
    torch.manual_seed(cfg.run.seed)
    task = build_task(cfg)
    if cfg.lora.full_finetune:
        task.model.requires_grad_(True)
    elif not cfg.lora.targets:
        freeze_except(task.model, train=cfg.lora.train)
    else:
        inject(task.model, cfg.lora.targets, rank=cfg.lora.rank, alpha=cfg.lora.alpha, dropout=cfg.lora.dropout,
               train=cfg.lora.train, seed=cfg.run.seed, ranks=cfg.lora.ranks or None, alphas=cfg.lora.alphas or None)
    return task, trainable_parameters(task.model)


def _adapter_save(task: Task, cfg: TrainConfig, path: Path, meta: dict[str, Any]) -> Path:
    """The run's result at one point: the adapter file ``adapter-<which>.safetensors``, or for a full fine-tune the
    whole state dict as ``model-<which>.safetensors`` (written atomically). Returns the file written."""
    metadata = {"task": cfg.task, **{k: str(v) for k, v in meta.items()}}
    if cfg.lora.full_finetune:
        path = path.with_name(path.name.replace("adapter-", "model-", 1))
        write_safetensors(task.model.state_dict(), path, {**metadata, "base_model": task.base_model})
        return path
    if cfg.lora.targets:
        adapter = extract(task.model, base_model=task.base_model, targets=cfg.lora.targets, metadata=metadata)
    else:  # head-only: the file holds just the trained modules, as overrides
        adapter = Adapter({}, trained_tensors(task.model), base_model=task.base_model, metadata=metadata)
    save(adapter, path)
    if task.export is not None and cfg.lora.targets:  # a dialect's copy holds factors, not trained modules
        task.export(adapter, path, meta)
    return path


#: ``run.save_every`` snapshots: ``adapter-step0000500.safetensors`` (a full fine-tune's ``model-step…``).
SNAPSHOT = re.compile(r"^(adapter|model)-step(\d{7,})(\.kohya)?\.safetensors$")


def snapshot_path(run_dir: Path, step: int) -> Path:
    """The native file of the ``run.save_every`` snapshot at optimiser step ``step``."""
    return run_dir / f"adapter-step{step:07d}.safetensors"


def prune_snapshots(run_dir: Path, keep_last: int) -> list[Path]:
    """Remove all but the newest ``keep_last`` snapshots (every file of a step: native, full model, kohya export);
    0 keeps all. Returns the files removed."""
    by_step: dict[int, list[Path]] = {}
    for p in run_dir.iterdir():
        m = SNAPSHOT.match(p.name)
        if m and p.is_file():
            by_step.setdefault(int(m.group(2)), []).append(p)
    old = sorted(by_step)[:-keep_last] if keep_last else []
    removed = [p for step in old for p in by_step[step]]
    for p in removed:
        p.unlink(missing_ok=True)
    return removed


def train(cfg: TrainConfig, *, resume: bool = False, reporter: Reporter | None = None) -> TrainResult:
    """Run (or with ``resume``, continue) the training that ``cfg`` describes.

    Writes, from the main process only, into ``cfg.run.out_dir``: ``config.yaml``, ``versions.json``,
    ``metrics.jsonl``, ``plot.png``, ``adapter-best.safetensors``, ``adapter-last.safetensors`` (for
    ``lora.full_finetune``: ``model-best.safetensors``, ``model-last.safetensors``), ``checkpoints/``, with
    ``run.save_every`` the snapshots ``adapter-step<NNNNNNN>.safetensors`` (the newest ``run.keep_last`` kept) and,
    when the task samples (``Task.sample``), ``samples/``.

    A run killed before its first complete checkpoint leaves nothing to continue: ``resume`` then starts it again
    from step 0, and a fresh run may use its folder. Either way the kill's leftovers are removed first.

    Raises:
        ConfigError: a value that only the data reveals as wrong (e.g. fewer examples than one step needs), or a
            device this machine does not have.
        RunDirError: a fresh run into a folder that holds a checkpointed run, or a resume of a folder where no run
            was started.
        TrainingDivergedError: a NaN/inf loss (the last good checkpoint stays in place).
    """
    t0 = time.perf_counter()
    dist = setup(cfg.run.device)
    run_dir = Path(cfg.run.out_dir)
    ckpt = latest_checkpoint(run_dir)
    if resume and ckpt is None and not (run_dir / "config.yaml").is_file():
        raise RunDirError(f"{run_dir}: nothing to resume (no run was started here: no config.yaml, no "
                          "checkpoints/latest.json)")
    if not resume and ckpt is not None:
        raise RunDirError(f"{run_dir}: already holds a run; resume it with --resume or set run.out_dir elsewhere")
    resume = resume and ckpt is not None  # killed before its first checkpoint: start again from step 0
    dist.barrier()  # every process has read the folder before the main one cleans it
    if dist.main:
        remove_stale(run_dir)
    o = cfg.optim
    if o.batch_size % dist.world:
        raise ConfigError(f"config field 'optim.batch_size': {o.batch_size} is not divisible by {dist.world} processes")

    task, (n_train, n_total) = prepare(cfg)
    model = task.model.to(dist.device)  # in place: task.model is this same module
    groups = param_groups(model, o.lr, o.lora_plus_ratio, task.param_lrs)
    optimizer = torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)
    # fp16's narrow range: the loss is scaled up for backward and the gradients down before the step (a no-op
    # pass-through for fp32 and bf16)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=cfg.run.precision == "fp16")
    ema = (EMA([(n, p) for n, p in model.named_parameters() if p.requires_grad], o.ema_decay)
           if o.ema_decay else None)

    def averaged():
        """Evaluations, samples and saved adapters see the moving average when the run keeps one."""
        return ema.swapped() if ema is not None else contextlib.nullcontext()
    per_step = o.batch_size * o.grad_accum
    steps_per_epoch = len(task.train_set) // per_step
    if steps_per_epoch == 0:
        raise ConfigError(f"config field 'optim.batch_size': {len(task.train_set)} training examples are fewer than "
                          f"one step's batch_size x grad_accum = {per_step}")
    total = o.max_steps or o.epochs * steps_per_epoch
    target = _TargetStream.build(cfg, task, dist.world) if cfg.ot is not None and cfg.ot.pair == "domain" else None
    if cfg.ot is not None:
        _check_tap(cfg.ot, model, task)

    history = report.read_metrics(run_dir / "metrics.jsonl") if resume else []
    state: dict[str, Any] = {"best": None, "base_metrics": None}
    start = 0
    if resume:
        state = load_checkpoint(ckpt, model, optimizer, full=cfg.lora.full_finetune, rank=dist.rank,
                                device=dist.device, ema=ema)
        start = state["step"]
        if scaler.is_enabled() and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        history = [r for r in history if r["step"] <= start]
    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        report.write_config(run_dir, cfg.to_dict())
    net: nn.Module = model
    if dist.distributed:
        ids = [dist.device.index] if dist.device.type == "cuda" else None
        net = nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def evaluate(step: int) -> dict[str, float] | None:
        metrics = None
        if dist.main:
            model.eval()
            with torch.no_grad(), _autocast(cfg.run.precision, dist.device), averaged():
                metrics = task.evaluate(model, task.eval_set)
            _train_mode(model)
            history.append({"kind": "eval", "step": step, **metrics})
            # at once, not only at the next checkpoint: a running job's eval curve (a diffusion run's validation
            # loss) can be watched; a resume drops the lines past its checkpoint
            report.write_metrics(run_dir / "metrics.jsonl", history)
            if reporter:
                reporter.evaluated(step, metrics)
        dist.barrier()
        return metrics

    samples: list[Path] = []

    def sample(step: int) -> None:
        """The task's samples at ``step`` (main process): eval mode, no gradients, the run's autocast, and every
        global RNG stream this process draws from restored after, so a run with samples trains exactly as one
        without."""
        if task.sample is None:
            return
        if dist.main:
            model.eval()
            devices = [dist.device] if dist.device.type == "cuda" else []
            with (torch.random.fork_rng(devices=devices), torch.no_grad(), _autocast(cfg.run.precision, dist.device),
                  averaged()):
                samples.extend(task.sample(model, step, run_dir / "samples"))
            _train_mode(model)
        dist.barrier()

    def improved(metrics: dict[str, float]) -> bool:
        best = state["best"]
        value = metrics[task.metric]
        return best is None or (value > best[task.metric] if task.higher_is_better else value < best[task.metric])

    def checkpoint(step: int) -> None:
        rngs = dist.gather(rng_state(dist.device))  # every rank's own dropout stream
        if dist.main:
            loop_state = {"best": state["best"], "base_metrics": state["base_metrics"]}
            if scaler.is_enabled():
                loop_state["scaler"] = scaler.state_dict()
            save_checkpoint(run_dir, step, trained_state(model, cfg.lora.full_finetune), optimizer, rngs,
                            loop_state, ema.state() if ema is not None else None)
            report.write_metrics(run_dir / "metrics.jsonl", history)
        dist.barrier()

    if start == 0 and cfg.run.eval_before:
        state["base_metrics"] = evaluate(0)
    _train_mode(model)
    if reporter and dist.main:
        reporter.start(total, start)
    local = o.batch_size // dist.world
    seen, window_loss, window_ot, window_skipped, window_t = 0, 0.0, 0.0, 0, time.perf_counter()
    for step in range(start, total):
        epoch, offset = divmod(step, steps_per_epoch)
        idx = (task.order(cfg.run.seed, epoch, o.batch_size) if task.order is not None
               else order(len(task.train_set), cfg.run.seed, epoch, task.lengths, per_step))
        factor = lr_factor(step, total, o.warmup_steps, o.schedule)
        for g in optimizer.param_groups:
            g["lr"] = g["base_lr"] * factor
        # this process's contiguous shard of each global micro-batch of the step
        starts = [(offset * o.grad_accum + micro) * o.batch_size + dist.rank * local for micro in range(o.grad_accum)]
        shards = [[task.train_set[i] for i in idx[first:first + local]] for first in starts]
        target_shards = target.shards(step, dist.rank) if target is not None else None
        loss_local, ot_local = _forward_backward(task, net, shards, cfg.run.precision, dist, scaler,
                                                 _OTStep(cfg.ot, model, target_shards, step, cfg.run.seed,
                                                        dist.rank, dist.world, dist.device)
                                                 if cfg.ot is not None else None)
        loss_value = dist.mean(loss_local)
        if not math.isfinite(loss_value):
            last = latest_checkpoint(run_dir)
            raise TrainingDivergedError(f"loss is {loss_value} at step {step + 1} (epoch {epoch}); stopped. "
                                        f"Last good checkpoint: {last or 'none yet'}. Try a lower optim.lr or "
                                        "run.precision=fp32.")
        grad_norm = None
        if o.max_grad_norm is not None:
            scaler.unscale_(optimizer)  # clip the true gradients
            grad_norm = float(nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], o.max_grad_norm))
        scale = scaler.get_scale() if scaler.is_enabled() else 0.0
        scaler.step(optimizer)  # fp16: skipped when a gradient overflowed (the scale then backs off)
        scaler.update()
        window_skipped += scaler.is_enabled() and scaler.get_scale() < scale
        if ema is not None:
            ema.update(step)
        optimizer.zero_grad(set_to_none=True)
        seen += per_step
        window_loss += loss_value
        if cfg.ot is not None:
            window_ot += dist.mean(ot_local)
        done = step + 1
        if done % cfg.run.log_every == 0 or done == total:
            now = time.perf_counter()
            steps_in_window = seen // per_step
            record = {"kind": "train", "step": done, "epoch": epoch, "loss": window_loss / steps_in_window,
                      "lr": optimizer.param_groups[0]["lr"], "examples_per_s": seen / max(now - window_t, 1e-9)}
            if cfg.ot is not None:  # ``loss`` is the total; the task loss is the difference
                record["ot_loss"] = window_ot / steps_in_window
            if grad_norm is not None:
                record["grad_norm"] = grad_norm
            if scaler.is_enabled():  # fp16: optimiser steps of the window skipped for an overflowed gradient
                record["skipped_steps"] = window_skipped
            history.append(record)
            seen, window_loss, window_ot, window_skipped, window_t = 0, 0.0, 0.0, 0, now
            if reporter and dist.main:
                reporter.step(done, record)
        if cfg.run.eval_every and done % cfg.run.eval_every == 0 and done != total:
            metrics = evaluate(done)
            if metrics is not None and improved(metrics):
                state["best"] = {"step": done, **metrics}
                with averaged():
                    _adapter_save(task, cfg, run_dir / "adapter-best.safetensors", state["best"])
        if cfg.run.save_every and done % cfg.run.save_every == 0 and dist.main:
            with averaged():
                _adapter_save(task, cfg, snapshot_path(run_dir, done), {"step": done})
            prune_snapshots(run_dir, cfg.run.keep_last)
        if task.sample_every and done % task.sample_every == 0 and done != total:
            sample(done)
        if cfg.run.checkpoint_every and done % cfg.run.checkpoint_every == 0 and done != total:
            checkpoint(done)

    final = evaluate(total) or {}
    last_path = best_path = None
    if dist.main:
        with averaged():
            last_path = _adapter_save(task, cfg, run_dir / "adapter-last.safetensors", {"step": total, **final})
        if improved(final):
            state["best"] = {"step": total, **final}
            with averaged():
                best_path = _adapter_save(task, cfg, run_dir / "adapter-best.safetensors", state["best"])
        else:
            best_path = last_path.with_name(last_path.name.replace("-last", "-best"))
        report.plot(history, task.metric, run_dir / "plot.png")
    checkpoint(total)
    sample(total)  # last: a failing sampler never costs the saved run
    if ema is not None:
        ema.copy_to()  # the returned model is what adapter-last holds
    if reporter and dist.main:
        reporter.end()
    files = (None, None, last_path, best_path) if cfg.lora.full_finetune else (last_path, best_path, None, None)
    return TrainResult(run_dir, total, state["base_metrics"], final, state["best"] or {}, task.metric, n_train,
                       n_total, files[0], files[1], run_dir / "plot.png", time.perf_counter() - t0, history,
                       model if dist.main else None, files[2], files[3], samples)


#: Offset between the seeds of the source and the target orders, so the two streams are not shuffled alike.
TARGET_SEED_OFFSET = 500_009


@dataclass
class _TargetStream:
    """Unlabelled target inputs for ``ot.pair: domain``: per optimiser step, one micro-batch per source micro-batch,
    in an order that is a pure function of ``(seed, target epoch)``, like the source order."""

    items: Sequence[Any]
    batch_size: int
    grad_accum: int
    world: int
    seed: int

    @classmethod
    def build(cls, cfg: TrainConfig, task: Task, world: int) -> _TargetStream:
        if not task.target_set or task.collate_inputs is None or task.forward is None:
            raise ConfigError(f"config field 'data.target': task {cfg.task!r} has no unlabelled target stream "
                              "(ot.pair is 'domain')")
        size = cfg.data.target.batch_size or cfg.optim.batch_size  # type: ignore[union-attr]
        if size % world:
            raise ConfigError(f"config field 'data.target.batch_size': {size} is not divisible by {world} processes")
        if len(task.target_set) < size * cfg.optim.grad_accum:
            raise ConfigError(f"config field 'data.target.rows': {len(task.target_set)} target examples are fewer "
                              f"than one step's batch_size x grad_accum = {size * cfg.optim.grad_accum}")
        return cls(task.target_set, size, cfg.optim.grad_accum, world, cfg.run.seed + TARGET_SEED_OFFSET)

    def shards(self, step: int, rank: int) -> list[list[Any]]:
        """This process's shard of each target micro-batch of optimiser step ``step``."""
        per_step = self.batch_size * self.grad_accum
        epoch, offset = divmod(step, len(self.items) // per_step)
        idx = order(len(self.items), self.seed, epoch)
        local = self.batch_size // self.world
        starts = [(offset * self.grad_accum + micro) * self.batch_size + rank * local
                  for micro in range(self.grad_accum)]
        return [[self.items[i] for i in idx[first:first + local]] for first in starts]


@dataclass
class _OTStep:
    """What the OT term of one optimiser step needs besides the source batch."""

    cfg: OTConfig
    model: nn.Module
    """The bare model (not the DDP wrapper): taps use its paths, and the target pass goes through it directly."""
    target_shards: list[list[Any]] | None
    step: int
    seed: int
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    """Where the target batches go (the model's device)."""

    def generator(self, micro: int) -> torch.Generator:
        """The RNG of the random directions / prior samples: a pure function of seed, step and the shard's place in
        the step, so a resumed run draws the same ones. The place counts shards as a single process with
        ``grad_accum × world`` micro-batches of one shard each would (``micro·world + rank``): a DDP run then draws
        exactly what that single-process run draws for the same examples."""
        return torch.Generator().manual_seed((self.seed * 1_000_003 + self.step) * 4096 + micro * self.world
                                             + self.rank)


def _check_tap(cfg: OTConfig, model: nn.Module, task: Task) -> None:
    try:
        model.get_submodule(cfg.tap)
    except AttributeError:
        raise ConfigError(f"config field 'ot.tap': no module {cfg.tap!r} in {type(model).__name__}") from None
    if cfg.divergence == "deepjdot" and task.forward is None:
        raise ConfigError("config field 'ot.divergence': deepjdot needs target predictions, which this task does "
                          "not provide")


def _task_and_ot_loss(task: Task, net: nn.Module, batch: dict[str, Any], ot: _OTStep, micro: int
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """The task loss on the source batch and the OT term between its tapped features and the prior or the target
    micro-batch ``micro``'s features. Target inputs carry no labels: only their features and logits are used."""
    with tap(ot.model, ot.cfg.tap) as source:
        loss = task.loss(net, batch)
    target_feats = target_logits = None
    if ot.cfg.pair == "domain":
        inputs = to_device(task.collate_inputs(ot.target_shards[micro]), ot.device)  # type: ignore[misc,index]
        with tap(ot.model, ot.cfg.tap) as target:
            target_logits = task.forward(ot.model, inputs).float()  # type: ignore[misc]
        target_feats = target[-1].float()
    term = ot_loss(ot.cfg, source[-1].float(), target_feats, ot.step, source_labels=batch.get("labels"),
                   target_logits=target_logits, generator=ot.generator(micro))
    return loss, term


def _forward_backward(task: Task, net: nn.Module, shards: list[list[Any]], precision: str, dist: Dist,
                      scaler: torch.amp.GradScaler, ot: _OTStep | None = None) -> tuple[float, float]:
    """Accumulate the gradients of the micro-batches ``shards`` (DDP syncs on the last only); return the step's
    mean total loss and mean OT term on this process."""
    loss_sum = ot_sum = 0.0
    for n, shard in enumerate(shards):
        sync = not dist.distributed or n == len(shards) - 1
        with (contextlib.nullcontext() if sync else net.no_sync()), _autocast(precision, dist.device):
            batch = to_device(task.collate(shard), dist.device)
            if ot is None:
                loss = task.loss(net, batch) / len(shards)
            else:
                task_loss, term = _task_and_ot_loss(task, net, batch, ot, n)
                loss = (task_loss + term) / len(shards)
                ot_sum += float(term.detach()) / len(shards)
        scaler.scale(loss).backward()
        loss_sum += float(loss.detach())
    return loss_sum, ot_sum


def _train_mode(model: nn.Module) -> None:
    """``model.train()``, except frozen batch-norm layers, which keep their running statistics: those are not
    part of the saved adapter, so updating them would make the trained model differ from base + adapter."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            m.eval()


def _autocast(precision: str, device: torch.device):
    """bf16 / fp16 autocast on the run's own device type: an autocast for another device type than the one
    computing is silently a no-op (the run would be fp32)."""
    if precision in AUTOCAST_DTYPES:
        return torch.autocast(device.type, dtype=AUTOCAST_DTYPES[precision])
    return contextlib.nullcontext()


#: ``run.precision`` → the dtype its autocast computes in.
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
