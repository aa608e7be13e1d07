"""FashionAE and its ``autoencoder`` task: shapes, the cached pretrained weights, the pretraining config file,
a tiny run of the task through the training loop, and LoRA prior matching pulling the codes onto N(0, I)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import lorakit as lk
from lorakit.models import fashion_ae
from lorakit.models.fashion_ae import LATENT_DIM, FashionAE, pretrain_config
from lorakit.models.hub import data_root
from lorakit.regularizers import OTConfig, ot_loss, sliced_wasserstein, tap
from lorakit.train import TrainConfig, train

ROOT = Path(__file__).resolve().parents[2]
needs_fashion_mnist = pytest.mark.skipif(not (data_root() / "fashion-mnist").is_dir(),
                                         reason=f"shared data folder {data_root() / 'fashion-mnist'} is absent "
                                                "(set LORAKIT_DATA)")


@torch.no_grad()
def test_shapes_and_range() -> None:
    torch.manual_seed(0)
    model = FashionAE().eval()
    x = torch.rand(3, 1, 28, 28)
    z = model.encode(x)
    assert z.shape == (3, LATENT_DIM)
    out = model(x)
    assert out.shape == x.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    torch.testing.assert_close(model.decode(z), out)
    assert model.sample(5, generator=torch.Generator().manual_seed(0)).shape == (5, 1, 28, 28)


def test_every_weight_layer_is_a_lora_target() -> None:
    model = FashionAE()
    weights = [n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    assert lk.find_targets(model, ["encoder.*", "decoder.*"]) == weights and len(weights) == 8


def test_pretraining_config_file_is_the_recipe() -> None:
    raw = yaml.safe_load((ROOT / "configs" / "fmnist-ae-pretrain.yaml").read_text())
    expected = pretrain_config(raw["run"]["out_dir"])
    assert TrainConfig.from_dict(raw).to_dict() == TrainConfig.from_dict(expected).to_dict()


def test_task_trains_through_the_loop_with_the_prior_term(tmp_path: Path) -> None:
    cfg = pretrain_config(tmp_path / "run")
    cfg["data"] = {"dataset": "synthetic", "train_rows": 32, "eval_rows": 16}
    cfg["optim"].update(batch_size=8, max_steps=3, warmup_steps=0)
    cfg["run"].update(log_every=1, eval_before=True)
    result = train(TrainConfig.from_dict(cfg))
    assert set(result.final_metrics) == {"mse", "prior_sw"} and result.metric == "mse"
    assert all("ot_loss" in r for r in result.history if r["kind"] == "train")
    assert isinstance(result.model, FashionAE)


def test_lora_prior_matching_pulls_the_codes_onto_the_prior() -> None:
    """A few LoRA steps of reconstruction + SW on smooth random images lower the SW of the codes to N(0, I)."""
    torch.manual_seed(0)
    model = FashionAE()
    lk.inject(model, ["encoder.*", "decoder.*"], rank=2, alpha=4, seed=0)
    coarse = torch.rand(24, 1, 7, 7, generator=torch.Generator().manual_seed(1))
    x = torch.nn.functional.interpolate(coarse, scale_factor=4)  # (24, 1, 28, 28)
    g = torch.Generator().manual_seed(2)
    prior = torch.randn(24, LATENT_DIM, generator=g)
    directions = torch.nn.functional.normalize(torch.randn(LATENT_DIM, 256, generator=g), dim=0)

    def posterior_sw() -> float:
        with torch.no_grad():
            return float(sliced_wasserstein(model.encode(x), prior, directions=directions))

    before = posterior_sw()
    cfg = OTConfig(tap="encoder", pair="prior", weight=1.0)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    for step in range(15):
        with tap(model, "encoder") as codes:
            recon = torch.nn.functional.mse_loss(model(x), x)
        loss = recon + ot_loss(cfg, codes[-1], None, step, generator=torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert posterior_sw() < 0.5 * before


@needs_fashion_mnist
def test_class_sets_follow_the_model(monkeypatch) -> None:
    from lorakit.train.data import read_fashion_mnist
    from lorakit.train.tasks import autoencoder

    images, labels = read_fashion_mnist("train")
    monkeypatch.setattr(fashion_ae, "pretrained_fashion_ae", lambda: FashionAE())  # no pretraining in a unit test
    for name, classes in (("fashion-ae-scratch", autoencoder.BASE_CLASSES), ("fashion-ae", autoencoder.NEW_CLASSES)):
        cfg = TrainConfig.from_dict({"task": "autoencoder", "model": {"name": name},
                                     "data": {"dataset": "fashion-mnist", "train_rows": 50, "eval_rows": 20},
                                     "lora": {"targets": [], "full_finetune": True}})
        task = autoencoder.build(cfg)
        pool = {img.tobytes() for img in autoencoder.class_images(images, labels, classes)}
        assert len(task.train_set) == 50 and len(task.eval_set) == 20
        assert all(img.tobytes() in pool for img in [*task.train_set, *task.eval_set])
        train_keys = {img.tobytes() for img in task.train_set}
        assert not train_keys & {img.tobytes() for img in task.eval_set}
