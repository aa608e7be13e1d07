"""Hypothesis strategies for random adapters: BERT-like paths, every layer kind, per-module ranks, alpha ≠ r."""

from __future__ import annotations

import torch
from hypothesis import strategies as st

from lorakit import Adapter, ModuleLora

#: (path template, kind, in, out, kernel)
SLOTS = [
    ("embeddings.word_embeddings", "embedding", 11, 6, ()),
    ("encoder.layer.{i}.attention.self.query", "linear", 6, 6, ()),
    ("encoder.layer.{i}.attention.output.dense", "linear", 6, 6, ()),
    ("encoder.layer.{i}.intermediate.dense", "linear", 6, 9, ()),
    ("encoder.layer.{i}.output.dense", "linear_t", 9, 6, ()),
    ("encoder.layer.{i}.crossattention.self.key", "linear", 6, 6, ()),
    ("encoder.layer.{i}.conv", "conv2d", 3, 4, (3, 3)),
    ("classifier", "linear", 6, 2, ()),
]

#: SD1.5-style slots: {i} picks a UNet level, text encoder layers and convs included.
SD_SLOTS = [
    ("text_encoder.text_model.encoder.layers.{i}.self_attn.q_proj", "linear", 6, 6, ()),
    ("unet.down_blocks.{i}.attentions.0.transformer_blocks.0.attn1.to_q", "linear", 6, 6, ()),
    ("unet.down_blocks.{i}.attentions.1.transformer_blocks.0.attn2.to_k", "linear", 5, 6, ()),
    ("unet.mid_block.attentions.0.transformer_blocks.0.ff.net.2", "linear", 9, 6, ()),
    ("unet.up_blocks.{i}.resnets.2.conv1", "conv2d", 3, 4, (3, 3)),
    ("unet.up_blocks.{i}.attentions.1.proj_out", "linear", 6, 6, ()),
    ("unet.conv_in", "conv2d", 3, 4, (3, 3)),
]


def make_module(gen: torch.Generator, kind: str, n_in: int, n_out: int, kernel: tuple[int, ...], rank: int,
                alpha: float, rslora: bool) -> ModuleLora:
    A = torch.randn(rank, n_in, *kernel, generator=gen)
    B = torch.randn(n_out, rank, generator=gen)
    return ModuleLora(A=A, B=B, alpha=alpha, kind=kind, rslora=rslora)


@st.composite
def adapters(draw, max_modules: int = 7, with_overrides: bool = True, slots=None) -> Adapter:
    """A random valid adapter: 1..max_modules modules in up to 3 layers, ranks 1..6, alpha ≠ rank.

    ``slots`` defaults to BERT-like paths (:data:`SLOTS`); :data:`SD_SLOTS` gives an SD1.5-style adapter.
    """
    slots = SLOTS if slots is None else slots
    seed = draw(st.integers(0, 2 ** 31 - 1))
    gen = torch.Generator().manual_seed(seed)
    picks = draw(st.lists(st.tuples(st.integers(0, len(slots) - 1), st.integers(0, 2)), min_size=1,
                          max_size=max_modules, unique=True))
    mods = {}
    for slot, layer in picks:
        template, kind, n_in, n_out, kernel = slots[slot]
        path = template.format(i=layer)
        if path in mods:
            continue
        rank = draw(st.integers(1, 6))
        alpha = draw(st.sampled_from([0.5, 1.0, 3.0, 7.5, 16.0, -2.0]))
        if alpha == rank:
            alpha += 0.25
        mods[path] = make_module(gen, kind, n_in, n_out, kernel, rank, alpha, draw(st.booleans()))
    overrides = {}
    if with_overrides and draw(st.booleans()):
        overrides["classifier.weight"] = torch.randn(2, 6, generator=gen)
        overrides["classifier.bias"] = torch.randn(2, generator=gen)
    return Adapter(mods, overrides, base_model="toy-bert", targets=("query",), metadata={"note": "random"})


def full_delta(m: ModuleLora) -> torch.Tensor:
    return m.lowrank_delta().double()
