"""The SD image-folder data: kohya repeats and captions, caption options, buckets, latent cache, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lorakit.errors import LorakitError
from lorakit.train.config import ConfigError
from lorakit.train.data import DataError
from lorakit.train.diffusion_data import (assign_bucket, bucket_order, make_buckets, process_caption,
                                          scan_folder)
from lorakit.train.tasks import build_task


def test_scan_reads_repeats_captions_and_class_names(sd_images: Path) -> None:
    (sd_images / "1_plain" / "p0.txt").unlink()  # no caption file: the folder's class name
    recs = scan_folder(sd_images)
    assert [(r.path.relative_to(sd_images).as_posix(), r.caption, r.repeats) for r in recs] == [
        ("1_plain/p0.png", "plain", 1), ("2_ink/img0.png", "ink, drawing 0, duotone", 2),
        ("2_ink/img1.png", "ink, drawing 1, duotone", 2), ("2_ink/img2.png", "ink, drawing 2, duotone", 2),
        ("2_ink/img3.png", "ink, drawing 3, duotone", 2)]


def test_buckets_and_assignment_by_aspect() -> None:
    buckets = make_buckets(64, 32, 128, 16)
    assert buckets == [(32, 96), (32, 112), (32, 128), (48, 80), (64, 64), (80, 48), (96, 32), (112, 32),
                       (128, 32)]
    sizes = [(64, 64), (96, 64), (64, 96), (128, 80), (300, 100), (1000, 1001)]
    assert [assign_bucket(s, buckets) for s in sizes] == [(64, 64), (80, 48), (48, 80), (80, 48), (96, 32),
                                                          (64, 64)]
    # SD-1.5 sizes: 512² area, 64 px steps (kohya's defaults)
    sd = make_buckets(512, 256, 1024, 64)
    assert (512, 512) in sd and (640, 384) in sd and (768, 320) in sd and all(w * h <= 512 * 512 for w, h in sd)


def test_bucket_order_keeps_each_batch_in_one_bucket() -> None:
    buckets = [(64, 64)] * 3 + [(80, 48)] * 4 + [(48, 80)]
    idx = bucket_order(buckets, 2, seed=0, epoch=0)
    assert len(idx) % 2 == 0 and set(idx) == set(range(8)) and len(idx) == 10  # 3 → 4 and 1 → 2 (topped up)
    assert all(buckets[idx[k]] == buckets[idx[k + 1]] for k in range(0, len(idx), 2))
    assert idx == bucket_order(buckets, 2, seed=0, epoch=0) != bucket_order(buckets, 2, seed=0, epoch=1)


def test_caption_options() -> None:
    g = torch.Generator().manual_seed(0)
    text = process_caption("a, b, c, d", prefix="sks", shuffle=True, keep_tokens=1, dropout=0.0, generator=g)
    assert text == "sks, a, b, d, c"  # the prefix kept first, the rest shuffled (pinned for seed 0)
    assert process_caption("a, b", prefix="sks", shuffle=False, keep_tokens=0, dropout=0.0) == "sks, a, b"
    g = torch.Generator().manual_seed(0)
    dropped = [process_caption("a", prefix="", shuffle=False, keep_tokens=0, dropout=0.5, generator=g)
               for _ in range(200)]
    assert 80 < dropped.count("") < 120


def test_latents_are_cached_and_reused(tiny_sd_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from diffusers import AutoencoderKL

    calls = []
    real = AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: calls.append(x.shape) or real(self, x))
    cfg = tiny_sd_config(tmp_path / "run")
    first = build_task(cfg)
    assert sorted(calls) == sorted([(1, 3, 80, 48), (1, 3, 48, 80), (1, 3, 64, 64), (1, 3, 48, 80),
                                    (1, 3, 64, 64)])
    assert len(list((tmp_path / "run/cache/latents").glob("*.safetensors"))) == 5
    # repeats: the four 2_ink images twice, p0 once; each example's bucket follows its aspect
    assert len(first.train_set) == 9 and len(first.eval_set) == 5
    assert {e.path.name: e.bucket for e in first.eval_set} == {
        "p0.png": (64, 64), "img0.png": (64, 64), "img1.png": (80, 48), "img2.png": (48, 80), "img3.png": (80, 48)}
    assert first.eval_set[1].latent.shape == (4, 8, 8)
    calls.clear()
    second = build_task(cfg)
    assert calls == []  # every latent read from the cache
    for a, b in zip(first.eval_set, second.eval_set):
        assert torch.equal(a.latent, b.latent)
    img = tmp_path / "images/2_ink/img1.png"
    img.write_bytes(img.read_bytes() + b"\0")  # a changed file (size, mtime) is encoded again
    build_task(cfg)
    assert calls == [(1, 3, 48, 80)]


def test_folder_without_images(tiny_sd_config, tmp_path: Path) -> None:
    (tmp_path / "empty" / "10_x").mkdir(parents=True)
    cfg = tiny_sd_config(tmp_path / "run", data={"path": str(tmp_path / "empty")})
    with pytest.raises(DataError, match=r"empty: no images"):
        build_task(cfg)


def test_caption_not_utf8(tiny_sd_config, sd_images: Path, tmp_path: Path) -> None:
    (sd_images / "2_ink" / "img2.txt").write_bytes(b"caf\xe9 ink")
    with pytest.raises(DataError, match=r"img2\.txt: caption file is not UTF-8 \(byte 3\)"):
        build_task(tiny_sd_config(tmp_path / "run"))


def test_corrupt_image_fails_or_is_skipped(tiny_sd_config, sd_images: Path, tmp_path: Path) -> None:
    bad = sd_images / "2_ink" / "img1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match=r"img1\.png: cannot read image .*data\.skip_bad_images"):
        build_task(tiny_sd_config(tmp_path / "run"))
    with pytest.warns(UserWarning, match=r"skipped 1 unreadable image\(s\): .*img1\.png"):
        task = build_task(tiny_sd_config(tmp_path / "run", data={"skip_bad_images": True}))
    assert [e.path.name for e in task.eval_set] == ["p0.png", "img0.png", "img2.png", "img3.png"]


def test_resolution_must_be_divisible_by_8(tiny_sd_config, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'diffusion.resolution': expected a multiple of 8, >= 8, got 60"):
        tiny_sd_config(tmp_path / "run", diffusion={"resolution": 60})


def test_model_folder_missing_unet(tiny_sd_config, tiny_sd: Path, tmp_path: Path) -> None:
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd, broken, ignore=shutil.ignore_patterns("unet"))
    with pytest.raises(LorakitError, match=r"broken: model.name is not a Stable Diffusion folder: missing unet/$"):
        build_task(tiny_sd_config(tmp_path / "run", model={"name": str(broken)}))
