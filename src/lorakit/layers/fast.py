"""The fast path: one hand-written autograd function for a frozen linear (or conv) layer with one LoRA adapter.

Forward, for x: (N, in) (leading dims flattened), W frozen::

    out = x·Wᵀ + b                      one GEMM, the base cost
    h   = dropout(x)·Aᵀ                 (N, r)
    out += s · h·Bᵀ                     in place (addmm_), no (N, out) temporaries

Backward, with g = ∂L/∂out: (N, out)::

    gh = s · g·B                        (N, r)
    ∂B = s · (hᵀ·g)ᵀ                    (out, r)
    ∂A = ghᵀ·dropout(x)                 (r, in)
    ∂x = g·W + dropout'(gh·A)           one GEMM plus a rank-r update, accumulated in place

Only x (which the previous layer keeps alive anyway), h (N×r) and, with dropout, the boolean keep-mask (one byte
per input element, a quarter of the dropped float copy that the plain path keeps) are saved.

The skinny products are laid out so that the long (N) axis is the contiguous one of both operands: on CPU,
``g·B`` with B (out, r) row-major and ``gᵀ·h`` run 2-6× slower than ``g·(Bᵀ)ᵀ`` with a contiguous (r, out) copy
and ``(hᵀ·g)ᵀ`` (measured with MKL/oneDNN on 2 threads), and these products are most of LoRA's extra cost.

Dropout draws its mask with ``torch.native_dropout``, which is what ``F.dropout`` runs in training (on CPU and
CUDA alike): for the same RNG state the fast path drops the same elements as the plain path, so the results are
the same up to float rounding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _dropout(x: Tensor, p: float) -> tuple[Tensor, Tensor | None]:
    """``(dropout(x), keep-mask)`` with the plain path's mask; ``(x, None)`` when p is 0."""
    if p <= 0:
        return x, None
    return torch.native_dropout(x, p, True)


def _keep_scale(p: float) -> float:
    """The factor kept elements are multiplied by, ``1/(1−p)`` (0 when everything is dropped)."""
    return 0.0 if p >= 1 else 1.0 / (1.0 - p)


def _mask_float(mask: Tensor, dtype: torch.dtype) -> Tensor:
    # bool → float through uint8 is a vectorised cast; a direct bool → float promotion is ~6× slower on CPU.
    return mask.view(torch.uint8).to(dtype)


def linear_forward(x2: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float, p: float,
                   transposed: bool) -> tuple[Tensor, Tensor, Tensor | None]:
    """The fused forward without autograd: ``(out, h, keep-mask)`` for x2: (N, in).

    (Computing h inside the base GEMM, on W with A's rows appended, measured no faster on CPU: copying W into the
    stacked weight and the odd output width cost what the separate skinny product saves.)
    """
    if transposed:
        out = torch.addmm(bias, x2, weight) if bias is not None else x2 @ weight
    else:
        out = F.linear(x2, weight, bias)
    xd, mask = _dropout(x2, p)
    h = F.linear(xd, A)  # (N, r)
    return out.addmm_(h, B.T, alpha=scale), h, mask


class LoraLinearFn(torch.autograd.Function):
    """``out = x·Wᵀ + b + s·dropout(x)·Aᵀ·Bᵀ`` for a frozen W (``transposed``: W is (in, out), GPT-2 Conv1D)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float, p: float,
                transposed: bool) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        out, h, mask = linear_forward(x2, weight, bias, A, B, scale, p, transposed)
        ctx.save_for_backward(x2, weight, A, B, h, mask)
        ctx.scale, ctx.p, ctx.transposed = scale, p, transposed
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, weight, A, B, h, mask = ctx.saved_tensors
        s = ctx.scale
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        dA = dB = dx = None
        if ctx.needs_input_grad[4]:
            dB = (h.T @ g).mul_(s).T  # (out, r)
        if not (ctx.needs_input_grad[3] or ctx.needs_input_grad[0]):
            return None, None, None, None, dB, None, None, None
        # The dropout's 1/(1−p) is folded into the (N, r) gradient rather than into an (N, in) tensor.
        s_in = s * _keep_scale(ctx.p) if mask is not None else s
        gh = F.linear(g, (B.T * s_in).contiguous())  # (N, r)
        keep = _mask_float(mask, x2.dtype) if mask is not None else None
        if ctx.needs_input_grad[3]:
            dA = gh.T @ (x2 if keep is None else x2 * keep)  # (r, in)
        if ctx.needs_input_grad[0]:
            dx = g @ weight.T if ctx.transposed else g @ weight  # (N, in)
            if keep is None:
                dx.addmm_(gh, A)
            else:
                dx.addcmul_(gh @ A, keep)
            dx = dx.view(*grad.shape[:-1], dx.shape[-1])
        return dx, None, None, dA, dB, None, None, None


_CONV = {1: (F.conv1d, torch.nn.grad.conv1d_input, torch.nn.grad.conv1d_weight),
         2: (F.conv2d, torch.nn.grad.conv2d_input, torch.nn.grad.conv2d_weight)}


class LoraConvFn(torch.autograd.Function):
    """``out = conv(x; W) + b + s·conv₁ₓ₁(conv(dropout(x); A); B)`` for a frozen W, zero padding, groups 1.

    x: (N, in, *spatial); A: (r, in, *kernel); B: (out, r). The 1×1 conv is a batched matmul over the flattened
    spatial positions, added into the base output in place. Saves x, h = conv(dropout(x); A) and the dropout's
    boolean keep-mask only.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float, p: float,
                stride: tuple, padding: tuple | str, dilation: tuple) -> Tensor:
        conv, _, _ = _CONV[x.ndim - 2]
        out = conv(x, weight, bias, stride, padding, dilation)
        xd, mask = _dropout(x, p)
        h = conv(xd, A, None, stride, padding, dilation)  # (N, r, *spatial')
        n = out.shape[0]
        out.view(n, out.shape[1], -1).add_(torch.matmul(B, h.view(n, h.shape[1], -1)), alpha=scale)
        ctx.save_for_backward(x, weight, A, B, h, mask)
        ctx.scale, ctx.p, ctx.conv_args = scale, p, (stride, padding, dilation)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, A, B, h, mask = ctx.saved_tensors
        s = ctx.scale
        _, conv_input, conv_weight = _CONV[x.ndim - 2]
        n = grad.shape[0]
        g3 = grad.reshape(n, grad.shape[1], -1)  # (N, out, S)
        dA = dB = dx = None
        if ctx.needs_input_grad[4]:
            dB = (g3 @ h.view(n, h.shape[1], -1).transpose(1, 2)).sum(0).mul_(s)  # (out, r)
        s_in = s * _keep_scale(ctx.p) if mask is not None else s
        gh = torch.matmul(B.T, g3).mul_(s_in).view_as(h)  # (N, r, *spatial')
        keep = _mask_float(mask, x.dtype) if mask is not None else None
        if ctx.needs_input_grad[3]:
            dA = conv_weight(x if keep is None else x * keep, A.shape, gh, *ctx.conv_args)
        if ctx.needs_input_grad[0]:
            dx = conv_input(x.shape, weight, grad, *ctx.conv_args)
            low = conv_input(x.shape, A, gh, *ctx.conv_args)
            if keep is None:
                dx.add_(low)
            else:
                dx.addcmul_(low, keep)
        return dx, None, None, dA, dB, None, None, None, None, None
