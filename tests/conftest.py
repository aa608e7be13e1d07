"""Shared fixtures: tiny models with fixed seeds, and the real MiniLM-L6 weights."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


class TinyNet(nn.Module):
    """A plain torch model with every supported base kind: embedding, conv1d, conv2d, linear, head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv1 = nn.Conv1d(8, 6, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect")
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(6, 6), nn.GELU()) for _ in range(3)])
        self.head = nn.Linear(6 + 5, 4)

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.embed(ids).transpose(1, 2)).mean(-1)  # (N, 6)
        for block in self.blocks:
            h = h + block(h)
        g = self.conv2(img).mean((-1, -2))  # (N, 5)
        return self.head(torch.cat([h, g], -1))


@pytest.fixture
def tiny() -> TinyNet:
    torch.manual_seed(0)
    return TinyNet().eval()


@pytest.fixture
def tiny_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 20, (4, 7), generator=g), torch.randn(4, 3, 6, 6, generator=g)


def randomize_b(model: nn.Module, name: str = "default", seed: int = 0) -> None:
    """Give every B factor of adapter ``name`` random values, so the adapter changes the outputs."""
    from lorakit import lora_layers

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            if name in layer.lora:
                f = layer.lora[name]
                f.B.copy_(torch.randn(f.B.shape, generator=g) * 0.1)
                if layer.kind == "embedding":
                    f.A.copy_(torch.randn(f.A.shape, generator=g) * 0.1)


@pytest.fixture(scope="session")
def minilm_source() -> str:
    from lorakit.models.hub import minilm_source

    return minilm_source()


@pytest.fixture
def minilm(minilm_source):
    """Real MiniLM-L6 with a fresh 2-class head (seeded), in eval mode, and a tokenised batch."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(minilm_source, num_labels=2).eval()
    tok = AutoTokenizer.from_pretrained(minilm_source)
    batch = tok(["a gripping, beautifully acted film", "a dull and lifeless mess", "i loved it"],
                padding=True, return_tensors="pt")
    return model, batch


@pytest.fixture
def exact_float32():
    """TF32 matmuls and convolutions round to 10 mantissa bits; CUDA tests comparing float32 results turn it off."""
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
