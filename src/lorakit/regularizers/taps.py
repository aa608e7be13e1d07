"""Latent taps: capture a named submodule's output during a forward pass, with the graph kept.

A tap is a forward hook that lives only inside a ``with`` block, so a model that is not being tapped carries no hook
and pays nothing::

    with tap(model, "encoder.14") as feats:
        logits = model(x)
    z = feats[-1]            # (N, 32, h, w), differentiable
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import Tensor, nn

from lorakit.regularizers.errors import RegularizerError


def _module_at(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in model.named_modules() if n]
        parent = path.rpartition(".")[0]
        near = [n for n in names if n.rpartition(".")[0] == parent][:8] or names[:8]
        raise RegularizerError(f"tap: no module at path {path!r} in {type(model).__name__}; modules there "
                               f"include: {', '.join(near)}") from None


@contextmanager
def tap(model: nn.Module, path: str, *, detach: bool = False) -> Iterator[list[Tensor]]:
    """Record the output of ``model``'s submodule at ``path`` on every forward call inside the block.

    Args:
        model: any ``nn.Module``; LoRA-wrapped submodules keep their paths, so the base model's paths work.
        path: dotted module path (``""`` taps the model's own output).
        detach: store detached outputs (monitoring only) instead of keeping the graph.

    Yields:
        A list that receives one tensor per call, in call order. For modules that return a tuple the first element
        is recorded (the hidden states of transformer blocks).

    Raises:
        RegularizerError: ``path`` names no module of ``model``.
    """
    module = _module_at(model, path)
    captured: list[Tensor] = []

    def hook(_module: nn.Module, _inputs: tuple, output: object) -> None:
        out = output[0] if isinstance(output, (tuple, list)) else output
        if not isinstance(out, Tensor):
            raise RegularizerError(f"tap: module {path!r} returned {type(out).__name__}, not a tensor")
        captured.append(out.detach() if detach else out)

    handle = module.register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()
