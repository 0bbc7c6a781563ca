"""Wide & Deep (WDL) with an injected embedding module, as the VLDB 2024 artifact defines it.

References: Cheng et al., "Wide & Deep Learning for Recommender Systems", DLRS 2016;
Hsword/Hetu ``tools/EmbeddingMemoryCompression/models/wdl.py`` (``WDL_Head``, commit
a1cb1bcaf236c9f1d452733b105997d50c16c9df); HugoZHL/CAFE ``ArtifactEvaluation/models.py``
(``WDL_Net``, commit c757c39e9a497202939904ae5b358eff426ccfda); TorchRec
``torchrec.models.dlrm.OverArch`` (the deep MLP).

forward(dense (B, num_dense), sparse KeyedJaggedTensor) -> logits (B,):

    x = [e_1, ..., e_F, dense]                (B, F * D + num_dense), the raw dense features
    logit = MLP(x) + <w, x>                   deep: x -> 256 -> 256 -> 1 (ReLU); wide: linear, no bias

As in both artifacts, the wide part is linear over the same embeddings and dense features (no
crossed-id features, no table of its own), so the one compressed embedding module is all the
model's embedding memory. Every linear layer is Xavier-normal with zero biases (Hetu
``GenXavierNormal``); no dropout.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.models.dlrm import OverArch

from recbench.models.common import EmbeddingModel, check_dense, check_embedding_width, stack_fields, xavier_normal_linears
from recbench.models.deepfm import check_deep_mlp


class RawDense(nn.Module):
    """The dense features as they are (B, num_dense), after ``check_dense``; (B, 0) without any."""

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        check_dense(dense)
        return dense


class WideAndDeep(EmbeddingModel):
    """Wide & Deep over any embedding module with TorchRec's EBC interface.

    Args:
        embedding: module mapping a KeyedJaggedTensor to a KeyedTensor (B, F * D).
        num_dense: dense feature count (0 allowed).
        num_sparse: number of sparse fields F.
        embedding_dim: D.
        deep_mlp: the deep part's layer sizes, last == 1 (artifact: 256-256-1).

    ``interact`` returns x = [embeddings, dense] (B, F * D + num_dense); ``head`` is deep(x) + wide(x).
    """

    name = "wdl"

    def __init__(self, embedding: nn.Module, num_dense: int, num_sparse: int, embedding_dim: int,
                 deep_mlp: Sequence[int] = (256, 256, 1)):
        super().__init__()
        check_embedding_width(embedding, num_sparse, embedding_dim, self.name)
        self.embedding = embedding
        self.num_sparse, self.embedding_dim = int(num_sparse), int(embedding_dim)
        self.dense_input = RawDense()
        width = self.num_sparse * self.embedding_dim + int(num_dense)
        self.deep = OverArch(in_features=width, layer_sizes=check_deep_mlp(deep_mlp))
        self.wide = nn.Linear(width, 1, bias=False)
        for part in (self.deep, self.wide):  # never the embedding module: the method owns its init
            xavier_normal_linears(part)

    def interact(self, dense_out: torch.Tensor, embedded) -> torch.Tensor:
        fields = stack_fields(embedded, self.num_sparse, self.embedding_dim)
        return torch.cat([fields.flatten(1), dense_out], dim=1)

    def head(self, representation: torch.Tensor, sparse):
        return (self.deep(representation) + self.wide(representation)).squeeze(-1)
