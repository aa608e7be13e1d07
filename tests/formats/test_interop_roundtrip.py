"""native → dialect → native is bitwise exact, for every dialect, alpha ≠ rank and per-module ranks included."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorakit.adapter import Adapter, ModuleLora, adapters_equal
from lorakit.formats import detect, diffusers, kohya, names, peft
from lorakit.formats.common import LossyConversionWarning, NotRepresentableError

UNET_PATHS = ["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
              "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
              "down_blocks.1.resnets.0.conv1", "mid_block.attentions.0.proj_in", "up_blocks.1.upsamplers.0.conv",
              "down_blocks.0.attentions.1.transformer_blocks.0.ff.net.0.proj"]
KINDS = ["linear", "linear", "conv2d", "linear", "conv2d", "linear"]


def _module(kind: str, rank: int, alpha: float, gen: torch.Generator, dora: bool = False,
            rslora: bool = False) -> ModuleLora:
    inp, out = 6, 5
    a_shape = (rank, inp, 3, 3) if kind == "conv2d" else (rank, inp, 3) if kind == "conv1d" else (rank, inp)
    mag = torch.rand(out, generator=gen) + 0.5 if dora else None
    return ModuleLora(A=torch.randn(a_shape, generator=gen), B=torch.randn(out, rank, generator=gen), alpha=alpha,
                      kind=kind, rslora=rslora, magnitude=mag)


def make_adapter(ranks: list[int], alphas: list[float], prefix: str = "", seed: int = 0, **kw) -> Adapter:
    gen = torch.Generator().manual_seed(seed)
    mods = {prefix + p: _module(k, r, a, gen, **kw) for p, k, r, a in zip(UNET_PATHS, KINDS, ranks, alphas)}
    return Adapter(mods, base_model="tiny-sd", targets=("to_q", "conv1"),
                   metadata={"ss_network_dim": "4", "modelspec.title": "t"})


def roundtrip(adapter: Adapter, dialect: str, tmp_path, **opts) -> Adapter:
    out = tmp_path / f"x.{dialect}"
    detect.write(adapter, out, dialect, **opts)
    assert detect.detect(out) == dialect
    return detect.read_any(out)


ranks_st = st.lists(st.integers(1, 6), min_size=6, max_size=6)
alphas_st = st.lists(st.sampled_from([1.0, 4.0, 0.1, 3.7, 16.0, 1e-3, 2.5e7]), min_size=6, max_size=6)


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ranks=ranks_st, alphas=alphas_st)
@pytest.mark.parametrize("dialect,root", [("native", None), ("peft", None), ("kohya", "unet"),
                                          ("diffusers", "unet")])
def test_roundtrip_bitwise(tmp_path, dialect, root, ranks, alphas):
    adapter = make_adapter(ranks, alphas)
    opts = {"root": root} if root else {}
    assert adapters_equal(roundtrip(adapter, dialect, tmp_path, **opts), adapter)


@pytest.mark.parametrize("dialect", ["kohya", "diffusers"])
def test_roundtrip_component_prefixed_paths(tmp_path, dialect):
    adapter = make_adapter([2, 3, 4, 1, 2, 5], [3.0, 0.5, 7.0, 1.0, 9.0, 2.0], prefix="unet.")
    assert adapters_equal(roundtrip(adapter, dialect, tmp_path), adapter)


def test_roundtrip_dora_rslora_overrides_peft(tmp_path):
    adapter = make_adapter([4, 2, 4, 4, 3, 4], [8.0, 3.0, 8.0, 1.5, 8.0, 8.0], dora=True, rslora=True)
    adapter = Adapter(adapter.modules, {"classifier.weight": torch.randn(2, 5), "classifier.bias": torch.zeros(2)},
                      base_model="m", metadata={"k": "v"})
    assert adapters_equal(roundtrip(adapter, "peft", tmp_path), adapter)


@pytest.mark.parametrize("dialect", ["kohya", "diffusers"])
def test_roundtrip_dora(tmp_path, dialect):
    adapter = make_adapter([4, 2, 4, 4, 3, 4], [8.0, 3.0, 8.0, 1.5, 8.0, 8.0], dora=True)
    assert adapters_equal(roundtrip(adapter, dialect, tmp_path, root="unet"), adapter)


def test_roundtrip_linear_t_embedding_peft(tmp_path):
    gen = torch.Generator().manual_seed(1)
    mods = {"transformer.h.0.attn.c_attn": ModuleLora(torch.randn(2, 8, generator=gen), torch.randn(24, 2,
                                                      generator=gen), alpha=5.0, kind="linear_t"),
            "transformer.wte": ModuleLora(torch.randn(3, 50, generator=gen), torch.randn(8, 3, generator=gen),
                                          alpha=2.0, kind="embedding"),
            "lm_head": ModuleLora(torch.randn(2, 8, generator=gen), torch.randn(50, 2, generator=gen), alpha=2.0)}
    adapter = Adapter(mods)
    assert adapters_equal(roundtrip(adapter, "peft", tmp_path), adapter)


def test_kohya_sgm_roundtrip_and_names(tmp_path):
    adapter = make_adapter([2, 3, 4, 1, 2, 5], [3.0, 0.5, 7.0, 1.0, 9.0, 2.0])
    tensors, metadata = kohya.to_tensors(adapter, root="unet", sgm="sd15")
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in tensors
    assert "lora_unet_input_blocks_4_0_in_layers_2.lora_up.weight" in tensors
    assert "lora_unet_output_blocks_5_2_conv.alpha" in tensors
    assert adapters_equal(kohya.from_tensors(tensors, metadata, root="unet"), adapter)
    # without lorakit's hints the names are resolved by the SGM map and the segment vocabulary
    bare = kohya.from_tensors(tensors, {}, root="unet")
    assert list(bare.modules) == list(adapter.modules)


def test_kohya_names_resolved_by_known_paths_and_conv_shapes():
    adapter = make_adapter([2, 3, 4, 1, 2, 5], [3.0, 0.5, 7.0, 1.0, 9.0, 2.0])
    tensors, _ = kohya.to_tensors(adapter, root="unet")
    assert tensors["lora_unet_down_blocks_1_resnets_0_conv1.lora_up.weight"].shape == (5, 4, 1, 1)
    assert tensors["lora_unet_down_blocks_1_resnets_0_conv1.alpha"].dtype == torch.float32
    assert tensors["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0.alpha"].item() == 0.5
    back = kohya.from_tensors(tensors, {}, root="unet", known_paths=UNET_PATHS)
    assert list(back.modules) == UNET_PATHS
    assert [m.alpha for m in back.modules.values()] == [m.alpha for m in adapter.modules.values()]


def test_alpha_not_exact_in_float32_is_stored_float64():
    adapter = make_adapter([2] * 6, [0.1] * 6)
    tensors, _ = kohya.to_tensors(adapter, root="unet")
    t = tensors["lora_unet_mid_block_attentions_0_proj_in.alpha"]
    assert t.dtype == torch.float64 and t.item() == 0.1


def test_sgm_map_agrees_with_diffusers():
    """Our SDXL SGM names, fed to diffusers' own converter, land on the same diffusers paths."""
    from types import SimpleNamespace

    from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                         _maybe_map_sgm_blocks_to_diffusers)

    paths = [p for p in names.family_paths("sdxl-unet")
             if "attn1.to_q" in p or "resnets" in p or "samplers" in p or "proj_in" in p]
    sd = {}
    for p in paths:
        name = "lora_unet_" + names.underscore(names.diffusers_to_sgm(p, (1, 2)))
        sd[name + ".lora_down.weight"] = torch.zeros(1, 1)
        sd[name + ".lora_up.weight"] = torch.zeros(1, 1)
    mapped = _maybe_map_sgm_blocks_to_diffusers(dict(sd), SimpleNamespace(layers_per_block=2))
    converted, _ = _convert_non_diffusers_lora_to_diffusers(mapped)
    got = sorted(re.sub(r"[._]lora\.down\.weight$", "", k.removeprefix("unet.")).replace(".processor", "")
                 for k in converted if k.endswith("lora.down.weight"))
    assert got == sorted(paths)


