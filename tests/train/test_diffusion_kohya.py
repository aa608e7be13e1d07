"""The kohya file a diffusion run writes beside its native adapter: ss_* training metadata, hashes, and the file
loaded by real diffusers changes the UNet and the text encoder exactly as lorakit's attach does."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import lorakit as lk
from lorakit.formats import detect, kohya_metadata
from lorakit.formats.safetensors_io import read_safetensors
from lorakit.train import train
from lorakit.train.kohya_export import dataset_facts, export_path

pytest.importorskip("diffusers")

TARGETS = [r"re:unet\..*(to_q|to_k|to_v|to_out\.0|conv1)", r"re:text_encoder\..*(q_proj|k_proj|v_proj|out_proj)"]


@pytest.fixture(scope="module")
def run(tiny_sd_config_module):
    """One 3-step run with a UNet LoCon (conv rank 2) and a text-encoder LoRA, alphas unlike the ranks."""
    cfg = tiny_sd_config_module(
        optim={"max_steps": 3, "lr": 5e-2},
        lora={"targets": TARGETS, "rank": 4, "alpha": 2, "ranks": {"re:.*conv1": 2}, "alphas": {"re:.*conv1": 1}},
        diffusion={"training_comment": "trigger: ink", "text_encoder_lr": 1e-3, "noise_offset": 0.05},
        run={"eval_every": 2, "save_every": 1, "keep_last": 2})
    return cfg, train(cfg)


@pytest.fixture(scope="module")
def tiny_sd_config_module(tiny_sd: Path, tmp_path_factory):
    from sd_tiny import build_images

    from lorakit.train.config import TrainConfig

    root = tmp_path_factory.mktemp("kohya-run")
    sd_images, out = build_images(root / "images"), root / "run"

    def make(**sections) -> TrainConfig:
        raw = {"task": "diffusion", "model": {"name": str(tiny_sd)},
               "data": {"dataset": "image-folder", "path": str(sd_images)},
               "optim": {"batch_size": 2, "schedule": "constant"},
               "diffusion": {"resolution": 64, "min_bucket_resolution": 32, "max_bucket_resolution": 128,
                             "bucket_step": 16},
               "run": {"out_dir": str(out), "seed": 0, "log_every": 1}}
        for name, values in sections.items():
            raw[name] = {**raw.get(name, {}), **values}
        return TrainConfig.from_dict(raw)

    return make


def test_each_saved_adapter_has_its_kohya_file(run) -> None:
    _, result = run
    for native in (result.adapter_last, result.adapter_best):
        path = export_path(native)
        assert path.name == Path(native).name.replace(".safetensors", ".kohya.safetensors")
        assert detect.detect(path) == "kohya"
        ours, theirs = lk.load(native), detect.read_any(path)
        assert list(theirs.modules) == list(ours.modules)  # read back to the model's own paths
        for p, m in ours.modules.items():
            assert torch.equal(theirs.modules[p].lowrank_delta(), m.lowrank_delta()), p


def test_step_snapshots_have_their_kohya_files_and_only_the_last_two_stay(run, same_adapter) -> None:
    _, result = run
    names = sorted(p.name for p in result.run_dir.glob("adapter-step*"))
    assert names == ["adapter-step0000002.kohya.safetensors", "adapter-step0000002.safetensors",
                     "adapter-step0000003.kohya.safetensors", "adapter-step0000003.safetensors"]
    for step in (2, 3):
        native = result.run_dir / f"adapter-step{step:07d}.safetensors"
        assert kohya_metadata.parse(read_safetensors(export_path(native))[1])["ss_steps"] == step
    same_adapter(result.run_dir / "adapter-step0000003.safetensors", result.adapter_last, rtol=0, atol=0)


def test_training_metadata(run, tiny_sd: Path) -> None:
    cfg, result = run
    tensors, meta = read_safetensors(export_path(result.adapter_last))
    typed = kohya_metadata.parse(meta)
    assert typed["ss_network_module"] == "networks.lora"
    assert typed["ss_network_dim"] == 4 and typed["ss_network_alpha"] == 2.0
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0"}
    assert typed["ss_network_train_unet_only"] == "False"
    assert typed["ss_sd_model_name"] == tiny_sd.name and typed["ss_base_model_version"] == "sd_v1"
    assert typed["ss_v2"] is False
    assert typed["ss_resolution"] == (64, 64) and typed["ss_enable_bucket"] is True
    assert (typed["ss_min_bucket_reso"], typed["ss_max_bucket_reso"]) == (32, 128)
    # 4 images × 2 repeats + 1 × 1 = 9 examples; 3 steps of 2 = 6 examples: still the first epoch
    assert (typed["ss_steps"], typed["ss_epoch"], typed["ss_num_train_images"]) == (3, 1, 9)
    assert (typed["ss_learning_rate"], typed["ss_unet_lr"], typed["ss_text_encoder_lr"]) == (5e-2, 5e-2, 1e-3)
    assert typed["ss_noise_offset"] == 0.05 and typed["ss_min_snr_gamma"] is None
    assert typed["ss_seed"] == 0 and typed["ss_batch_size_per_device"] == 2
    assert typed["ss_mixed_precision"] == "no"  # accelerate's word for fp32, as kohya's scripts write it
    assert typed["ss_training_comment"] == "trigger: ink"
    assert typed["ss_dataset_dirs"] == {"2_ink": {"n_repeats": 2, "img_count": 4},
                                        "1_plain": {"n_repeats": 1, "img_count": 1}}
    assert typed["ss_tag_frequency"]["2_ink"] == {"ink": 4, "duotone": 4, "drawing 0": 1, "drawing 1": 1,
                                                  "drawing 2": 1, "drawing 3": 1}
    assert typed["ss_tag_frequency"]["1_plain"] == {"a plain picture": 1}
    assert typed["ss_training_started_at"] <= typed["ss_training_finished_at"]
    # hashes: the base's weight files (kohya's two rules) and the file's own (the additional-networks extension's)
    files = kohya_metadata.model_weight_files(tiny_sd, ("unet", "text_encoder", "vae"))
    assert len(files) == 3
    assert (meta["ss_sd_model_hash"], meta["ss_new_sd_model_hash"]) == kohya_metadata.model_hashes(files)
    assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == kohya_metadata.addnet_hashes(tensors, meta)
    summary = kohya_metadata.summary(meta)
    assert summary["dim"] == 4 and summary["steps"] == 3 and summary["comment"] == "trigger: ink"
    assert summary["tag_frequency"][:2] == [["duotone", 4], ["ink", 4]]


def test_dataset_facts_of_images_in_the_root_folder(tmp_path: Path) -> None:
    facts = dataset_facts(tmp_path, [(tmp_path / "a.png", "x, y, x", 1), (tmp_path / "3_b" / "b.png", "y", 3)])
    assert facts.folders == {tmp_path.name: (1, 1), "3_b": (3, 1)}
    assert facts.tag_frequency == {tmp_path.name: {"x": 1, "y": 1}, "3_b": {"y": 1}}  # a tag counts once an image
    assert facts.num_train_images == 4


def test_kohya_file_loads_in_diffusers_and_matches_attach(run, tiny_sd: Path) -> None:
    """UNet and text encoder after diffusers' load_lora_weights equal lorakit's attach of the native file."""
    from diffusers import StableDiffusionPipeline

    _, result = run
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_sd), safety_checker=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(0)
    sample, t, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 500]), torch.randn(2, 5, 16, generator=g)
    ids = pipe.tokenizer(["ink, drawing 0, duotone", "a plain picture"], padding="max_length", return_tensors="pt",
                         max_length=pipe.tokenizer.model_max_length, truncation=True).input_ids

    def outputs(unet, text_encoder):
        with torch.no_grad():
            return unet(sample, t, encoder_hidden_states=ctx).sample, text_encoder(ids)[0]

    before = outputs(pipe.unet, pipe.text_encoder)
    adapter = lk.load(result.adapter_last)
    ours = {}
    for comp in ("unet", "text_encoder"):
        module = copy.deepcopy(getattr(pipe, comp))
        lk.attach(module, lk.Adapter({p.removeprefix(comp + "."): m for p, m in adapter.modules.items()
                                      if p.startswith(comp + ".")}, base_model=adapter.base_model))
        ours[comp] = module
    expected = outputs(ours["unet"], ours["text_encoder"])
    for b, e in zip(before, expected):
        assert (e - b).abs().max() > 1e-4  # the trained adapter does change both
    pipe.load_lora_weights(str(export_path(result.adapter_last)))
    got = outputs(pipe.unet, pipe.text_encoder)
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1], expected[1], atol=1e-5, rtol=0)


def test_inspect_shows_the_training_summary(run) -> None:
    from typer.testing import CliRunner

    from lorakit.cli import app

    _, result = run
    out = CliRunner().invoke(app, ["inspect", str(export_path(result.adapter_last)), "--json"])
    assert out.exit_code == 0, out.output
    info = json.loads(out.output)
    assert info["training"]["dim"] == 4 and info["training"]["comment"] == "trigger: ink"
    assert info["training"]["base_model"] == Path(info["training"]["base_model"]).name
    text = CliRunner().invoke(app, ["inspect", str(export_path(result.adapter_last))])
    assert text.exit_code == 0 and "trigger: ink" in text.output and "networks.lora" in text.output
