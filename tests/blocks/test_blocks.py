"""Block maps (golden names for SD1.5 / SDXL / text families), LBW strings and presets, selectors."""

from __future__ import annotations

import pytest

from lorakit.blocks import (
    OTHER,
    PRESETS_17,
    Selector,
    block_of,
    block_vocabulary,
    detect_family,
    format_lbw,
    group_by_block,
    parse_lbw,
    vocabulary,
)
from lorakit.errors import LorakitError, TargetError

SD15 = {
    "text_encoder.text_model.encoder.layers.3.self_attn.q_proj": "BASE",
    "conv_in": "IN00",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": "IN01",
    "unet.down_blocks.0.attentions.1.proj_in": "IN02",
    "down_blocks.0.downsamplers.0.conv": "IN03",
    "down_blocks.1.resnets.0.conv1": "IN04",
    "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.2": "IN08",
    "down_blocks.3.resnets.1.conv2": "IN11",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_k": "M00",
    "up_blocks.0.resnets.2.conv1": "OUT02",
    "up_blocks.0.upsamplers.0.conv": "OUT02",
    "up_blocks.1.attentions.0.proj_out": "OUT03",
    "up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_v": "OUT05",
    "up_blocks.3.attentions.2.transformer_blocks.0.attn1.to_out.0": "OUT11",
    "conv_out": "OUT11",
    "time_embedding.linear_1": "TIME",
    "something.else": OTHER,
}

SDXL = {
    "text_encoder_2.text_model.encoder.layers.0.mlp.fc1": "BASE",
    "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_k": "IN04",
    "down_blocks.2.attentions.1.proj_in": "IN08",
    "down_blocks.2.downsamplers.0.conv": "IN09",
    "mid_block.attentions.0.transformer_blocks.9.ff.net.0.proj": "M00",
    "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q": "OUT00",
    "up_blocks.0.attentions.2.proj_out": "OUT02",
    "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q": "OUT04",
    "conv_out": "OUT08",
}


@pytest.mark.parametrize("path,block", SD15.items())
def test_sd15_blocks(path, block):
    assert block_of(path, "sd15") == block


@pytest.mark.parametrize("path,block", SDXL.items())
def test_sdxl_blocks(path, block):
    assert block_of(path, "sdxl") == block


def test_lbw_vocabularies_match_the_tool():
    assert vocabulary("sd15", 17) == ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", "OUT03",
                                      "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11")
    assert len(vocabulary("sd15", 26)) == 26 and vocabulary("sd15", 26)[13] == "M00"
    assert vocabulary("sdxl", 12) == ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", "OUT00", "OUT01", "OUT02",
                                      "OUT03", "OUT04", "OUT05")
    assert vocabulary("sdxl", 20)[-1] == "OUT08" and len(vocabulary("sdxl", 20)) == 20
    # every block of a real SD1.5 attention LoRA is in the 17-block vocabulary
    attn = [p for p, b in SD15.items() if "attentions" in p or p.startswith("text_encoder")]
    assert {block_of(p, "sd15") for p in attn} <= set(vocabulary("sd15", 17))


def test_blora_blocks():
    assert block_of("unet.up_blocks.0.attentions.0.transformer_blocks.3.attn1.to_q", "blora") == "content"
    assert block_of("up_blocks.0.attentions.1.proj_out", "blora") == "style"
    assert block_of("up_blocks.0.attentions.10.proj_out", "blora") == OTHER
    assert block_of("down_blocks.2.attentions.1.proj_out", "blora") == OTHER


def test_text_families():
    assert block_of("bert.encoder.layer.4.attention.self.query", "bert") == "L04"
    assert block_of("bert.embeddings.word_embeddings", "bert") == "EMB"
    assert block_of("classifier", "bert") == "HEAD"
    assert block_of("transformer.h.11.attn.c_attn", "gpt2") == "L11"
    assert block_of("transformer.wte", "gpt2") == "EMB"
    assert block_of("model.layers.7.mlp.down_proj", "llama") == "L07"
    assert block_vocabulary("bert", ["encoder.layer.2.x"]) == ("EMB", "L00", "L01", "L02", "HEAD", OTHER)
    with pytest.raises(LorakitError, match="unknown block family"):
        block_of("x", "vit")


def test_detect_family():
    assert detect_family(["unet.down_blocks.3.resnets.0.conv1", "up_blocks.1.attentions.0.proj_in"]) == "sd15"
    assert detect_family(["down_blocks.2.attentions.1.proj_in"]) == "sdxl"
    assert detect_family(["bert.encoder.layer.0.attention.self.query"]) == "bert"
    assert detect_family(["transformer.h.0.attn.c_attn"]) == "gpt2"
    assert detect_family(["model.layers.0.self_attn.q_proj"]) == "llama"
    with pytest.raises(LorakitError):
        detect_family(["head"])


def test_group_by_block_keeps_vocabulary_order():
    paths = ["up_blocks.1.attentions.0.proj_in", "text_encoder.x.layers.0.q", "down_blocks.0.attentions.0.proj_in"]
    assert list(group_by_block(paths, "sd15")) == ["BASE", "IN01", "OUT03"]


def test_lbw_parse_and_format_round_trip():
    s = "1,0,0,0,0,0,0,0,1,1,1,1,1,1,1,1,1"
    parsed = parse_lbw(s)
    assert parsed == parse_lbw("OUTALL") and parsed["BASE"] == 1 and parsed["IN01"] == 0
    assert format_lbw(parsed, vocabulary("sd15", 17)) == s
    assert set(parse_lbw(",".join(["0.5"] * 26))) == set(vocabulary("sd15", 26))
    assert set(parse_lbw(",".join(["1"] * 12), "sdxl")) == set(vocabulary("sdxl", 12))
    assert all(len(v.split(",")) == 17 for v in PRESETS_17.values())
    with pytest.raises(LorakitError, match="no LBW vocabulary of 5"):
        parse_lbw("1,1,1,1,1")
    with pytest.raises(LorakitError, match="not a number"):
        parse_lbw("1,x,1")


def test_selectors_with_exclusion():
    paths = ["encoder.layer.0.attention.self.query", "encoder.layer.1.attention.self.query",
             "encoder.layer.1.intermediate.dense"]
    assert Selector.parse("layer.*.attention.**, !layer.0.**").select(paths) == paths[1:2]
    assert Selector.parse("!intermediate.dense").select(paths) == paths[:2]
    assert Selector.parse("re:.*layer\\.1\\..*").select(paths) == paths[1:]
    assert str(Selector.parse("a, !b")) == "a,!b"
    with pytest.raises(TargetError):
        Selector.parse(" , ")
    with pytest.raises(TargetError):
        Selector.parse("re:(")


def test_an_sdxl_attention_lora_covers_the_12_block_vocabulary():
    paths = [f"unet.down_blocks.{i}.attentions.{j}.transformer_blocks.0.attn1.to_q" for i in (1, 2) for j in (0, 1)]
    paths += ["unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k", "text_encoder_2.text_model.x.q_proj"]
    paths += [f"unet.up_blocks.{i}.attentions.{j}.proj_out" for i in (0, 1) for j in (0, 1, 2)]
    assert {block_of(p, "sdxl") for p in paths} == set(vocabulary("sdxl", 12))