@pytest.mark.parametrize("family", names.FAMILIES)
def test_guess_path_inverts_underscore_on_every_family(family):
    paths = names.family_paths(family)
    assert paths and all(names.guess_path(names.underscore(p)) == p for p in paths)
    assert names.kohya_table(paths)  # no two paths collide


@pytest.mark.parametrize("family,att", [("sd15-unet", (0, 1, 2)), ("sdxl-unet", (1, 2))])
def test_sgm_map_is_a_bijection(family, att):
    for p in names.family_paths(family):
        assert names.sgm_to_diffusers(names.diffusers_to_sgm(p, att)) == p


def test_not_representable_lists_everything_or_warns():
    adapter = make_adapter([2] * 6, [1.0] * 6, rslora=True)
    adapter = Adapter(dict(adapter.modules), {"head.weight": torch.zeros(2)})
    with pytest.raises(NotRepresentableError) as e:
        kohya.to_tensors(adapter, root="unet")
    assert "head.weight" in str(e.value) and "mid_block.attentions.0.proj_in" in str(e.value)
    with pytest.warns(LossyConversionWarning, match="head.weight"):
        tensors, _ = kohya.to_tensors(adapter, root="unet", lossy=True)
    assert not any("head" in k for k in tensors)
    with pytest.raises(NotRepresentableError, match="head.weight"):
        diffusers.to_tensors(adapter, root="unet")
    mixed = Adapter({**make_adapter([2] * 6, [1.0] * 6).modules, **make_adapter([2] * 6, [1.0] * 6, "x.",
                                                                                   rslora=True).modules})
    with pytest.raises(NotRepresentableError, match="rsLoRA"):
        peft.to_tensors(mixed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peft.to_tensors(make_adapter([2] * 6, [1.0] * 6))  # a representable adapter warns about nothing


@pytest.mark.parametrize("dialect", ["kohya", "diffusers"])
def test_sdxl_components_and_reading_one_component(tmp_path, dialect):
    gen = torch.Generator().manual_seed(3)
    te = "text_model.encoder.layers.0.self_attn.q_proj"
    mods = {"unet.down_blocks.1.attentions.0.proj_in": _module("linear", 2, 3.0, gen),
            f"text_encoder.{te}": _module("linear", 3, 1.5, gen),
            f"text_encoder_2.{te}": _module("linear", 1, 4.0, gen)}
    adapter = Adapter(mods)
    path = tmp_path / "sdxl.safetensors"
    detect.write(adapter, path, dialect)
    if dialect == "kohya":
        keys = set(kohya.to_tensors(adapter)[0])
        assert {f"lora_te1_{names.underscore(te)}.alpha", f"lora_te2_{names.underscore(te)}.alpha"} <= keys
    assert adapters_equal(detect.read_any(path), adapter)
    unet_only = detect.read_any(path, root="unet")
    assert list(unet_only.modules) == ["down_blocks.1.attentions.0.proj_in"]
    assert unet_only["down_blocks.1.attentions.0.proj_in"].alpha == 3.0


@pytest.mark.parametrize("dialect", ["peft", "kohya", "diffusers"])
def test_roundtrip_every_kind(tmp_path, dialect):
    gen = torch.Generator().manual_seed(5)
    mods = {"a.lin": _module("linear", 3, 2.0, gen), "a.conv1": _module("conv1d", 2, 5.0, gen),
            "a.conv2": _module("conv2d", 4, 0.25, gen),
            "a.gpt": ModuleLora(torch.randn(2, 6, generator=gen), torch.randn(5, 2, generator=gen), 3.0, "linear_t")}
    if dialect == "peft":
        mods["a.emb"] = _module("embedding", 2, 1.0, gen)
    adapter = Adapter(mods)
    assert adapters_equal(roundtrip(adapter, dialect, tmp_path, **({} if dialect == "peft" else {"root": "unet"})),
                          adapter)
