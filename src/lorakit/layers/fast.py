"""The fast path: one hand-written autograd function for a frozen linear layer with one LoRA adapter.

Forward, for x: (N, in) (leading dims flattened), W frozen::

    out = x·Wᵀ + b                      one GEMM, the base cost
    h   = dropout(x)·Aᵀ                 (N, r)
    out += s · h·Bᵀ                     in place (addmm_), no (N, out) temporaries

Backward, with g = ∂L/∂out: (N, out)::

    gh = s · g·B                        (N, r)
    ∂B = s · gᵀ·h                       (out, r)
    ∂A = ghᵀ·dropout(x)                 (r, in)
    ∂x = g·W + dropout'(gh·A)           one GEMM plus a rank-r update, accumulated in place

Only x (which the previous layer keeps alive anyway) and h (N×r) are saved. With dropout, neither the mask nor
the dropped input is saved: the RNG state before the forward's dropout is kept and the same mask is drawn again in
backward (as activation checkpointing does). The masks are those the plain path draws for the same seed, so the
results are the same; the price is drawing the mask twice in backward instead of holding an (N, in) copy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _rng_state(device: torch.device) -> Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _redraw_dropout(x: Tensor, p: float, state: Tensor) -> Tensor:
    """``F.dropout(x, p)`` with the mask the forward drew, leaving the global RNG stream untouched."""
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=x.device.type):
        if x.device.type == "cuda":
            torch.cuda.set_rng_state(state, x.device)
        else:
            torch.set_rng_state(state)
        return F.dropout(x, p, training=True)


class LoraLinearFn(torch.autograd.Function):
    """``out = x·Wᵀ + b + s·dropout(x)·Aᵀ·Bᵀ`` for a frozen W (``transposed``: W is (in, out), GPT-2 Conv1D)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float, p: float,
                transposed: bool) -> Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        if transposed:
            out = torch.addmm(bias, x2, weight) if bias is not None else x2 @ weight
        else:
            out = F.linear(x2, weight, bias)
        state = None
        if p > 0:
            state = _rng_state(x.device)
            xd = F.dropout(x2, p, training=True)
        else:
            xd = x2
        h = xd @ A.T  # (N, r)
        out.addmm_(h, B.T, alpha=scale)
        ctx.save_for_backward(x2, weight, A, B, h)
        ctx.scale, ctx.p, ctx.transposed, ctx.state = scale, p, transposed, state
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad: Tensor):
        x2, weight, A, B, h = ctx.saved_tensors
        s, p = ctx.scale, ctx.p
        g = grad.reshape(-1, grad.shape[-1])  # (N, out)
        gh = (g @ B).mul_(s)  # (N, r)
        dA = dB = dx = None
        if ctx.needs_input_grad[4]:
            dB = (g.T @ h).mul_(s)  # (out, r)
        if ctx.needs_input_grad[3]:
            xd = _redraw_dropout(x2, p, ctx.state) if p > 0 else x2
            dA = gh.T @ xd  # (r, in)
        if ctx.needs_input_grad[0]:
            dx = g @ weight.T if ctx.transposed else g @ weight  # (N, in)
            if p > 0:
                dx.add_(_redraw_dropout(gh @ A, p, ctx.state))
            else:
                dx.addmm_(gh, A)
            dx = dx.view(*grad.shape[:-1], dx.shape[-1])
        return dx, None, None, dA, dB, None, None, None


_CONV = {1: (F.conv1d, torch.nn.grad.conv1d_input, torch.nn.grad.conv1d_weight),
         2: (F.conv2d, torch.nn.grad.conv2d_input, torch.nn.grad.conv2d_weight)}


class LoraConvFn(torch.autograd.Function):
    """``out = conv(x; W) + b + s·conv₁ₓ₁(conv(dropout(x); A); B)`` for a frozen W, zero padding, groups 1.

    x: (N, in, *spatial); A: (r, in, *kernel); B: (out, r). The 1×1 conv is a batched matmul over the flattened
    spatial positions, added into the base output in place. Saves x and h = conv(x; A) only.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None, A: Tensor, B: Tensor, scale: float, p: float,
                stride: tuple, padding: tuple | str, dilation: tuple) -> Tensor:
        conv, _, _ = _CONV[x.ndim - 2]
        out = conv(x, weight, bias, stride, padding, dilation)
        state = None
        if p > 0:
            state = _rng_state(x.device)
            xd = F.dropout(x, p, training=True)
        else:
            xd = x
        h = conv(xd, A, None, stride, padding, dilation)  # (N, r, *spatial')
        n = out.shape[0]
        out.view(n, out.shape[1], -1).add_(torch.matmul(B, h.view(n, h.shape[1], -1)), alpha=scale)
        ctx.save_for_backward(x, weight, A, B, h)
        ctx.scale, ctx.p, ctx.state, ctx.conv_args = scale, p, state, (stride, padding, dilation)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, A, B, h = ctx.saved_tensors
        s, p = ctx.scale, ctx.p
        _, conv_input, conv_weight = _CONV[x.ndim - 2]
        n = grad.shape[0]
        g3 = grad.reshape(n, grad.shape[1], -1)  # (N, out, S)
        gh = torch.matmul(B.T, g3).mul_(s).view_as(h)  # (N, r, *spatial')
        dA = dB = dx = None
        if ctx.needs_input_grad[4]:
            dB = (g3 @ h.view(n, h.shape[1], -1).transpose(1, 2)).sum(0).mul_(s)  # (out, r)
        if ctx.needs_input_grad[3]:
            xd = _redraw_dropout(x, p, ctx.state) if p > 0 else x
            dA = conv_weight(xd, A.shape, gh, *ctx.conv_args)
        if ctx.needs_input_grad[0]:
            dx = conv_input(x.shape, weight, grad, *ctx.conv_args)
            low = conv_input(x.shape, A, gh, *ctx.conv_args)
            dx.add_(_redraw_dropout(low, p, ctx.state) if p > 0 else low)
        return dx, None, None, dA, dB, None, None, None, None, None
