"""The GPU path: inject, the fast path, mixed batches, merge, half-precision bases, the training loop and DDP on NCCL.

Marked ``cuda`` and skipped as a whole without a CUDA device (``pytest -m cuda`` selects it on a GPU machine).
Everything is compared against the same computation on the GPU's own plain path or on the CPU, with TF32 off so
float32 means float32.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.cuda, pytest.mark.usefixtures("exact_float32")]  # float32 means float32
if not torch.cuda.is_available():
    pytest.skip("no CUDA device", allow_module_level=True)

import lorakit as lk  # noqa: E402
from lorakit.layers import fast  # noqa: E402
from lorakit.train import TrainConfig, train  # noqa: E402
from lorakit.train import loop  # noqa: E402
from tests.conftest import TinyNet, randomize_b  # noqa: E402
from tests.train.conftest import _Interrupt, _StopAt, assert_same_adapter, free_port, spy_ddp  # noqa: E402

CUDA = torch.device("cuda", 0)


def _inputs(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids, img = torch.randint(0, 20, (4, 7), generator=g), torch.randn(4, 3, 6, 6, generator=g)
    return ids.to(device), img.to(device)


def _tiny(device: torch.device) -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval().to(device)


def test_inject_on_a_cuda_model_matches_the_cpu() -> None:
    models = {}
    for label, device in (("cpu", torch.device("cpu")), ("gpu", CUDA)):
        model = _tiny(device)
        before = model(*_inputs(device))
        lk.inject(model, ["all-linear", "all-conv", "embed"], rank=2, seed=0)
        for _, layer in lk.lora_layers(model):
            f = layer.lora["default"]
            assert f.A.device.type == device.type and f.B.device.type == device.type
        torch.testing.assert_close(model(*_inputs(device)), before)  # B = 0: the base model's outputs
        models[label] = model
    # the seeded initialisation does not depend on the device
    for (path, a), (_, b) in zip(lk.lora_layers(models["cpu"]), lk.lora_layers(models["gpu"])):
        torch.testing.assert_close(b.lora["default"].A.cpu(), a.lora["default"].A, rtol=0, atol=0, msg=path)
    randomize_b(models["cpu"]), randomize_b(models["gpu"])
    torch.testing.assert_close(models["gpu"](*_inputs(CUDA)).cpu(), models["cpu"](*_inputs(torch.device("cpu"))),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_fast_path_train_step_equals_the_plain_path(dropout: float, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = fast.LoraLinearFn.apply
    monkeypatch.setattr(fast.LoraLinearFn, "apply", lambda *a: calls.append(1) or real(*a))
    results = []
    for use_fast in (True, False):
        model = _tiny(CUDA).train()
        lk.inject(model, ["all-linear", "all-conv"], rank=3, dropout=dropout, seed=0)
        randomize_b(model)
        for _, layer in lk.lora_layers(model):
            layer.use_fast_path = use_fast
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        torch.manual_seed(42)  # the same dropout masks on both paths
        out = model(*_inputs(CUDA))
        (out * torch.linspace(-1, 1, out.numel(), device=CUDA).view_as(out)).sum().backward()
        opt.step()
        results.append([out.detach()] + [p.detach().clone() for p in model.parameters() if p.requires_grad])
        if use_fast:
            assert calls, "the fast path was not taken on CUDA"
            calls.clear()
    assert not calls  # the plain run stayed plain
    for fast_t, plain_t in zip(*results):
        torch.testing.assert_close(fast_t, plain_t, rtol=1e-5, atol=1e-5)


def test_mixed_batch_on_cuda_equals_per_sample_runs() -> None:
    model = _tiny(CUDA)
    lk.inject(model, ["all-linear", "all-conv", "embed"], rank=2, name="a", seed=0)
    lk.inject(model, ["all-linear", "conv2"], rank=5, alpha=3, name="b", seed=1)
    randomize_b(model, "a", seed=1)
    randomize_b(model, "b", seed=2)
    ids, img = _inputs(CUDA)
    for order in (["a", "a", "b", None], ["b", None, "a", "b"]):  # contiguous runs and a gathered one
        with torch.no_grad(), lk.mixed_batch(model, order):
            mixed = model(ids, img)
        for i, name in enumerate(order):
            with torch.no_grad(), lk.disabled(model, [n for n in ("a", "b") if n != name]):
                alone = model(ids[i:i + 1], img[i:i + 1])
            torch.testing.assert_close(mixed[i:i + 1], alone, rtol=1e-5, atol=1e-5, msg=f"{order} sample {i}")


def test_merge_and_unmerge_on_cuda() -> None:
    model = _tiny(CUDA)
    weights = {k: t.clone() for k, t in model.state_dict().items()}
    lk.inject(model, ["all-linear", "all-conv", "embed"], rank=2, seed=0)
    randomize_b(model)
    with torch.no_grad():
        y = model(*_inputs(CUDA))
        lk.merge(model)
        torch.testing.assert_close(model(*_inputs(CUDA)), y, rtol=1e-5, atol=1e-5)
        lk.merge(model)  # idempotent
        torch.testing.assert_close(model(*_inputs(CUDA)), y, rtol=1e-5, atol=1e-5)
        lk.unmerge(model)
        torch.testing.assert_close(model(*_inputs(CUDA)), y, rtol=1e-5, atol=1e-5)
        lk.detach(model)
    for k, t in model.state_dict().items():
        torch.testing.assert_close(t, weights[k], rtol=1e-6, atol=1e-6, msg=k)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fp32_adapter_on_a_half_precision_cuda_model(dtype: torch.dtype) -> None:
    source = _tiny(torch.device("cpu"))
    lk.inject(source, ["all-linear", "all-conv"], rank=2, seed=0)
    randomize_b(source)
    adapter = lk.extract(source)
    assert adapter.dtype == torch.float32
    reference = source(*_inputs(torch.device("cpu")))
    model = _tiny(CUDA).to(dtype)
    lk.attach(model, adapter)
    for path, layer in lk.lora_layers(model):
        f = layer.lora["default"]
        assert (f.A.dtype, f.B.dtype, f.A.device.type) == (dtype, dtype, "cuda"), path
    ids, img = _inputs(CUDA)
    with torch.no_grad():
        out = model(ids, img.to(dtype))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float().cpu(), reference.detach(), rtol=3e-2, atol=3e-2)


def _corpus(tmp_path: Path) -> Path:
    words = "the film is a quiet triumph of small gestures and the cast is wonderful but the plot drags".split()
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(words[(i * 7 + j) % len(words)] for j in range(6 + i % 5))
                              for i in range(120)) + "\n", encoding="utf-8")
    return path


def _lm_config(tmp_path: Path, name: str, device: str, **run) -> TrainConfig:
    return TrainConfig.from_dict({
        "task": "causal-lm", "model": {"name": "tiny-gpt2"},
        "data": {"dataset": "text-file", "path": str(_corpus(tmp_path)), "max_length": 32, "eval_rows": 4},
        "lora": {"targets": ["all-linear"], "rank": 4, "alpha": 8, "dropout": 0.1},
        "optim": {"lr": 5e-3, "batch_size": 4, "warmup_steps": 2, "max_steps": 6},
        "run": {"out_dir": str(tmp_path / name), "seed": 3, "log_every": 1, "eval_before": False, "device": device,
                **run}})


def test_training_steps_on_cuda_with_bf16_and_an_exact_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    seen: list[tuple[torch.device, torch.dtype]] = []
    real_build = loop.build_task

    def build(cfg):
        task = real_build(cfg)
        task.model.lm_head.register_forward_hook(lambda m, args, out: seen.append((out.device, out.dtype)))
        return task

    monkeypatch.setattr(loop, "build_task", build)
    cfg = _lm_config(tmp_path, "bf16", "cuda", precision="bf16")
    result = train(cfg)
    assert all(p.device == CUDA for p in result.model.parameters())
    assert seen and set(seen) == {(CUDA, torch.bfloat16)}
    assert torch.isfinite(torch.tensor(result.final_metrics["eval_loss"]))
    monkeypatch.setattr(loop, "build_task", real_build)

    full = train(_lm_config(tmp_path, "full", "cuda"))
    cut = _lm_config(tmp_path, "cut", "cuda", checkpoint_every=3)
    with pytest.raises(_Interrupt):
        train(cut, reporter=_StopAt(5))
    torch.manual_seed(1234)  # the resumed run takes its CPU and CUDA RNG (dropout masks) from the checkpoint
    resumed = train(cut, resume=True)
    assert_same_adapter(full.adapter_last, resumed.adapter_last, rtol=1e-4, atol=1e-5)
    # the same run on the CPU ends close by (no dropout: the two devices draw different masks)
    cpu_cfg, gpu_cfg = _lm_config(tmp_path, "cpu", "cpu"), _lm_config(tmp_path, "gpu", "cuda")
    cpu_cfg.lora.dropout = gpu_cfg.lora.dropout = 0.0
    cpu, gpu = train(cpu_cfg), train(gpu_cfg)
    assert gpu.final_metrics["eval_loss"] == pytest.approx(cpu.final_metrics["eval_loss"], rel=1e-3)


def test_one_process_ddp_on_nccl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    cfg = _lm_config(tmp_path, "single", "cuda")
    cfg.lora.dropout = 0.0
    single = train(cfg)
    wrapped = spy_ddp(monkeypatch)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert dist.get_backend() == "nccl"
        cfg = _lm_config(tmp_path, "ddp", "cuda", checkpoint_every=3)  # a checkpoint gathers RNG over NCCL
        cfg.lora.dropout = 0.0
        ddp = train(cfg)
    finally:
        dist.destroy_process_group()
    assert wrapped == [{"device_ids": [0]}]
    assert_same_adapter(single.adapter_last, ddp.adapter_last, rtol=1e-4, atol=1e-5)
