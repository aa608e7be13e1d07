"""Malformed and mixed-dialect files: errors name the offending key; the CLI converts and inspects any dialect."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner

from lorakit.adapter import adapters_equal
from lorakit.cli import app
from lorakit.errors import FileFormatError, LorakitError
from lorakit.formats import detect, diffusers, kohya, peft
from tests.formats.test_interop_roundtrip import make_adapter

DOWN = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"
UP = "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight"


def _kohya_file(tmp_path, extra: dict | None = None, name: str = "k.safetensors"):
    tensors = {DOWN: torch.randn(2, 6), UP: torch.randn(5, 2), DOWN.replace("lora_down.weight", "alpha"):
               torch.tensor(1.0), **(extra or {})}
    path = tmp_path / name
    save_file(tensors, str(path))
    return path


def test_mixed_dialects_name_a_key_of_each(tmp_path):
    path = _kohya_file(tmp_path, {"unet.mid_block.attentions.0.proj_in.lora_A.weight": torch.randn(2, 6)})
    with pytest.raises(FileFormatError) as e:
        detect.detect(path)
    msg = str(e.value)
    assert "mixed dialects" in msg and "unet.mid_block.attentions.0.proj_in.lora_A.weight" in msg
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in msg and str(path) in msg


def test_unknown_key_is_named(tmp_path):
    path = _kohya_file(tmp_path, {"lora_unet_x.hada_w1_a": torch.randn(2, 2)})
    with pytest.raises(FileFormatError, match="lora_unet_x.hada_w1_a"):
        detect.detect(path)
    with pytest.raises(FileFormatError, match="lora_unet_x.hada_w1_a"):
        kohya.load(path)


def test_missing_up_and_bad_shapes_are_all_listed(tmp_path):
    path = _kohya_file(tmp_path, {"lora_unet_mid_block_attentions_0_proj_out.lora_down.weight": torch.randn(2, 6),
                                  "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(2, 6),
                                  "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.randn(5, 3)})
    with pytest.raises(FileFormatError) as e:
        detect.read_any(path)
    msg = str(e.value)
    assert "lora_unet_mid_block_attentions_0_proj_out.lora_up.weight" in msg  # the missing key, named
    assert "text_encoder.text_model.encoder.layers.0.mlp.fc1" in msg and "rank mismatch" in msg


def test_kohya_name_absent_from_model_is_named(tmp_path):
    path = _kohya_file(tmp_path)
    with pytest.raises(FileFormatError, match="lora_unet_down_blocks_0_attentions_0_proj_in"):
        kohya.load(path, root="unet", known_paths=["down_blocks.0.attentions.0.proj_out"])
    ok = kohya.load(path, root="unet", known_paths=["down_blocks.0.attentions.0.proj_in"])
    assert list(ok.modules) == ["down_blocks.0.attentions.0.proj_in"] and ok.modules[
        "down_blocks.0.attentions.0.proj_in"].alpha == 1.0


def test_bad_alpha_and_peft_config(tmp_path):
    path = _kohya_file(tmp_path, {DOWN.replace("lora_down.weight", "alpha"): torch.ones(2)})
    with pytest.raises(FileFormatError, match="alpha must hold one value"):
        detect.read_any(path)
    adapter = make_adapter([2] * 6, [3.0] * 6)
    directory = tmp_path / "p"
    peft.save(adapter, directory)
    config = json.loads((directory / peft.CONFIG_NAME).read_text())
    (directory / peft.CONFIG_NAME).write_text(json.dumps({**config, "r": 3}))
    with pytest.raises(FileFormatError, match="config says rank 3"):
        peft.load(directory)
    (directory / peft.CONFIG_NAME).write_text("{not json")
    with pytest.raises(FileFormatError, match="not valid JSON"):
        detect.read_any(directory)
    with pytest.raises(FileFormatError, match="without their adapter_config.json"):
        detect.detect(directory / peft.WEIGHTS_NAME)


def test_diffusers_legacy_processor_keys(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor"
    tensors = {f"{base}.to_q_lora.down.weight": torch.randn(2, 6, generator=g),
               f"{base}.to_q_lora.up.weight": torch.randn(5, 2, generator=g),
               f"{base}.to_out_lora.down.weight": torch.randn(2, 6, generator=g),
               f"{base}.to_out_lora.up.weight": torch.randn(5, 2, generator=g)}
    save_file(tensors, str(tmp_path / "old.safetensors"))
    assert detect.detect(tmp_path / "old.safetensors") == "diffusers"
    a = detect.read_any(tmp_path / "old.safetensors", root="unet")
    stem = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    assert sorted(a.modules) == [f"{stem}.to_out.0", f"{stem}.to_q"] and a[f"{stem}.to_q"].alpha == 2.0
    with pytest.raises(FileFormatError, match="bogus"):
        diffusers.from_tensors({**tensors, "unet.x.bogus": torch.zeros(1)}, {})


def test_unknown_dialect_and_missing_component():
    with pytest.raises(LorakitError, match="unknown dialect"):
        detect.write(make_adapter([1] * 6, [1.0] * 6), "x", "onnx")
    with pytest.raises(LorakitError, match="no component"):
        kohya.to_tensors(make_adapter([1] * 6, [1.0] * 6))


def test_cli_convert_and_inspect_any_dialect(tmp_path):
    adapter = make_adapter([2, 3, 4, 1, 2, 5], [3.0, 0.5, 7.0, 1.0, 9.0, 2.0])
    detect.write(adapter, tmp_path / "a.safetensors", "native")
    runner = CliRunner()
    res = runner.invoke(app, ["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "k.safetensors"),
                              "--to", "kohya", "--root", "unet"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["convert", str(tmp_path / "k.safetensors"), str(tmp_path / "p"), "--to", "peft"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["convert", str(tmp_path / "p"), str(tmp_path / "b.safetensors"), "--to", "native"])
    assert res.exit_code == 0, res.output
    assert adapters_equal(detect.read_any(tmp_path / "b.safetensors"), adapter)
    for path, dialect in [(tmp_path / "k.safetensors", "kohya"), (tmp_path / "p", "peft")]:
        res = runner.invoke(app, ["inspect", str(path), "--json"])
        assert res.exit_code == 0, res.output
        info = json.loads(res.output)
        assert info["dialect"] == dialect and info["num_modules"] == 6 and info["total_rank"] == 17
    res = runner.invoke(app, ["inspect", str(tmp_path / "k.safetensors")], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "kohya" in res.output


def test_cli_convert_lossy_flag(tmp_path):
    adapter = make_adapter([2] * 6, [3.0] * 6, rslora=True)
    detect.write(adapter, tmp_path / "a.safetensors", "native")
    runner = CliRunner()
    args = ["convert", str(tmp_path / "a.safetensors"), str(tmp_path / "k.safetensors"), "--to", "kohya",
            "--root", "unet"]
    res = runner.invoke(app, args)
    assert res.exit_code == 1 and "rsLoRA" in res.stderr
    res = runner.invoke(app, [*args, "--lossy"])
    assert res.exit_code == 0, res.output
    back = detect.read_any(tmp_path / "k.safetensors")
    m = back["mid_block.attentions.0.proj_in"]
    assert not m.rslora and abs(m.scale - adapter["mid_block.attentions.0.proj_in"].scale) < 1e-12
