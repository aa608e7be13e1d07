"""An SD1.5-structured LoRA (native file, and a plain kohya ``lora_unet_…`` file) on a tiny diffusers UNet: the LBW-17
block split, recombined with a block-weight string, gives the same UNet output as scaling those blocks at run time."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit as lk
from lorakit.blocks import vocabulary
from lorakit.ops import export_lbw, load_split, plot_block_energy, recombine, save_split, set_block_strengths, split
from tests.conftest import randomize_b

diffusers = pytest.importorskip("diffusers")

LBW = "1,0,0.5,1,0,1,1,0.25,1,0,1,1,0.5,1,1,0,1"
ATTN_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.2"]


@pytest.fixture(scope="module")
def unet_and_inputs():
    """A UNet with SD1.5's block structure (4 levels, 2 layers per block, cross-attention in the first 3)."""
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(8, 8, 16, 16),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4).eval()
    g = torch.Generator().manual_seed(1)
    inputs = (torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 3, 8, generator=g))
    return unet, inputs


def _run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(*inputs).sample


@pytest.fixture(scope="module")
def adapter(unet_and_inputs):
    unet, _ = unet_and_inputs
    model = copy.deepcopy(unet)
    lk.inject(model, ATTN_TARGETS, rank=2, alpha=3, seed=0)
    randomize_b(model, seed=2)
    return lk.extract(model)


def _kohya_file(adapter, unet, path):
    """Write ``adapter`` as a plain kohya SD1.5 file (``lora_unet_…`` keys, no lorakit hints) and read it back."""
    from lorakit.formats import kohya
    from lorakit.formats.common import EXTRAS_KEY
    from lorakit.formats.safetensors_io import write_safetensors

    tensors, metadata = kohya.to_tensors(adapter, root="unet")
    assert all(k.startswith("lora_unet_") for k in tensors)
    write_safetensors(tensors, path, {k: v for k, v in metadata.items() if k != EXTRAS_KEY})
    return kohya.load(path, root="unet", known_paths=[p for p, _ in unet.named_modules() if p])


@pytest.mark.parametrize("source", ["native", "kohya"])
def test_lbw17_split_recombined_with_block_weights_equals_run_time_scaling(unet_and_inputs, adapter, tmp_path,
                                                                           source):
    unet, inputs = unet_and_inputs
    if source == "kohya":
        loaded = _kohya_file(adapter, unet, tmp_path / "kohya_lora.safetensors")
        assert sorted(loaded.paths) == sorted(adapter.paths)
        adapter = loaded
    else:
        lk.save(adapter, tmp_path / "lora.safetensors")
        adapter = lk.load(tmp_path / "lora.safetensors")

    s = split(adapter, "block", family="sd15")
    # a standard (attention-only) SD1.5 LoRA covers exactly the UNet blocks of the 17-block LBW vocabulary
    assert set(s.names) == set(vocabulary("sd15", 17)) - {"BASE"}
    save_split(s, tmp_path / "pkg")

    baked = recombine(load_split(tmp_path / "pkg"), LBW)
    by_string = copy.deepcopy(unet)
    lk.attach(by_string, baked)

    run_time = copy.deepcopy(unet)
    lk.attach(run_time, adapter)
    set_block_strengths(run_time, LBW, family="sd15")
    assert export_lbw(run_time, family="sd15", size=17) == LBW

    torch.testing.assert_close(_run(by_string, inputs), _run(run_time, inputs), rtol=1e-5, atol=1e-6)
    # and the weights mattered
    full = copy.deepcopy(unet)
    lk.attach(full, adapter)
    assert not torch.allclose(_run(full, inputs), _run(run_time, inputs), atol=1e-5)

    if source == "native":
        plot_block_energy(adapter, tmp_path / "energy.png", family="sd15")
        assert (tmp_path / "energy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
