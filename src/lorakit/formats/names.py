"""Canonical module paths and the names other tools give them.

lorakit names a module by its dotted path in the model it adapts (``down_blocks.1.attentions.0.proj_in``,
``bert.encoder.layer.3.attention.self.query``). Two foreign spellings need work:

* **kohya / A1111 / ComfyUI** names are ``<prefix><path with "." replaced by "_">``, prefixes ``lora_unet_``,
  ``lora_te_`` (SD1.x text encoder), ``lora_te1_`` / ``lora_te2_`` (SDXL's two text encoders). Replacing ``.`` by
  ``_`` is not invertible (``to_q`` and ``to.q`` collide), so a name is turned back into a path by, in order:

  1. an exact table of known paths (:func:`kohya_table`): every path of a live model, or of a block map
     (:func:`family_paths`: the module tree of SD1.5 / SDXL UNets, CLIP text encoders, BERT, GPT-2 and Llama built
     on PyTorch's meta device, no weights), underscored and looked up;
  2. otherwise :func:`guess_path`, which splits at ``_`` and rejoins the pieces that form a known multi-word segment
     name (:data:`SEGMENTS`, e.g. ``transformer_blocks``, ``to_q``, ``self_attn``), longest first.

* **SGM / LDM** UNet names (``input_blocks.4.1.transformer_blocks.0.attn1.to_q``, used by kohya for SDXL and by the
  original Stability checkpoints) are mapped to and from the diffusers module tree by :func:`sgm_to_diffusers` and
  :func:`diffusers_to_sgm` (two resnets per down block, three per up block: SD1.5 and SDXL alike).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache

from lorakit.errors import LorakitError

#: Module-path segments that contain ``_`` in the model families lorakit knows (diffusers UNets, CLIP, BERT, GPT-2,
#: Llama). Used to rejoin a kohya name when no table of known paths is at hand.
SEGMENTS = frozenset("""
    down_blocks up_blocks mid_block transformer_blocks attentions resnets downsamplers upsamplers proj_in proj_out
    to_q to_k to_v to_out to_add_out add_q_proj add_k_proj add_v_proj conv_in conv_out conv_norm_out conv_shortcut
    time_emb_proj time_embedding linear_1 linear_2 add_embedding conv1 conv2 norm_out
    text_model text_projection self_attn q_proj k_proj v_proj o_proj out_proj fc1 fc2 final_layer_norm
    token_embedding position_embedding layer_norm1 layer_norm2 embed_tokens gate_proj up_proj down_proj lm_head
    word_embeddings position_embeddings token_type_embeddings LayerNorm c_attn c_proj c_fc wte wpe ln_f
    input_blocks middle_block output_blocks in_layers out_layers emb_layers skip_connection time_embed label_emb
    """.split())

#: kohya prefix of each model component; ``""`` is the bare model (paths without a component prefix).
KOHYA_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_1": "lora_te1_",
                  "text_encoder_2": "lora_te2_"}


def underscore(path: str) -> str:
    """kohya's spelling of a path: every ``.`` replaced by ``_``."""
    return path.replace(".", "_")


def guess_path(name: str) -> str:
    """Best-effort inverse of :func:`underscore` using the segment vocabulary :data:`SEGMENTS`.

    ``down_blocks_0_attentions_1_transformer_blocks_0_attn1_to_q`` →
    ``down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q``. Pieces are joined greedily, longest known
    segment first; a piece that starts no known segment stands alone.
    """
    pieces = name.split("_")
    out: list[str] = []
    i = 0
    while i < len(pieces):
        for j in range(len(pieces), i + 1, -1):
            cand = "_".join(pieces[i:j])
            if cand in SEGMENTS:
                out.append(cand)
                i = j
                break
        else:
            out.append(pieces[i])
            i += 1
    return ".".join(out)


