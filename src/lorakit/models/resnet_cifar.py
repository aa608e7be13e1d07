"""ResNet-20 for CIFAR-10 (He et al. 2016, §4.2), matching the key layout of the shipped pretrained weights.

Three stages of three basic blocks (widths 16/32/64, strides 1/2/2); the shortcut is the paper's "option A": a
parameter-free subsample plus zero-padding of the channels when the shape changes.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.errors import FileFormatError
from lorakit.models.hub import data_root

#: Per-channel input normalisation the pretrained weights expect, on [0, 1] RGB.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.pad = (c_out - c_in) // 2 if stride != 1 or c_in != c_out else None

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, c_in, H, W) → (N, c_out, H/stride, W/stride)."""
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        short = x if self.pad is None else F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))
        return F.relu(out + short)


class ResNetCifar(nn.Module):
    def __init__(self, blocks_per_stage: int = 3, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, c_in = [], 16
        for width, stride in ((16, 1), (32, 2), (64, 2)):
            rest = [BasicBlock(width, width, 1) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(BasicBlock(c_in, width, stride), *rest))
            c_in = width
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, 3, 32, 32) normalised → logits (N, num_classes)."""
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.layer3(self.layer2(self.layer1(h)))
        return self.linear(h.mean((2, 3)))


def resnet20_weights_path() -> Path:
    """The shipped ResNet-20 CIFAR-10 weights under the data root."""
    return data_root() / "pretrained" / "resnet20-cifar10" / "resnet20-12fca82f.th"


def resnet20_cifar10(path: str | Path | None = None) -> ResNetCifar:
    """ResNet-20 with the pretrained CIFAR-10 weights (``weights_only=True``, ``strict=True``).

    Raises:
        FileFormatError: the file is missing or its keys do not match the architecture.
    """
    path = Path(path) if path is not None else resnet20_weights_path()
    if not path.is_file():
        raise FileFormatError(path, "ResNet-20 weights not found (set LORAKIT_DATA to the shared data folder)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    state = blob.get("state_dict", blob) if isinstance(blob, dict) else None
    if not isinstance(state, dict):
        raise FileFormatError(path, "expected a state_dict (or a dict holding 'state_dict')")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = ResNetCifar()
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FileFormatError(path, f"weights do not fit ResNet-20: {e}") from None
    return model
