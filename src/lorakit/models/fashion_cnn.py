"""A small CNN for 28×28 grey images (Fashion-MNIST): the source model of the domain-adaptation experiments and
the feature extractor of the Fréchet distance in the prior-matching study.

Three 3×3 conv stages (32, 64, 128 channels, ReLU, 2×2 max-pool after the first two), global average pooling,
then ``features`` (a 128→128 linear layer and ReLU: the latent that OT regularisers tap) and ``head`` (128→10).
There is no batch norm, so a frozen base has no running statistics that would adapt to a new domain on their own:
whatever adaptation happens is the adapter's.
"""

from __future__ import annotations

from torch import Tensor, nn

#: Width of the tapped feature layer.
FEATURE_DIM = 128


class FashionCNN(nn.Module):
    """``x`` (N, 1, 28, 28) in [0, 1] → logits (N, num_classes); ``embed(x)`` gives the (N, 128) features."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 128, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.act = nn.ReLU()
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(128, FEATURE_DIM), nn.ReLU())
        self.head = nn.Linear(FEATURE_DIM, num_classes)

    def embed(self, x: Tensor) -> Tensor:
        """(N, 1, 28, 28) → (N, 128) features (the output of ``features``)."""
        h = self.pool(self.act(self.conv1(x)))
        h = self.pool(self.act(self.conv2(h)))
        h = self.act(self.conv3(h)).mean(dim=(2, 3), keepdim=True)
        return self.features(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.embed(x))