def kohya_table(paths: Iterable[str]) -> dict[str, str]:
    """Underscored name → path for ``paths``.

    Raises:
        LorakitError: two paths collapse to the same underscored name (the table would be ambiguous).
    """
    table: dict[str, str] = {}
    clashes = []
    for p in paths:
        key = underscore(p)
        if key in table and table[key] != p:
            clashes.append(f"{table[key]!r} and {p!r} are both {key!r}")
        table[key] = p
    if clashes:
        raise LorakitError("ambiguous kohya names: " + "; ".join(clashes))
    return table


def model_paths(model) -> list[str]:
    """Paths of every module of ``model`` that can carry a LoRA (see :func:`lorakit.layers.base_kind`)."""
    from lorakit.layers import base_kind

    return [p for p, m in model.named_modules() if p and base_kind(m) is not None]


# ---------------------------------------------------------------------------------------------------------- SGM/LDM
_SGM_RESNET = {"in_layers.2": "conv1", "out_layers.3": "conv2", "emb_layers.1": "time_emb_proj",
               "skip_connection": "conv_shortcut"}
_SGM_TOP = {"input_blocks.0.0": "conv_in", "time_embed.0": "time_embedding.linear_1",
            "time_embed.2": "time_embedding.linear_2", "label_emb.0.0": "add_embedding.linear_1",
            "label_emb.0.2": "add_embedding.linear_2", "out.2": "conv_out", "out.0": "conv_norm_out"}
_PER_DOWN = 3  # layers_per_block (2) + 1 downsampler slot, in SD1.5 and SDXL
_PER_UP = 3    # layers_per_block + 1 resnets per up block


def _sub(rest: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old):]
    return rest


def sgm_to_diffusers(path: str) -> str:
    """Map an SGM/LDM UNet path (dotted) to the diffusers UNet path.

    Raises:
        LorakitError: the path is not in the SGM layout.
    """
    for old, new in _SGM_TOP.items():
        if path == old or path.startswith(old + "."):
            return new + path[len(old):]
    m = re.fullmatch(r"(input_blocks|output_blocks)\.(\d+)\.(\d+)(?:\.(.+))?", path) or \
        re.fullmatch(r"(middle_block)\.(\d+)(?:\.(.+))?", path)
    if m is None:
        raise LorakitError(f"{path!r} is not an SGM/LDM UNet module path")
    if m.group(1) == "middle_block":
        idx, rest = int(m.group(2)), m.group(3) or ""
        head = {0: "mid_block.resnets.0", 1: "mid_block.attentions.0", 2: "mid_block.resnets.1"}.get(idx)
        if head is None:
            raise LorakitError(f"{path!r}: middle_block has entries 0..2")
        inner = _sub(rest, _SGM_RESNET) if "resnets" in head else rest
        return ".".join(x for x in (head, inner) if x)
    block, sub, rest = int(m.group(2)), int(m.group(3)), m.group(4) or ""
    if m.group(1) == "input_blocks":
        down, layer = divmod(block - 1, _PER_DOWN)
        if rest == "op" or rest.startswith("op."):
            return f"down_blocks.{down}.downsamplers.0.conv" + rest[2:]
        head = f"down_blocks.{down}." + ("resnets" if sub == 0 else "attentions") + f".{layer}"
    else:
        up, layer = divmod(block, _PER_UP)
        if rest == "conv" or rest.startswith("conv."):  # the upsampler, at .1 or .2 depending on attention
            return f"up_blocks.{up}.upsamplers.0.conv" + rest[4:]
        head = f"up_blocks.{up}." + ("resnets" if sub == 0 else "attentions") + f".{layer}"
    inner = _sub(rest, _SGM_RESNET) if sub == 0 else rest
    return ".".join(x for x in (head, inner) if x)


