"""LoRA on ``nn.Linear`` and on transformers' ``Conv1D`` (GPT-2's linear layer with a transposed weight)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.layers.base import LoraFactors, LoraLayer, linear_lora
from lorakit.layers.fast import LoraLinearFn, linear_forward


class LoraLinear(LoraLayer):
    """``h = W x + b + s · B A x`` on a linear layer.

    Args:
        base: an ``nn.Linear`` (weight (out, in)) or a transformers ``Conv1D`` (weight (in, out), computed as
            ``x·W + b``); the latter is the ``linear_t`` kind.
    """

    has_fast_path = True

    def __init__(self, base: nn.Module):
        super().__init__(base)
        self.transposed = not isinstance(base, nn.Linear)  # the registry only hands Linear or Conv1D here
        self.kind = "linear_t" if self.transposed else "linear"
        self.weight_out_dim = 1 if self.transposed else 0

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[self.weight_out_dim ^ 1])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[self.weight_out_dim])

    def fast_forward(self, x: Tensor, f: LoraFactors) -> Tensor:
        if not torch.is_grad_enabled():  # inference: the same computation without the autograd.Function's overhead
            out, _, _ = linear_forward(x.reshape(-1, x.shape[-1]), self.weight, self.bias, f.A, f.B, f.scale,
                                       f.dropout_p, self.transposed)
            return out.view(*x.shape[:-1], out.shape[-1])
        return LoraLinearFn.apply(x, self.weight, self.bias, f.A, f.B, f.scale, f.dropout_p, self.transposed)

    def weight_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return x @ weight if self.transposed else F.linear(x, weight)

    def lora_forward(self, f: LoraFactors, x: Tensor) -> Tensor:
        return linear_lora(x, f.A, f.B)
