"""LoRA on ``nn.Embedding``: the low-rank update of the embedding table, looked up like the table itself."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lorakit.layers.base import LoraFactors, LoraLayer


class LoraEmbedding(LoraLayer):
    """``h = E[i] + s · (Aᵀ[i]) Bᵀ`` with A: (r, num_embeddings), B: (embedding_dim, r).

    The table update is ``ΔE = s·(B·A)ᵀ``, (num_embeddings, embedding_dim). Dropout does not apply (the input is
    token ids).
    """

    kind = "embedding"
    weight_out_dim = 1

    def __init__(self, base: nn.Embedding):
        super().__init__(base)
        self.padding_idx, self.max_norm, self.norm_type = base.padding_idx, base.max_norm, base.norm_type
        self.scale_grad_by_freq, self.sparse = base.scale_grad_by_freq, base.sparse

    @property
    def in_features(self) -> int:
        return int(self.weight.shape[0])

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[1])

    def _lookup(self, ids: Tensor, table: Tensor) -> Tensor:
        return F.embedding(ids, table, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse)

    def base_forward(self, x: Tensor) -> Tensor:
        return self._lookup(x, self.weight)

    def lora_forward(self, f: LoraFactors, x: Tensor) -> Tensor:
        return self._lookup(x, f.A.T) @ f.B.T
