"""Blocks of transformer language models: one block per repeated layer, plus embeddings and the head.

Block names are ``EMB`` (token/position embeddings), ``L00``, ``L01``… (the repeated layers, in order) and ``HEAD``
(pooler, classifier, LM head). The repeated layer is found by the family's container name:

    bert   (BERT, MiniLM, RoBERTa):  ...encoder.layer.N...
    gpt2   (GPT-2):                  ...h.N...
    llama  (Llama, Mistral, Qwen, CLIP text encoders):  ...layers.N...
"""

from __future__ import annotations

import re

_LAYER = {
    "bert": re.compile(r"(^|\.)encoder\.layer\.(\d+)(\.|$)"),
    "gpt2": re.compile(r"(^|\.)h\.(\d+)(\.|$)"),
    "llama": re.compile(r"(^|\.)layers\.(\d+)(\.|$)"),
}
_EMBEDDING_SEGMENTS = {"embeddings", "embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings",
                       "token_type_embeddings", "embed_positions"}


def layer_block_name(index: int) -> str:
    """``3`` → ``"L03"``."""
    return f"L{index:02d}"


def text_block(path: str, family: str) -> str:
    """The block of a module path in a ``bert``, ``gpt2`` or ``llama`` model: ``EMB``, ``Lnn`` or ``HEAD``."""
    if m := _LAYER[family].search(path):
        return layer_block_name(int(m.group(2)))
    if _EMBEDDING_SEGMENTS & set(path.split(".")):
        return "EMB"
    return "HEAD"


def text_vocabulary(num_layers: int) -> tuple[str, ...]:
    """Block names of a model with ``num_layers`` repeated layers, in order."""
    return ("EMB", *(layer_block_name(i) for i in range(num_layers)), "HEAD")


def num_layers(paths: list[str], family: str) -> int:
    """One more than the largest layer index among ``paths`` (0 if none is inside a layer)."""
    found = [int(m.group(2)) for p in paths if (m := _LAYER[family].search(p))]
    return max(found) + 1 if found else 0