def diffusers_to_sgm(path: str, has_attention: Iterable[int] = (0, 1, 2)) -> str:
    """Map a diffusers UNet path to its SGM/LDM path (inverse of :func:`sgm_to_diffusers`).

    Args:
        path: a diffusers UNet module path.
        has_attention: indices of the down blocks that have attention (SD1.5: 0, 1, 2; SDXL: 1, 2). Up block ``i``
            mirrors down block ``n-1-i`` with ``n = 4`` (SD1.5) or 3 (SDXL); this decides where an up block's
            upsampler sits (``.2`` after an attention, ``.1`` otherwise).
    """
    att = set(has_attention)
    n_down = 4 if 0 in att else 3
    for old, new in _SGM_TOP.items():
        if path == new or path.startswith(new + "."):
            return old + path[len(new):]
    m = re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)"
                     r"(?:\.(.+))?", path)
    if m is None:
        m2 = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)(?:\.(.+))?", path)
        if m2 is None:
            raise LorakitError(f"{path!r} has no SGM/LDM equivalent")
        kind, idx, rest = m2.group(1), int(m2.group(2)), m2.group(3) or ""
        head = "middle_block." + ("1" if kind == "attentions" else str(2 * idx))
        inner = _sub(rest, {v: k for k, v in _SGM_RESNET.items()}) if kind == "resnets" else rest
        return ".".join(x for x in (head, inner) if x)
    where, blk, kind, idx, rest = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5) or ""
    if kind in ("downsamplers", "upsamplers"):
        if where == "down_blocks":
            return f"input_blocks.{blk * _PER_DOWN + 3}.0.op" + rest.removeprefix("conv")
        slot = 2 if (n_down - 1 - blk) in att else 1
        return f"output_blocks.{blk * _PER_UP + 2}.{slot}.conv" + rest.removeprefix("conv")
    sub = 0 if kind == "resnets" else 1
    block = blk * _PER_DOWN + idx + 1 if where == "down_blocks" else blk * _PER_UP + idx
    head = f"{'input_blocks' if where == 'down_blocks' else 'output_blocks'}.{block}.{sub}"
    inner = _sub(rest, {v: k for k, v in _SGM_RESNET.items()}) if sub == 0 else rest
    return ".".join(x for x in (head, inner) if x)


# ------------------------------------------------------------------------------------------------------ block maps
#: Canonical configs of the families a block map exists for; models are built on the meta device (no memory).
FAMILIES = ("sd15-unet", "sdxl-unet", "clip-l", "clip-g", "bert", "gpt2", "llama")


@lru_cache(maxsize=None)
def family_paths(family: str) -> tuple[str, ...]:
    """Every LoRA-capable module path of a model family, from its module tree built on the meta device.

    Families: ``sd15-unet`` / ``sdxl-unet`` (diffusers ``UNet2DConditionModel``), ``clip-l`` (SD1.x text encoder,
    ``CLIPTextModel``), ``clip-g`` (SDXL's second encoder, ``CLIPTextModelWithProjection``), ``bert``
    (``BertModel``, 12 layers), ``gpt2`` (``GPT2LMHeadModel``, 12 layers), ``llama`` (``LlamaForCausalLM``, 32
    layers).
    """
    import torch

    if family not in FAMILIES:
        raise LorakitError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)})")
    with torch.device("meta"):
        model = _build(family)
    return tuple(model_paths(model))


def _build(family: str):
    if family in ("sd15-unet", "sdxl-unet"):
        from diffusers import UNet2DConditionModel

        if family == "sd15-unet":
            return UNet2DConditionModel(cross_attention_dim=768)
        return UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    import transformers as tf

    if family == "clip-l":
        return tf.CLIPTextModel(tf.CLIPTextConfig())
    if family == "clip-g":
        return tf.CLIPTextModelWithProjection(tf.CLIPTextConfig(hidden_size=1280, intermediate_size=5120,
                                                                num_hidden_layers=32, num_attention_heads=20,
                                                                projection_dim=1280))
    if family == "bert":
        return tf.BertModel(tf.BertConfig())
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config())
    return tf.LlamaForCausalLM(tf.LlamaConfig(num_hidden_layers=32))
