"""Block maps: which named block of its architecture a module path belongs to.

Families and their block names:

========  =========================================================  ========================================
family    blocks                                                      source
========  =========================================================  ========================================
``sd15``  ``BASE`` (text encoder), ``IN00…IN11``, ``M00``,           LoRA Block Weight, 26 (or 17) blocks
          ``OUT00…OUT11``, ``TIME``
``sdxl``  ``BASE``, ``IN00…IN08``, ``M00``, ``OUT00…OUT08``, ``TIME``  LoRA Block Weight, 20 (or 12) blocks
``blora`` ``content``, ``style`` (SDXL)                               B-LoRA (Frenkel et al. 2024)
``bert``  ``EMB``, ``L00…``, ``HEAD``                                  ``encoder.layer.N``
``gpt2``  ``EMB``, ``L00…``, ``HEAD``                                  ``h.N``
``llama`` ``EMB``, ``L00…``, ``HEAD``                                  ``layers.N``
``taef2`` ``DEC0…DEC3``, ``ENC0…ENC3``                                resolution levels of TAEF2
========  =========================================================  ========================================

A path that belongs to no block of the family maps to :data:`OTHER`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from lorakit.blocks.lbw import PRESETS_17, VOCABULARIES, format_lbw, parse_lbw, vocabulary
from lorakit.blocks.select import Selector
from lorakit.blocks.taef2 import TAEF2_BLOCKS, is_taef2, taef2_block
from lorakit.blocks.text import num_layers, text_block, text_vocabulary
from lorakit.blocks.unet import BLORA_CONTENT, BLORA_STYLE, blora_block, sd15_block, sdxl_block
from lorakit.errors import LorakitError

FAMILIES = ("sd15", "sdxl", "blora", "bert", "gpt2", "llama", "taef2")
#: Block name of paths outside every block of a family.
OTHER = "OTHER"


def block_of(path: str, family: str) -> str:
    """The block name of module ``path`` in ``family`` (see the table above), or :data:`OTHER`."""
    if family == "sd15":
        found = sd15_block(path)
    elif family == "sdxl":
        found = sdxl_block(path)
    elif family == "blora":
        found = blora_block(path)
    elif family in ("bert", "gpt2", "llama"):
        found = text_block(path, family)
    elif family == "taef2":
        found = taef2_block(path)
    else:
        raise LorakitError(f"unknown block family {family!r} (known: {', '.join(FAMILIES)})")
    return found or OTHER


def block_vocabulary(family: str, paths: Iterable[str] = ()) -> tuple[str, ...]:
    """Every block name of ``family`` in order (for text families, as many layers as ``paths`` reach)."""
    if family == "sd15":
        return (*VOCABULARIES["sd15"][26], "TIME", OTHER)
    if family == "sdxl":
        return (*VOCABULARIES["sdxl"][20], "TIME", OTHER)
    if family == "blora":
        return ("content", "style", OTHER)
    if family in ("bert", "gpt2", "llama"):
        return (*text_vocabulary(num_layers(list(paths), family)), OTHER)
    if family == "taef2":
        return (*TAEF2_BLOCKS, OTHER)
    raise LorakitError(f"unknown block family {family!r} (known: {', '.join(FAMILIES)})")


def group_by_block(paths: Iterable[str], family: str) -> dict[str, list[str]]:
    """Block name → the paths in it, blocks in vocabulary order, empty blocks left out."""
    paths = list(paths)
    groups: dict[str, list[str]] = {b: [] for b in block_vocabulary(family, paths)}
    for p in paths:
        groups.setdefault(block_of(p, family), []).append(p)
    return {b: ps for b, ps in groups.items() if ps}


def detect_family(paths: Iterable[str]) -> str:
    """Guess the family from module paths: SD UNet trees first, then BERT, GPT-2, Llama-style layer lists, TAEF2.

    Raises:
        LorakitError: no family fits.
    """
    paths = list(paths)
    joined = "\n".join(paths)
    if re.search(r"(^|\.)(down_blocks|up_blocks|mid_block)\.", joined, re.MULTILINE):
        if re.search(r"(^|\.)(down_blocks|up_blocks)\.3\.", joined, re.MULTILINE):
            return "sd15"
        return "sdxl"
    for fam in ("bert", "gpt2", "llama"):
        if num_layers(paths, fam):
            return fam
    if is_taef2(paths):
        return "taef2"
    raise LorakitError("cannot tell the block family of this adapter; pass one of " + ", ".join(FAMILIES))


__all__ = [
    "BLORA_CONTENT",
    "BLORA_STYLE",
    "FAMILIES",
    "OTHER",
    "PRESETS_17",
    "VOCABULARIES",
    "Selector",
    "block_of",
    "block_vocabulary",
    "detect_family",
    "format_lbw",
    "group_by_block",
    "parse_lbw",
    "vocabulary",
]
