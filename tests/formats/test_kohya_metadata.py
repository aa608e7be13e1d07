"""kohya text-encoder spelling (``lora_te_text_model_…``, SDXL's ``lora_te1_``/``lora_te2_``) and ``ss_*`` metadata:
checked reading, hostile values, header round trip, kohya's ``sshs_*`` hashes."""

from __future__ import annotations

import hashlib

import pytest
import torch

from lorakit.adapter import Adapter, ModuleLora
from lorakit.errors import FileFormatError
from lorakit.formats import kohya, kohya_metadata, names
from lorakit.formats.common import EXTRAS_KEY
from lorakit.formats.safetensors_io import read_header, write_safetensors


def _mod(out: int, inp: int, r: int, alpha: float, seed: int) -> ModuleLora:
    g = torch.Generator().manual_seed(seed)
    return ModuleLora(torch.randn(r, inp, generator=g), torch.randn(out, r, generator=g), alpha, "linear")


SDXL = {"unet.down_blocks.1.attentions.0.proj_in": _mod(4, 4, 2, 2.0, 0),
        "text_encoder.encoder.layers.0.self_attn.q_proj": _mod(6, 6, 2, 1.5, 1),
        "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj": _mod(6, 6, 3, 4.0, 2),
        "text_encoder_2.text_projection": _mod(6, 6, 1, 1.0, 3)}


def _same(a: Adapter, b: Adapter) -> None:
    assert list(a.modules) == list(b.modules)
    for p, m in a.modules.items():
        assert torch.equal(m.A, b.modules[p].A) and torch.equal(m.B, b.modules[p].B) and m.alpha == b.modules[p].alpha


def test_sdxl_names_use_kohya_spelling_and_round_trip():
    adapter = Adapter(SDXL)
    tensors, meta = kohya.to_tensors(adapter)
    stems = {k.rsplit(".", 2)[0] if k.endswith("weight") else k.rsplit(".", 1)[0] for k in tensors}
    assert stems == {"lora_unet_down_blocks_1_attentions_0_proj_in",
                     "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                     "lora_te2_text_model_encoder_layers_0_self_attn_q_proj", "lora_te2_text_projection"}
    _same(kohya.from_tensors(tensors, meta), adapter)  # with lorakit's hints
    bare = {k: v for k, v in meta.items() if k != EXTRAS_KEY}
    _same(kohya.from_tensors(tensors, bare, known_paths=list(SDXL)), adapter)  # with the model's own paths
    guessed = kohya.from_tensors(tensors, bare)  # neither: the name as written
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj" in guessed.modules


def test_diffusers_converter_reads_our_text_encoder_names():
    pytest.importorskip("diffusers")
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers

    tensors, _ = kohya.to_tensors(Adapter({"text_encoder.encoder.layers.0.self_attn.q_proj": _mod(6, 6, 2, 1.5, 1)}))
    converted, _ = _convert_non_diffusers_lora_to_diffusers(dict(tensors))
    # diffusers' intermediate (pre-PEFT) spelling of q_proj, under the text_model level the name carries
    assert set(converted) == {"text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.down.weight",
                              "text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora.up.weight"}


GOOD = {"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "4.0",
        "ss_network_args": '{"conv_dim": "2", "conv_alpha": "1.0"}', "ss_resolution": "(64, 64)", "ss_steps": "3",
        "ss_learning_rate": "0.01", "ss_text_encoder_lr": "None", "ss_v2": "False",
        "ss_tag_frequency": '{"2_ink": {"ink": 4, "duotone": 4}, "1_plain": {"a plain picture": 1}}',
        "ss_training_comment": "hello", "ss_something_new": "kept as is"}


def test_ss_values_parse_typed_and_summary():
    typed = kohya_metadata.parse(GOOD)
    assert typed["ss_network_dim"] == 4 and typed["ss_network_alpha"] == 4.0 and typed["ss_resolution"] == (64, 64)
    assert typed["ss_text_encoder_lr"] is None and typed["ss_v2"] is False
    assert typed["ss_something_new"] == "kept as is"
    s = kohya_metadata.summary(GOOD)
    assert s["tag_frequency"] == [["duotone", 4], ["ink", 4], ["a plain picture", 1]] and s["comment"] == "hello"


@pytest.mark.parametrize("key,value,why", [("ss_network_dim", "abc", "ss_network_dim"),
                                          ("ss_tag_frequency", "{not json", "ss_tag_frequency"),
                                          ("ss_tag_frequency", "[" * 40 + "]" * 40, "deeper"),
                                          ("ss_tag_frequency", '{"a": {"b": "3"}}', "integer"),
                                          ("ss_v2", "yes", "ss_v2")])
def test_hostile_ss_values_are_refused_naming_the_key(tmp_path, key, value, why):
    tensors, meta = kohya.to_tensors(Adapter({"unet.x": _mod(4, 4, 2, 2.0, 0)}))
    path = tmp_path / "k.safetensors"
    write_safetensors(tensors, path, {**meta, **GOOD, key: value})
    with pytest.raises(FileFormatError, match=why) as e:
        kohya.load(path)
    assert key in str(e.value)


def test_header_round_trip_keeps_every_ss_key(tmp_path):
    adapter = Adapter({"unet.x": _mod(4, 4, 2, 2.0, 0)}, metadata=GOOD)
    kohya.save(adapter, tmp_path / "a.safetensors")
    again = kohya.load(tmp_path / "a.safetensors")
    kohya.save(again, tmp_path / "b.safetensors")
    meta = read_header(tmp_path / "b.safetensors")[1]
    assert {k: v for k, v in meta.items() if k.startswith("ss_")} == GOOD


def test_addnet_hashes_are_the_data_section_and_legacy_span(tmp_path):
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(300_000, dtype=torch.float32).reshape(3, -1)}
    meta = {"ss_steps": "3", "other": "ignored"}
    model, legacy = kohya_metadata.addnet_hashes(tensors, meta)
    write_safetensors(tensors, tmp_path / "f.safetensors", meta)
    raw = (tmp_path / "f.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    assert model == hashlib.sha256(raw[8 + n:]).hexdigest()
    from safetensors.torch import save
    only_ss = save(tensors, {"ss_steps": "3"})
    assert legacy == hashlib.sha256(only_ss[0x100000:0x110000]).hexdigest()[:8] != "e3b0c442"
    assert kohya_metadata.addnet_hashes({"k": torch.zeros(2)}, {})[1] == "e3b0c442"  # under 1 MiB: empty span
