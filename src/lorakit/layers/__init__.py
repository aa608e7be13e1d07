"""Runtime LoRA layers, one per base layer kind, and the registry that picks one for a base module.

The registry is keyed by exact type. A subclass of a registered type (a quantized or custom linear with its own
``forward``) resolves to the nearest registered ancestor's layer through its MRO, and that layer then *delegates*:
it calls the base module itself (``base(x)``) rather than the functional op on its weight, so the subclass's own
forward and its hooks keep running (see :attr:`LoraLayer.delegates`).
"""

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

#: Exact base module type → (adapter kind, LoRA layer class).
LAYER_TYPES: dict[type, tuple[str, type[LoraLayer]]] = {
    nn.Linear: ("linear", LoraLinear),
    nn.Conv1d: ("conv1d", LoraConv),
    nn.Conv2d: ("conv2d", LoraConv),
    nn.Embedding: ("embedding", LoraEmbedding),
}
if _HFConv1D is not None:
    LAYER_TYPES[_HFConv1D] = ("linear_t", LoraLinear)


def registered_type(module: nn.Module) -> type | None:
    """The registered base type ``module`` is (exactly, or through its MRO), or ``None``."""
    for cls in type(module).__mro__:
        if cls in LAYER_TYPES:
            return cls
    return None


def lora_layer_type(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA layer class that can wrap ``module``, or ``None`` if its kind is not supported."""
    if isinstance(module, LoraLayer):
        return None
    cls = registered_type(module)
    return None if cls is None else LAYER_TYPES[cls][1]


def base_kind(module: nn.Module) -> str | None:
    """The adapter kind (see :data:`lorakit.adapter.KINDS`) of a base module or LoRA layer, or ``None``."""
    if isinstance(module, LoraLayer):
        return module.kind
    cls = registered_type(module)
    return None if cls is None else LAYER_TYPES[cls][0]


def wrap_problem(module: nn.Module) -> str | None:
    """Why ``module`` cannot be wrapped (one line), or ``None`` when it can; checks before anything changes."""
    if isinstance(module, LoraLayer):
        return None
    layer_type = lora_layer_type(module)
    if layer_type is None:
        return f"{type(module).__name__} cannot carry a LoRA adapter"
    return layer_type.wrap_problem(module)


def supports(module: nn.Module) -> bool:
    return lora_layer_type(module) is not None and wrap_problem(module) is None


__all__ = ["INITS", "LAYER_TYPES", "LoraConv", "LoraEmbedding", "LoraFactors", "LoraLayer", "LoraLinear",
           "base_kind", "lora_layer_type", "registered_type", "supports", "wrap_problem"]
