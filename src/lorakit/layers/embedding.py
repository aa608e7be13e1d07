"""LoRA on ``nn.Embedding``: the low-rank update of the embedding table, looked up like the table itself."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.layers.base import LoraFactors, LoraLayer


class LoraEmbedding(LoraLayer):
    """``h = E[i] + s · (Aᵀ[i]) Bᵀ`` with A: (r, num_embeddings), B: (embedding_dim, r).

    The table update is ``ΔE = s·(B·A)ᵀ``, (num_embeddings, embedding_dim). Dropout does not apply (the input is
    token ids), and neither does the base's ``max_norm`` (it applies to the base table only).
    """

    kind = "embedding"
    weight_out_dim = 1

    def __init__(self, base: nn.Embedding):
        super().__init__(base)
        self.padding_idx, self.scale_grad_by_freq = base.padding_idx, base.scale_grad_by_freq

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1])

    def lora_forward(self, f: LoraFactors, x: Tensor) -> Tensor:
        # No max_norm here: F.embedding renormalises the rows it looks up *in place*, which would rewrite A. The
        # base lookup (base(x)) keeps the base layer's own max_norm behaviour on its own table.
        return F.embedding(x, f.A.T, self.padding_idx, None, 2.0, self.scale_grad_by_freq, False) @ f.B.T
