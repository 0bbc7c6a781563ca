"""DCNv2 with an injected embedding module.

References: Wang et al., "DCN V2: Improved Deep & Cross Network and Practical Lessons for
Web-scale Learning to Rank Systems", WWW 2021; TorchRec ``LowRankCrossNet`` and
``torchrec.models.dlrm.InteractionDCNArch``.

forward(dense (B, num_dense), sparse KeyedJaggedTensor) -> logits (B,):
x0 = [bottom MLP (B, D), embeddings (B, F * D)] -> low-rank cross network (B, (F + 1) * D)
-> top MLP (stacked deep network) -> (B,).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.models.dlrm import InteractionDCNArch, OverArch
from torchrec.modules.crossnet import LowRankCrossNet

from recbench.models.common import DenseInput, EmbeddingModel, stack_fields


class DCNv2(EmbeddingModel):
    """Args as DLRM plus ``cross_layers`` (default 3) and ``cross_rank`` (default 64)."""

    name = "dcn"

    def __init__(self, embedding: nn.Module, num_dense: int, num_sparse: int, embedding_dim: int,
                 bottom_mlp: Sequence[int], top_mlp: Sequence[int], cross_layers: int = 3, cross_rank: int = 64):
        super().__init__()
        if list(top_mlp)[-1] != 1:
            raise ValueError(f"model.top_mlp must end with 1 (one click logit), got {list(top_mlp)}")
        self.embedding = embedding
        self.num_sparse, self.embedding_dim = int(num_sparse), int(embedding_dim)
        self.dense_input = DenseInput(num_dense, bottom_mlp, embedding_dim)
        width = (num_sparse + 1) * embedding_dim
        self.interaction = InteractionDCNArch(
            num_sparse_features=num_sparse,
            crossnet=LowRankCrossNet(in_features=width, num_layers=cross_layers, low_rank=cross_rank),
        )
        self.over = OverArch(in_features=width, layer_sizes=list(top_mlp))

    def interact(self, dense_out: torch.Tensor, embedded) -> torch.Tensor:
        return self.interaction(dense_out, stack_fields(embedded, self.num_sparse, self.embedding_dim))
