"""task diffusion on a CUDA device: the tiny SD-1.5 pipeline trained in bf16, fp16 and fp32 on the GPU.

Marked ``cuda`` and skipped as a whole without a CUDA device (``pytest -m cuda`` selects it on a GPU machine). TF32
is off so that float32 comparisons with the CPU mean float32.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("exact_float32")]  # float32 means float32
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)
pytest.importorskip("diffusers")

import lorakit as lk  # noqa: E402
from lorakit.formats import detect  # noqa: E402
from lorakit.train import loop, train  # noqa: E402

CUDA = torch.device("cuda", 0)
LORA = {"targets": [r"re:unet\..*(to_q|to_k|to_v|to_out\.0|conv1)", r"re:text_encoder\..*q_proj"]}


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_precision_steps_on_cuda_lower_the_loss(tiny_sd_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     precision: str, dtype: torch.dtype) -> None:
    seen: list[tuple[torch.device, torch.dtype]] = []
    real_build = loop.build_task

    def build(cfg):
        task = real_build(cfg)
        task.model.unet.conv_out.register_forward_hook(lambda m, a, out: seen.append((out.device, out.dtype)))
        return task

    monkeypatch.setattr(loop, "build_task", build)
    t0 = time.perf_counter()
    result = train(tiny_sd_config(tmp_path / precision, optim={"max_steps": 6}, lora=LORA,
                                  run={"device": "cuda", "precision": precision}))
    assert time.perf_counter() - t0 < 120
    assert all(p.device == CUDA for p in result.model.parameters())
    assert seen and set(seen) == {(CUDA, dtype)}  # the UNet ran in half precision on the GPU
    assert result.final_metrics["eval_loss"] < result.base_metrics["eval_loss"] - 0.01
    adapter = lk.load(result.adapter_last)
    assert all(m.A.dtype == torch.float32 for m in adapter.modules.values())  # factors stay fp32 under autocast
    assert any(p.startswith("text_encoder.") for p in adapter.modules)


def test_fp32_on_cuda_matches_the_cpu_and_resumes_exactly(tiny_sd_config, tmp_path: Path, interrupt_after,
                                                          same_adapter) -> None:
    opts = {"max_steps": 5}
    extra = {"caption_dropout": 0.3, "shuffle_captions": True, "noise_offset": 0.05, "min_snr_gamma": 5.0}
    cpu = train(tiny_sd_config(tmp_path / "cpu", optim=opts, diffusion=extra, lora=LORA, run={"device": "cpu"}))
    gpu = train(tiny_sd_config(tmp_path / "gpu", optim=opts, diffusion=extra, lora=LORA, run={"device": "cuda"}))
    # the same batches, noise and timesteps (drawn on the CPU generator): only the arithmetic differs
    same_adapter(cpu.adapter_last, gpu.adapter_last, rtol=1e-3, atol=1e-4)
    cut = tiny_sd_config(tmp_path / "cut", optim=opts, diffusion=extra, lora=LORA,
                         run={"device": "cuda", "checkpoint_every": 2})
    interrupt_after(cut, 3)
    resumed = train(cut, resume=True)
    same_adapter(gpu.adapter_last, resumed.adapter_last, rtol=1e-5)


def test_kohya_file_of_a_cuda_run_loads_in_diffusers_on_cuda(tiny_sd_config, tiny_sd: Path, tmp_path: Path) -> None:
    from diffusers import StableDiffusionPipeline

    result = train(tiny_sd_config(tmp_path / "run", optim={"max_steps": 3, "lr": 5e-2}, lora=LORA,
                                  run={"device": "cuda", "precision": "bf16"}))
    kohya_file = result.adapter_last.with_name("adapter-last.kohya.safetensors")
    assert detect.detect(kohya_file) == "kohya"
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None,
                                                   requires_safety_checker=False).to(CUDA)
    g = torch.Generator().manual_seed(0)
    sample, t = torch.randn(2, 4, 8, 8, generator=g).to(CUDA), torch.tensor([10, 500], device=CUDA)
    ctx = torch.randn(2, 5, 16, generator=g).to(CUDA)

    def run(unet):
        with torch.no_grad():
            return unet(sample, t, encoder_hidden_states=ctx).sample

    ours = copy.deepcopy(pipe.unet)
    adapter = lk.load(result.adapter_last)
    lk.attach(ours, lk.Adapter({p.removeprefix("unet."): m for p, m in adapter.modules.items()
                                if p.startswith("unet.")}, base_model=adapter.base_model))
    expected = run(ours)
    assert (expected - run(pipe.unet)).abs().max() > 1e-3
    pipe.load_lora_weights(str(kohya_file))
    torch.testing.assert_close(run(pipe.unet), expected, atol=1e-5, rtol=0)
