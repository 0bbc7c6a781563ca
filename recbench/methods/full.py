"""``full``: the uncompressed baseline — one fp32 table per field, fused FBGEMM lookups.

References: Naumov et al., "Deep Learning Recommendation Model for Personalization and
Recommendation Systems" (DLRM), arXiv:1906.00091, 2019.

Mechanism: field i owns a (num_embeddings_i, D) table; a bag is pooled by TorchRec/FBGEMM.
Budget: the only reachable ratio is 1.0; any smaller ratio is infeasible (recorded, skipped).
Shapes: KJT (F keys, B bags) -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Sequence

from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.base import CompressionMethod, InfeasibleBudget, QuantizeSettings
from recbench.methods.blocks.tables import FusedIdMapEmbedding, FusedTables, PhysicalTable, physical_tables, table_memory
from recbench.types import Budget, EmbeddingOptimizer, MemoryReport, Plan, TableSpec


class FullEmbedding(FusedIdMapEmbedding):
    """One fused table per field; ids are looked up unchanged."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, optimizer: EmbeddingOptimizer):
        super().__init__(tables, dim)
        self.optimizer_spec = optimizer
        self.fused = FusedTables(physical_tables(tables, dim, {}), optimizer)

    def rewrite(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return features


class Full(CompressionMethod):
    name = "full"
    settings_class = QuantizeSettings  # method.quantize: the fp32 tables deployed quantized

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        if budget.compression_ratio < 1.0:
            raise InfeasibleBudget(self.name, budget.compression_ratio, 1.0, 1.0,
                                   "the uncompressed baseline always uses the full fp32 tables")
        return {}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        return table_memory(self.physical_tables(tables, dim, hparams), tables, dim, optimizer)

    def physical_tables(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any]) -> List[PhysicalTable]:
        return physical_tables(tables, dim, {})

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> FullEmbedding:
        return FullEmbedding(tables, dim, optimizer)
