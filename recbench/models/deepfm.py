"""DeepFM with an injected embedding module, as the VLDB 2024 artifact defines it.

References: Guo et al., "DeepFM: A Factorization-Machine based Neural Network for CTR
Prediction", IJCAI 2017; Hsword/Hetu ``tools/EmbeddingMemoryCompression/models/deepfm.py``
(``DeepFM_Head``, commit a1cb1bcaf236c9f1d452733b105997d50c16c9df); TorchRec
``torchrec.modules.deepfm`` (``DeepFM``, ``FactorizationMachine``).

forward(dense (B, num_dense), sparse KeyedJaggedTensor) -> logits (B,). With the embeddings
e (B, F, D) of the one injected (compressed) embedding module split as the artifact does into a
first-order weight w_i = e_i[0] and a latent vector v_i = e_i[1:] (D - 1 wide):

    logit = <a, dense>                        first order of the dense features (no bias)
          + sum_i w_i                         first order of the sparse fields
          + sum_{i<j} <v_i, v_j>              FM second order
          + MLP([v_1, ..., v_F])              deep part: F * (D - 1) -> 256 -> 256 -> 1, ReLU

The first-order weights live in the compressed embedding (no separate uncompressed table the
budget would not see). The dense features enter only the first-order term. Every linear layer is
Xavier-normal with zero biases (Hetu ``GenXavierNormal``); no dropout.

TorchRec's ``FactorizationMachine`` sums over the flattened (B, F * D) input, which is the FM of
the F * D scalars, not sum_{i<j} <v_i, v_j>; it is applied here per latent dimension (input
(B * (D - 1), F)), which is the paper's FM (tests/models/test_deepfm_wdl.py checks it against a
naive O(F^2) sum).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.models.dlrm import OverArch
from torchrec.modules.deepfm import DeepFM as DeepFMBlock
from torchrec.modules.deepfm import FactorizationMachine

from recbench.models.common import EmbeddingModel, check_dense, check_embedding_width, stack_fields, xavier_normal_linears


def check_deep_mlp(deep_mlp: Sequence[int]) -> list:
    """``model.deep_mlp``: at least one hidden layer, last == 1 (one click logit)."""
    layers = [int(s) for s in deep_mlp]
    if len(layers) < 2 or layers[-1] != 1 or min(layers) < 1:
        raise ValueError(f"model.deep_mlp must list positive hidden sizes and end with 1 (one click logit), "
                         f"e.g. [256, 256, 1]; got {list(deep_mlp)}")
    return layers


class FirstOrderDense(nn.Module):
    """The dense features' first-order term <a, dense> (B, 1), no bias; zeros (B, 1) without dense
    features. Non-finite dense features are refused (``check_dense``)."""

    def __init__(self, num_dense: int):
        super().__init__()
        self.linear = nn.Linear(num_dense, 1, bias=False) if num_dense > 0 else None

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        if self.linear is None:
            return dense.new_zeros(dense.shape[0], 1)
        check_dense(dense)
        return self.linear(dense)


def fm_second_order(latent: torch.Tensor, fm: nn.Module) -> torch.Tensor:
    """sum_{i<j} <v_i, v_j> (B, 1) of latent (B, F, K) through TorchRec's ``FactorizationMachine``
    applied to each of the K dimensions (its input flattened per sample is one dimension's F values)."""
    batch, fields, width = latent.shape
    per_dim = fm([latent.transpose(1, 2).reshape(batch * width, fields)])  # (B * K, 1)
    return per_dim.view(batch, width).sum(dim=1, keepdim=True)


class DeepFM(EmbeddingModel):
    """DeepFM over any embedding module with TorchRec's EBC interface.

    Args:
        embedding: module mapping a KeyedJaggedTensor to a KeyedTensor (B, F * D).
        num_dense: dense feature count (0 allowed: no dense term).
        num_sparse: number of sparse fields F.
        embedding_dim: D (>= 2: one first-order coordinate plus D - 1 latent ones).
        deep_mlp: the deep part's layer sizes, last == 1 (artifact: 256-256-1).

    ``interact`` returns the four additive terms (B, 4): dense first order, sparse first order,
    FM second order, deep; ``head`` sums them.
    """

    name = "deepfm"

    def __init__(self, embedding: nn.Module, num_dense: int, num_sparse: int, embedding_dim: int,
                 deep_mlp: Sequence[int] = (256, 256, 1)):
        super().__init__()
        if int(embedding_dim) < 2:
            raise ValueError(f"model.embedding_dim must be >= 2 for deepfm (one first-order coordinate plus "
                             f"the FM latent vector), got {embedding_dim}")
        check_embedding_width(embedding, num_sparse, embedding_dim, self.name)
        self.embedding = embedding
        self.num_sparse, self.embedding_dim = int(num_sparse), int(embedding_dim)
        self.dense_input = FirstOrderDense(int(num_dense))
        self.fm = FactorizationMachine()
        latent_width = self.num_sparse * (self.embedding_dim - 1)
        self.deep = DeepFMBlock(dense_module=OverArch(in_features=latent_width, layer_sizes=check_deep_mlp(deep_mlp)))
        for part in (self.dense_input, self.deep):  # never the embedding module: the method owns its init
            xavier_normal_linears(part)

    def interact(self, dense_out: torch.Tensor, embedded) -> torch.Tensor:
        fields = stack_fields(embedded, self.num_sparse, self.embedding_dim)
        first_order = fields[:, :, 0].sum(dim=1, keepdim=True)
        latent = fields[:, :, 1:]
        return torch.cat([dense_out, first_order, fm_second_order(latent, self.fm), self.deep([latent])], dim=1)

    def head(self, representation: torch.Tensor, sparse):
        return representation.sum(dim=1)
