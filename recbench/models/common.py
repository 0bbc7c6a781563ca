"""Pieces shared by the models: the dense arch (or its stand-in when a protocol has no dense
features) and reshaping the injected embedding module's KeyedTensor into (B, F, D).

References: TorchRec ``torchrec.models.dlrm`` (DenseArch, OverArch).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torchrec.models.dlrm import DenseArch


class DenseInput(nn.Module):
    """Bottom MLP over dense features: (B, num_dense) -> (B, D).

    A protocol without dense features (Avazu) gets a learned (D,) vector instead, broadcast to
    every sample, so the interaction arch keeps its shape (it then acts as a learned bias).
    """

    def __init__(self, num_dense: int, bottom_mlp: Sequence[int], embedding_dim: int):
        super().__init__()
        layers = list(bottom_mlp)
        if num_dense > 0:
            if not layers or layers[-1] != embedding_dim:
                raise ValueError(
                    f"model.bottom_mlp must end with embedding_dim={embedding_dim} "
                    f"(the dense vector joins the embedding interaction), got {layers}"
                )
            self.arch = DenseArch(in_features=num_dense, layer_sizes=layers)
            self.constant = None
        else:
            self.arch = None
            self.constant = nn.Parameter(torch.zeros(embedding_dim))
        self.embedding_dim = embedding_dim

    def forward(self, dense: torch.Tensor) -> torch.Tensor:
        if self.arch is not None:
            return self.arch(dense)
        return self.constant.expand(dense.shape[0], self.embedding_dim)


def stack_fields(keyed, num_fields: int, dim: int) -> torch.Tensor:
    """KeyedTensor with values (B, F * D) -> tensor (B, F, D)."""
    values = keyed.values()
    if values.shape[1] != num_fields * dim:
        raise ValueError(
            f"embedding module returned {values.shape[1]} columns, expected F * D = {num_fields} * {dim}; "
            "every method must output the model's embedding_dim per field"
        )
    return values.view(values.shape[0], num_fields, dim)
