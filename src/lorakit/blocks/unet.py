"""Stable Diffusion UNet blocks in the diffusers module tree, named as the LoRA Block Weight (LBW) tool names them.

LBW (hako-mikan's sd-webui-lora-block-weight) numbers the UNet in the original (ldm) layout: ``IN00…IN11`` are the
``input_blocks``, ``M00`` the middle block, ``OUT00…OUT11`` the ``output_blocks``, and ``BASE`` is the text
encoder. In diffusers' tree the same places are

    conv_in                                     → IN00
    down_blocks.i.{resnets,attentions}.j        → IN(3i + j + 1)
    down_blocks.i.downsamplers.0                → IN(3i + 3)
    mid_block                                   → M00
    up_blocks.i.{resnets,attentions}.j          → OUT(3i + j)
    up_blocks.i.upsamplers.0                    → OUT(3i + 2)
    conv_norm_out / conv_out                    → OUT11 (SD1.5) / OUT08 (SDXL), the last output block
    time_embedding, add_embedding               → BASE is wrong for them; they get their own block ``TIME``
    text_encoder*, te*                          → BASE

SD1.5 has four resolution levels (IN00…IN11, OUT00…OUT11); SDXL has three (IN00…IN08, OUT00…OUT08).
"""

from __future__ import annotations

import re

#: LBW vocabularies (the order of the numbers in an LBW string).
SD15_26 = ("BASE", *(f"IN{i:02d}" for i in range(12)), "M00", *(f"OUT{i:02d}" for i in range(12)))
SD15_17 = ("BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(3, 12)))
SDXL_20 = ("BASE", *(f"IN{i:02d}" for i in range(9)), "M00", *(f"OUT{i:02d}" for i in range(9)))
SDXL_12 = ("BASE", "IN04", "IN05", "IN07", "IN08", "M00", *(f"OUT{i:02d}" for i in range(6)))

#: B-LoRA (Frenkel et al. 2024, §4): in SDXL the second up-block's first attention carries content, its second
#: attention carries style.
BLORA_CONTENT = "up_blocks.0.attentions.0"
BLORA_STYLE = "up_blocks.0.attentions.1"

_TEXT_ENCODER = re.compile(r"^(text_encoder(_\d+)?|te\d?|text_model|clip_\w+)(\.|$)")
_DOWN = re.compile(r"(^|\.)down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)(\.|$)")
_UP = re.compile(r"(^|\.)up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)(\.|$)")
_UNET_PREFIX = re.compile(r"^(unet|model\.diffusion_model)\.")


def unet_block(path: str, levels: int) -> str | None:
    """The LBW block of a module path of a diffusers SD pipeline (UNet paths with or without ``unet.``).

    Args:
        path: module path, e.g. ``"unet.up_blocks.1.attentions.2.transformer_blocks.0.attn2.to_k"``.
        levels: resolution levels of the UNet: 4 for SD1.5, 3 for SDXL.

    Returns:
        ``"BASE"``, ``"IN07"``, ``"M00"``, ``"OUT05"``, ``"TIME"``, or ``None`` when the path is none of these.
    """
    if _TEXT_ENCODER.match(path):
        return "BASE"
    p = _UNET_PREFIX.sub("", path)
    head = p.split(".")[0]
    if head == "conv_in":
        return "IN00"
    if head == "mid_block":
        return "M00"
    if head in ("conv_out", "conv_norm_out"):
        return f"OUT{3 * levels - 1:02d}"
    if head in ("time_embedding", "add_embedding", "time_proj", "add_time_proj"):
        return "TIME"
    if m := _DOWN.search(p):
        i, part, j = int(m.group(2)), m.group(3), int(m.group(4))
        return f"IN{3 * i + 3:02d}" if part == "downsamplers" else f"IN{3 * i + j + 1:02d}"
    if m := _UP.search(p):
        i, part, j = int(m.group(2)), m.group(3), int(m.group(4))
        return f"OUT{3 * i + 2:02d}" if part == "upsamplers" else f"OUT{3 * i + j:02d}"
    return None


def sd15_block(path: str) -> str | None:
    """LBW block of an SD1.5 module path (four UNet levels); see :func:`unet_block`."""
    return unet_block(path, 4)


def sdxl_block(path: str) -> str | None:
    """LBW block of an SDXL module path (three UNet levels); see :func:`unet_block`."""
    return unet_block(path, 3)


def blora_block(path: str) -> str | None:
    """``"content"``, ``"style"`` or ``None`` for an SDXL module path (B-LoRA's two blocks)."""
    p = _UNET_PREFIX.sub("", path)
    for name, prefix in (("content", BLORA_CONTENT), ("style", BLORA_STYLE)):
        if p == prefix or p.startswith(prefix + "."):
            return name
    return None
