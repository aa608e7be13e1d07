"""Tasks: each builds a model, its data and its loss/metric; all share the one loop in :mod:`lorakit.train.loop`.

A task module exposes ``build(cfg) -> Task``; :data:`TASKS` maps the config's ``task`` name to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn


@dataclass
class Task:
    """Everything the loop needs from a task.

    Attributes:
        model: the pretrained model (no adapter yet).
        train_set: training examples (any items ``collate`` understands).
        eval_set: evaluation examples.
        collate: list of examples → batch, a dict of tensors whose first dimension is the batch.
        loss: ``loss(model, batch)`` → scalar mean loss over the batch.
        evaluate: ``evaluate(model, eval_set)`` → metrics (the model is in eval mode, gradients off).
        metric: the name of the metric that selects the best adapter.
        higher_is_better: direction of ``metric``.
        base_model: identity of the base model, recorded in the adapter.
        predict: optional ``predict(model, texts)`` → one label (or text) per input, for ``lorakit predict``.
        lengths: optional size of each training example; when given, batches group examples of similar length
            (less padding, same examples per epoch).
        target_set: optional unlabelled target-domain inputs (no labels in them), drawn alongside each source batch
            when the config's ``ot`` pairs source with target (``pair: domain``).
        collate_inputs: list of target inputs → batch of inputs only (no ``labels`` key); needed with ``target_set``.
        forward: ``forward(model, batch)`` → the model's logits (N, K) on an input batch; the target pass (and
            DeepJDOT's target predictions) use it.
        order: optional ``order(seed, epoch, batch_size)`` → the epoch's example indices, replacing the loop's
            seeded permutation; every run of ``batch_size`` consecutive indices forms one micro-batch (e.g. one
            aspect-ratio bucket), and there are at least as many indices as examples.
        param_lrs: optional module-path prefix → peak learning rate of the trainable parameters under it (e.g. a
            text encoder's own rate); the others keep ``optim.lr``.
        sample: optional ``sample(model, step, folder)`` → the files it wrote into ``folder`` (e.g. images of the
            model's outputs at optimiser step ``step``); the loop calls it on the main process every
            ``sample_every`` steps and at the end, in eval mode without gradients, and restores the global RNG state
            after it, so sampling never changes the training.
        sample_every: optimiser steps between two ``sample`` calls (0: only at the end).
        export: optional ``export(adapter, native_path, meta)`` → a further file the loop writes beside each saved
            adapter (``meta`` holds its ``step`` and metrics), e.g. the kohya file of a diffusion run.
    """

    model: nn.Module
    train_set: Sequence[Any]
    eval_set: Sequence[Any]
    collate: Callable[[list[Any]], dict[str, Tensor]]
    loss: Callable[[nn.Module, dict[str, Tensor]], Tensor]
    evaluate: Callable[[nn.Module, Sequence[Any]], dict[str, float]]
    metric: str
    higher_is_better: bool
    base_model: str
    predict: Callable[[nn.Module, list[str]], list[Any]] | None = None
    lengths: Sequence[int] | None = None
    target_set: Sequence[Any] | None = None
    collate_inputs: Callable[[list[Any]], dict[str, Tensor]] | None = None
    forward: Callable[[nn.Module, dict[str, Tensor]], Tensor] | None = None
    order: Callable[[int, int, int], list[int]] | None = None
    param_lrs: dict[str, float] | None = None
    sample: Callable[[nn.Module, int, Path], list[Path]] | None = None
    sample_every: int = 0
    export: Callable[[Any, Path, dict[str, Any]], Path] | None = None


def build_task(cfg) -> Task:
    """The :class:`Task` named by ``cfg.task``."""
    from lorakit.train.tasks import (autoencoder, causal_lm, diffusion, fashion_mnist, image_classification,
                                     text_classification)

    builders = {"text-classification": text_classification.build, "image-classification": image_classification.build,
                "causal-lm": causal_lm.build, "fashion-mnist": fashion_mnist.build, "autoencoder": autoencoder.build,
                "diffusion": diffusion.build}
    return builders[cfg.task](cfg)
