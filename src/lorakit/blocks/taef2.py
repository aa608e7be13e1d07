"""Blocks of the TAEF2 tiny autoencoder (:mod:`lorakit.models.taef2`): one block per resolution level.

Both halves are flat ``nn.Sequential`` stacks, so a module path is ``encoder.<i>…`` or ``decoder.<i>…`` (with or
without a prefix such as ``vae.``). The levels are cut where the resolution changes, so a strength per block is a
strength per scale of detail:

==========  ====================================  =================================================
block       decoder indices (resolution)          what it shapes
==========  ====================================  =================================================
``DEC0``    ``1``–``5`` (latent, 1/8)              global colour and tone of large regions
``DEC1``    ``6``–``10`` (1/4)                     shapes and mid-scale contrast
``DEC2``    ``11``–``15`` (1/2)                    texture
``DEC3``    ``16``–``19`` (full)                   edges, fine texture and the final colour mapping
``ENC0``    encoder ``0``–``1`` (full)
``ENC1``    encoder ``2``–``5`` (1/2)
``ENC2``    encoder ``6``–``9`` (1/4)
``ENC3``    encoder ``10``–``14`` (1/8, to latent)
==========  ====================================  =================================================

Each upsampling (decoder) or strided convolution (encoder) starts the level it produces.
"""

from __future__ import annotations

import re

#: Block names in order: decoder from the latent outwards, then encoder from the image inwards.
TAEF2_BLOCKS = ("DEC0", "DEC1", "DEC2", "DEC3", "ENC0", "ENC1", "ENC2", "ENC3")
#: First ``nn.Sequential`` index of each level, per half (levels are contiguous index ranges).
_DECODER_STARTS = (0, 6, 11, 16)
_ENCODER_STARTS = (0, 2, 6, 10)
_HALF = re.compile(r"(^|\.)(encoder|decoder)\.(\d+)(\.|$)")


def taef2_block(path: str) -> str | None:
    """The block of a TAEF2 module path, e.g. ``"decoder.8.conv.2"`` → ``"DEC1"``; ``None`` outside both halves."""
    m = _HALF.search(path)
    if m is None:
        return None
    half, index = m.group(2), int(m.group(3))
    starts = _DECODER_STARTS if half == "decoder" else _ENCODER_STARTS
    level = sum(index >= s for s in starts) - 1
    return f"{'DEC' if half == 'decoder' else 'ENC'}{level}"


def is_taef2(paths: list[str]) -> bool:
    """Whether every path lies in a numbered ``encoder``/``decoder`` stack (how :func:`detect_family` tells)."""
    return bool(paths) and all(_HALF.search(p) for p in paths)
