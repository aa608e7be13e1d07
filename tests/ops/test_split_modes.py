"""What each split mode puts where: module types, B-LoRA content/style, size budgets; analysis numbers."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit import Adapter, ModuleLora
from lorakit.ops import block_stats, module_stats, module_type, split
from tests.ops.strategies import adapters, make_module


@pytest.mark.parametrize("path,kind,want", [
    ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "linear", "self_attn"),
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k", "linear", "cross_attn"),
    ("mid_block.attentions.0.transformer_blocks.0.ff.net.2", "linear", "mlp"),
    ("down_blocks.0.resnets.0.conv1", "conv2d", "conv"),
    ("bert.encoder.layer.0.attention.output.dense", "linear", "self_attn"),
    ("bert.encoder.layer.0.output.dense", "linear", "mlp"),
    ("bert.encoder.layer.0.intermediate.dense", "linear", "mlp"),
    ("transformer.h.0.attn.c_attn", "linear_t", "self_attn"),
    ("model.layers.0.self_attn.q_proj", "linear", "self_attn"),
    ("model.layers.0.mlp.down_proj", "linear", "mlp"),
    ("bert.embeddings.word_embeddings", "embedding", "embedding"),
    ("down_blocks.1.attentions.0.proj_in", "linear", "other"),
])
def test_module_types(path, kind, want):
    m = ModuleLora(torch.zeros(1, 3), torch.zeros(3, 1), 1.0, kind=kind) if kind != "conv2d" else \
        ModuleLora(torch.zeros(1, 3, 1, 1), torch.zeros(3, 1), 1.0, kind=kind)
    assert module_type(path, m) == want


def test_blora_split_tags_content_and_style():
    g = torch.Generator().manual_seed(0)
    paths = ["unet.up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
             "unet.up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q",
             "unet.down_blocks.2.attentions.1.transformer_blocks.0.attn1.to_q"]
    a = Adapter({p: make_module(g, "linear", 4, 4, (), 2, 3.0, False) for p in paths})
    s = split(a, "block", family="blora")
    assert s.names == ["content", "style", "OTHER"]
    assert s.part("content").adapter.paths == paths[:1] and "content" in s.part("content").tags
    assert s.part("style").adapter.paths == paths[1:2] and "style" in s.part("style").tags


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(adapter=adapters(), budget=st.integers(50, 2000))
def test_size_shards_respect_the_budget(adapter, budget):
    s = split(adapter, "size", max_bytes=budget)
    for part in s.parts:
        items = len(part.adapter) + len(part.adapter.overrides)
        assert part.adapter.nbytes <= budget or items == 1  # only a lone oversized item may exceed it
    order = [p for part in s.parts for p in part.adapter.paths]
    assert order == adapter.paths  # cut at module boundaries, in order


def test_module_and_block_stats():
    u = torch.linalg.qr(torch.randn(6, 2, generator=torch.Generator().manual_seed(1)))[0]
    rank1 = ModuleLora(A=u[:, :1].T.contiguous(), B=torch.ones(6, 1), alpha=1.0)  # ‖ΔW‖ = √6
    flat = ModuleLora(A=u.T.contiguous(), B=u * 2, alpha=2.0)  # scale 1, σ = (2, 2)
    a = Adapter({"encoder.layer.0.attention.self.query": rank1, "encoder.layer.1.output.dense": flat})
    stats = module_stats(a, "bert")
    assert [s.block for s in stats] == ["L00", "L01"] and [s.type for s in stats] == ["self_attn", "mlp"]
    assert stats[0].effective_rank == pytest.approx(1.0) and stats[1].effective_rank == pytest.approx(2.0)
    assert stats[0].norm == pytest.approx(6 ** 0.5, rel=1e-5)
    assert stats[0].energy_share == pytest.approx(6 / 14, rel=1e-5)
    blocks = block_stats(a, "bert")
    assert blocks["L01"]["norm"] == pytest.approx(8 ** 0.5, rel=1e-5) and blocks["L00"]["modules"] == 1


def test_bake_strengths_refuses_unknown_blocks_and_touches_only_alpha():
    from lorakit.errors import LorakitError
    from lorakit.ops import bake_strengths

    g = torch.Generator().manual_seed(0)
    a = Adapter({"unet.down_blocks.1.attentions.0.proj_in": make_module(g, "linear", 4, 4, (), 2, 3.0, False),
                 "unet.up_blocks.1.attentions.0.proj_in": make_module(g, "linear", 4, 4, (), 2, 3.0, False)})
    baked = bake_strengths(a, "OUTALL", family="sd15")  # IN04 → 0, OUT03 → 1
    assert [m.alpha for m in baked.modules.values()] == [0.0, 3.0]
    assert all(torch.equal(baked[p].A, a[p].A) and torch.equal(baked[p].B, a[p].B) for p in a.paths)
    with pytest.raises(LorakitError, match="unknown block"):
        bake_strengths(a, {"IN99": 0.5}, family="sd15")
