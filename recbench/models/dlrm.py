"""DLRM with an injected embedding module.

References: Naumov et al., "Deep Learning Recommendation Model for Personalization and
Recommendation Systems", arXiv:1906.00091, 2019; TorchRec ``torchrec.models.dlrm``.

forward(dense (B, num_dense), sparse KeyedJaggedTensor) -> logits (B,):
bottom MLP (B, D) + embeddings (B, F, D) -> pairwise dot interactions (B, D + C(F+1, 2))
-> top MLP -> (B,).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.models.dlrm import InteractionArch, OverArch, choose

from recbench.models.common import DenseInput, EmbeddingModel, stack_fields


class DLRM(EmbeddingModel):
    """DLRM over any embedding module with TorchRec's EBC interface.

    Args:
        embedding: module mapping a KeyedJaggedTensor to a KeyedTensor (B, F * D).
        num_dense: dense feature count (0 allowed).
        num_sparse: number of sparse fields F.
        embedding_dim: D.
        bottom_mlp: dense arch layer sizes, last == D (DLRM Criteo Kaggle: 512-256-64-16).
        top_mlp: over arch layer sizes, last == 1 (DLRM Criteo Kaggle: 512-256-1).
    """

    name = "dlrm"

    def __init__(self, embedding: nn.Module, num_dense: int, num_sparse: int, embedding_dim: int,
                 bottom_mlp: Sequence[int], top_mlp: Sequence[int]):
        super().__init__()
        if list(top_mlp)[-1] != 1:
            raise ValueError(f"model.top_mlp must end with 1 (one click logit), got {list(top_mlp)}")
        self.embedding = embedding
        self.num_sparse, self.embedding_dim = int(num_sparse), int(embedding_dim)
        self.dense_input = DenseInput(num_dense, bottom_mlp, embedding_dim)
        self.interaction = InteractionArch(num_sparse_features=num_sparse)
        over_in = embedding_dim + choose(num_sparse, 2) + num_sparse
        self.over = OverArch(in_features=over_in, layer_sizes=list(top_mlp))

    def interact(self, dense_out: torch.Tensor, embedded) -> torch.Tensor:
        """The interaction output (B, D + C(F+1, 2)) that the over-arch (or MoE experts) consume."""
        return self.interaction(dense_out, stack_fields(embedded, self.num_sparse, self.embedding_dim))
