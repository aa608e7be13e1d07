"""LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` (LoCon): A is a conv with the base kernel, stride and padding; B is 1×1."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.layers.base import LoraFactors, LoraLayer
from lorakit.layers.fast import LoraConvFn


class LoraConv(LoraLayer):
    """``h = conv(x; W) + b + s · conv₁ₓ₁(conv(x; A); B)``.

    A: (r, in, *kernel) convolves like the base layer (same stride, padding, dilation, padding mode), so the
    low-rank path has the base output's spatial shape; B: (out, r) mixes channels.

    Args:
        base: an ``nn.Conv1d`` or ``nn.Conv2d`` with ``groups == 1``.
    """

    has_fast_path = True

    def __init__(self, base: nn.Conv1d | nn.Conv2d):
        super().__init__(base)
        self.kind = "conv2d" if isinstance(base, nn.Conv2d) else "conv1d"
        self.output_channel_dim = 1
        self._conv = F.conv2d if self.kind == "conv2d" else F.conv1d
        self.stride, self.padding, self.dilation = base.stride, base.padding, base.dilation
        self.padding_mode = base.padding_mode
        self._pad = base._reversed_padding_repeated_twice
        self._in, self._out, self._kernel = base.in_channels, base.out_channels, tuple(base.kernel_size)

    @classmethod
    def wrap_problem(cls, base: nn.Module) -> str | None:
        if getattr(base, "groups", 1) != 1:
            return f"LoRA on grouped convolutions is not supported (groups={base.groups})"
        return super().wrap_problem(base)

    @property
    def in_features(self) -> int:
        return self._in

    @property
    def out_features(self) -> int:
        return self._out

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return self._kernel

    def fast_forward(self, x: Tensor, f: LoraFactors) -> Tensor:
        return LoraConvFn.apply(x, self.weight, self.bias, f.A, f.B, f.scale, f.dropout_p, self.stride, self.padding,
                                self.dilation)

    def _fast_path_factors(self, x: Tensor) -> LoraFactors | None:
        # The fused function handles explicit zero padding only; padding modes and "same"/"valid" take the plain path.
        explicit = self.padding_mode == "zeros" and not isinstance(self.padding, str)
        return super()._fast_path_factors(x) if explicit else None

    def _conv_like_base(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        # The same steps as nn.ConvNd._conv_forward, so a path computed with it matches the unwrapped layer's.
        if self.padding_mode != "zeros":
            x = F.pad(x, self._pad, mode=self.padding_mode)
            return self._conv(x, weight, bias, self.stride, 0, self.dilation)
        return self._conv(x, weight, bias, self.stride, self.padding, self.dilation)

    def weight_forward(self, x: Tensor, weight: Tensor) -> Tensor:
        return self._conv_like_base(x, weight, None)

    def lora_forward(self, f: LoraFactors, x: Tensor) -> Tensor:
        pointwise = f.B.view(*f.B.shape, *([1] * len(self._kernel)))  # (out, r, 1[, 1])
        return self._conv(self._conv_like_base(x, f.A, None), pointwise)
