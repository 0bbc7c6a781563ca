"""``full``: the uncompressed baseline — one fp32 table per field, fused FBGEMM lookups.

References: Naumov et al., "Deep Learning Recommendation Model for Personalization and
Recommendation Systems" (DLRM), arXiv:1906.00091, 2019.

Mechanism: field i owns a (num_embeddings_i, D) table; a bag is pooled by TorchRec/FBGEMM.
Budget: the only reachable ratio is 1.0; any smaller ratio is infeasible (recorded, skipped).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Sequence

from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods.base import CompressionMethod, EmbeddingModule, InfeasibleBudget
from recbench.methods.tables import FusedTables, PhysicalTable, closed_form_table_bytes
from recbench.types import Budget, EmbeddingOptimizer, MemoryReport, TableSpec, full_embedding_bytes


def _physical(tables: Sequence[TableSpec], dim: int):
    return [PhysicalTable(t.name, t.num_embeddings, dim, [t.name], t.pooling) for t in tables]


class FullEmbedding(EmbeddingModule):
    """One fused table per field. forward: KJT (F keys, B bags each) -> KeyedTensor (B, F * D)."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, optimizer: EmbeddingOptimizer):
        super().__init__(tables, dim)
        self.optimizer_spec = optimizer
        self.fused = FusedTables(_physical(tables, dim), optimizer)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.fused(features)

    def fused_optimizer(self):
        return self.fused.fused_optimizer()

    def fused_parameters(self):
        return self.fused.fused_parameters()

    def memory_report(self) -> MemoryReport:
        weights = self.fused.weight_bytes()
        return MemoryReport(
            inference_bytes=weights,
            training_bytes=weights + self.fused.optimizer_state_bytes(),
            parameters=sum(p.numel() for p in self.fused.fused_parameters()),
            full_bytes=full_embedding_bytes(self.tables, self.dim),
            breakdown={"weights": weights},
        )

    def to_inference(self) -> nn.Module:
        """A plain EmbeddingBagCollection with the same weights (no optimizer state)."""
        return self.fused.unfused_copy().eval()


class Full(CompressionMethod):
    name = "full"

    def solve(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        if budget.compression_ratio < 1.0:
            raise InfeasibleBudget(self.name, budget.compression_ratio, 1.0, 1.0,
                                   "the uncompressed baseline always uses the full fp32 tables")
        return {}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        parts = closed_form_table_bytes(_physical(tables, dim), optimizer)
        return MemoryReport(
            inference_bytes=parts["weights"],
            training_bytes=parts["weights"] + parts["optimizer_state"],
            parameters=sum(t.num_embeddings for t in tables) * dim,
            full_bytes=full_embedding_bytes(tables, dim),
            breakdown={"weights": parts["weights"]},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, budget: Budget,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> FullEmbedding:
        self.solve(tables, dim, budget)
        return FullEmbedding(tables, dim, optimizer)
