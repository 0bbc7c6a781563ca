"""DCNv2 with an injected embedding module.

References: Wang et al., "DCN V2: Improved Deep & Cross Network and Practical Lessons for
Web-scale Learning to Rank Systems", WWW 2021; TorchRec ``LowRankCrossNet`` and
``torchrec.models.dlrm.InteractionDCNArch``.

forward(dense (B, num_dense), sparse KeyedJaggedTensor) -> logits (B,):
x0 = [bottom MLP (B, D), embeddings (B, F * D)] -> low-rank cross network (B, (F + 1) * D)
-> top MLP (stacked deep network) -> (B,).
"""
from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.models.dlrm import InteractionDCNArch, OverArch
from torchrec.modules.crossnet import LowRankCrossNet

from recbench.models.common import DenseInput, EmbeddingModel, ForwardMemo, forward_precomputed, stack_fields


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

    # ----- repeated evaluation with frozen parameters (search stages) -----
    def forward_memo(self, memo: ForwardMemo):
        """``forward`` of the memo's batch. When the embedding module names the columns of its output
        that can be nonzero (``active_columns()`` (C,), e.g. OptEmbed's per-field dims under search),
        the cross network and the first over-arch layer run on the dense columns and those C only:
        a column that is 0 in x0 stays 0 in every x_l (x0 * (.) + x_l), so the columns left out
        only add zero products to the dot products, and the logits (B,) are ``forward``'s up to
        float summation order. Other heads (MoE) take the whole forward."""
        active = getattr(self.embedding, "active_columns", None)
        columns = active() if active is not None else None
        if columns is None or not isinstance(getattr(self, "over", None), OverArch):
            return super().forward_memo(memo)
        cross, first = self._restricted(columns)
        embedded = forward_precomputed(self.embedding, memo.embedding).values().index_select(1, columns)
        x0 = torch.cat([memo.dense, embedded], 1)  # (B, D + C)
        x = x0
        for v, w, bias in cross:
            x = x0 * (F.linear(F.linear(x, v), w) + bias) + x
        mlp = self.over.model[0]._mlp
        x = mlp[0]._activation_fn(F.linear(x, first, mlp[0]._linear.bias))
        for perceptron in mlp[1:]:
            x = perceptron(x)
        return self.over.model[1](x).squeeze(-1)

    def _restricted(self, columns: torch.Tensor) -> Tuple[List[Tuple[torch.Tensor, ...]], torch.Tensor]:
        """The cross layers' (V (r, D + C), W (D + C, r), bias (D + C,)) and the first over-arch
        weight (H, D + C) on the dense columns and the embedding ``columns``, cached per columns and
        parameter versions."""
        crossnet, mlp = self.interaction.crossnet, self.over.model[0]._mlp
        params = [*crossnet.V_kernels, *crossnet.W_kernels, *crossnet.bias, mlp[0]._linear.weight]
        key = (tuple(columns.tolist()), tuple((id(p), p._version) for p in params))
        cached: Optional[Tuple[Any, Any]] = getattr(self, "_restricted_cache", None)
        if cached is None or cached[0] != key:
            index = torch.cat([torch.arange(self.embedding_dim), self.embedding_dim + columns])
            cross = [(v.detach()[:, index], w.detach()[index], b.detach()[index])
                     for v, w, b in zip(crossnet.V_kernels, crossnet.W_kernels, crossnet.bias)]
            self._restricted_cache = (key, (cross, mlp[0]._linear.weight.detach()[:, index]))
        return self._restricted_cache[1]
