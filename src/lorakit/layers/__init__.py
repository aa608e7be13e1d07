"""Runtime LoRA layers, one per base layer kind, and the registry that picks one for a base module."""

from __future__ import annotations

from torch import nn

from lorakit.layers.base import INITS, LoraFactors, LoraLayer
from lorakit.layers.conv import LoraConv
from lorakit.layers.embedding import LoraEmbedding
from lorakit.layers.linear import LoraLinear

try:  # transformers' GPT-2 style Conv1D: a linear layer with a transposed weight
    from transformers.pytorch_utils import Conv1D as _HFConv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but the layers do not need it
    _HFConv1D = None

#: Base module type → LoRA layer class. Exact types first; subclasses resolve through ``isinstance``.
LAYER_TYPES: dict[type, type[LoraLayer]] = {
    nn.Linear: LoraLinear,
    nn.Conv1d: LoraConv,
    nn.Conv2d: LoraConv,
    nn.Embedding: LoraEmbedding,
}
if _HFConv1D is not None:
    LAYER_TYPES[_HFConv1D] = LoraLinear


def lora_layer_type(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class that can wrap ``module``, or ``None`` if its kind is not supported."""
    for base_type, layer_type in LAYER_TYPES.items():
        if isinstance(module, base_type):
            return layer_type
    return None


def base_kind(module: nn.Module) -> str | None:
    """The adapter kind (see :data:`lorakit.adapter.KINDS`) of a base module or LoRA layer, or ``None``."""
    if isinstance(module, LoraLayer):
        return module.kind
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    if _HFConv1D is not None and isinstance(module, _HFConv1D):
        return "linear_t"
    return None


def supports(module: nn.Module) -> bool:
    return lora_layer_type(module) is not None and not isinstance(module, LoraLayer)


__all__ = ["INITS", "LAYER_TYPES", "LoraConv", "LoraEmbedding", "LoraFactors", "LoraLayer", "LoraLinear",
           "base_kind", "lora_layer_type", "supports"]
