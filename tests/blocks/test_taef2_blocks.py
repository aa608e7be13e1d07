"""The ``taef2`` block family: decoder and encoder levels cut where the resolution changes."""

from __future__ import annotations

import pytest
import torch

from lorakit.adapter import Adapter, ModuleLora
from lorakit.blocks import OTHER, block_of, block_vocabulary, detect_family, group_by_block
from lorakit.errors import LorakitError
from lorakit.models.taef2 import TAEF2
from lorakit.ops.control import bake_strengths

GOLDEN = {
    "decoder.1": "DEC0",
    "decoder.5.pool.3": "DEC0",
    "decoder.7": "DEC1",
    "decoder.10.conv.4": "DEC1",
    "decoder.12": "DEC2",
    "decoder.15.conv.0": "DEC2",
    "decoder.17": "DEC3",
    "decoder.18.conv.2": "DEC3",
    "decoder.19": "DEC3",
    "encoder.0": "ENC0",
    "encoder.1.conv.0": "ENC0",
    "encoder.2": "ENC1",
    "encoder.9.conv.4": "ENC2",
    "encoder.10": "ENC3",
    "encoder.14": "ENC3",
    "vae.decoder.8.conv.0": "DEC1",
}


@pytest.mark.parametrize(("path", "block"), GOLDEN.items())
def test_golden_blocks(path: str, block: str) -> None:
    assert block_of(path, "taef2") == block


def test_every_conv_of_the_model_has_a_block_and_levels_follow_resolution() -> None:
    model = TAEF2()
    convs = [p for p, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    assert detect_family(convs) == "taef2"
    groups = group_by_block(convs, "taef2")
    assert OTHER not in groups and list(groups) == list(block_vocabulary("taef2"))[:-1]
    # Each decoder level's convolutions all run at one resolution: check with hooks on a 16×16 latent input.
    sizes: dict[str, set[int]] = {}
    hooks = [model.get_submodule(p).register_forward_hook(
        lambda m, i, o, p=p: sizes.setdefault(block_of(p, "taef2"), set()).add(o.shape[-1])) for p in convs]
    with torch.no_grad():
        model.decode(torch.zeros(1, 32, 2, 2))
    for h in hooks:
        h.remove()
    assert sizes == {"DEC0": {2}, "DEC1": {4}, "DEC2": {8}, "DEC3": {16}}


def test_bert_paths_stay_bert_and_mixed_trees_are_refused() -> None:
    assert detect_family(["encoder.layer.0.attention.self.query"]) == "bert"
    with pytest.raises(LorakitError, match="cannot tell"):
        detect_family(["decoder.3.conv.0", "classifier"])


def test_bake_strengths_scales_alpha_of_one_level_only() -> None:
    g = torch.Generator().manual_seed(0)
    mods = {p: ModuleLora(A=torch.randn(2, 64, 3, 3, generator=g), B=torch.randn(64, 2, generator=g), alpha=2.0,
                          kind="conv2d") for p in ("decoder.3.conv.0", "decoder.18.conv.0")}
    baked = bake_strengths(Adapter(mods), {"DEC0": 0.0}, family="taef2")
    assert baked.modules["decoder.3.conv.0"].alpha == 0.0
    assert baked.modules["decoder.18.conv.0"].alpha == 2.0
    torch.testing.assert_close(baked.modules["decoder.3.conv.0"].A, mods["decoder.3.conv.0"].A)
