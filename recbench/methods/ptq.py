"""``ptq``: post-training row-wise quantization of the trained tables (FBGEMM n-bit TBE).

References: Guan, Malevich, Yang, Park, Yuen, "Post-Training 4-bit Quantization on Embedding
Tables", NeurIPS 2019 workshop (arXiv:1911.02079); FBGEMM ``IntNBitTableBatchedEmbeddingBagsCodegen``.

Mechanism: trains exactly as ``full`` (fp32 FBGEMM tables, fused optimizer). The deployable form
(``to_inference``) quantizes every row of a field to its solved precision with FBGEMM's row-wise
asymmetric quantizer (``FloatToFusedNBitRowwiseQuantizedSBHalf``: per-row fp16 scale
(max - min) / (2^b - 1) and fp16 bias = min stored with the row) for INT8/INT4/INT2, or casts it
to FP16, and looks the rows up with FBGEMM's quantized table-batched kernel on CPU (SUM pooling,
then division for mean fields). A field at 32 bits stays fp32 (a FP32 table of the same TBE).

Budget: bytes are what the quantized TBE holds: per row 4D (fp32), 2D (fp16), D + 4 (int8),
D/2 + 4 (int4), D/4 + 4 (int2) bytes (fp16 scale + bias included, CPU row alignment 1), each
table padded to a multiple of 128 bytes (FBGEMM's cache-line alignment). ``bits: auto`` takes
the largest uniform precision in {32, 16, 8, 4, 2} whose bytes fit the target, then raises
fields one level (largest fields first) while the total stays within the target (on tiny tables
a level step can exceed the tolerance: the best mix under the target then runs, flagged
``under_budget`` by the job); a fixed ``bits`` quantizes every compressed field to it. Fields
with fewer than ``budget.min_rows_to_compress`` rows stay fp32.

Shapes: KJT with F keys, B bags per key -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.blocks import budget as budget_lib
from recbench.methods.base import CompressionMethod
from recbench.methods.full import FullEmbedding
from recbench.methods.blocks.quantized_tables import (LEVELS, row_bytes, row_error_bound,  # noqa: F401
                                                      table_bytes)  # (row_bytes: re-exported)
from recbench.methods.blocks.tables import QuantizedCollection, closed_form_table_bytes, physical_tables
from recbench.types import Budget, EmbeddingOptimizer, MemoryReport, Plan, TableSpec, full_embedding_bytes


class QuantizedTables(QuantizedCollection):
    """FBGEMM's n-bit TBE with one table per field (per-field precision). forward: KJT -> (B, F * D)."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, bits: Mapping[str, int],
                 weights: Optional[Mapping[str, torch.Tensor]] = None):
        super().__init__(physical_tables(tables, dim, {}), bits, weights)
        self.names, self.dim = [t.name for t in tables], int(dim)


class PTQEmbedding(FullEmbedding):
    """Trains as ``full``; ``to_inference`` quantizes. Memory reports the quantized inference bytes."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
                 optimizer: EmbeddingOptimizer):
        super().__init__(tables, dim, optimizer)
        self.hparams = {"bits": dict(hparams["bits"])}

    def _weights(self) -> Dict[str, torch.Tensor]:
        return {t.name: self.fused.weight(t.name).detach() for t in self.tables}

    def memory_report(self) -> MemoryReport:
        quantized = QuantizedTables(self.tables, self.dim, self.hparams["bits"])  # storage only, not filled
        inference = quantized.weight_bytes()
        weights = self.fused.weight_bytes()
        return MemoryReport(
            inference_bytes=inference, training_bytes=weights + self.fused.optimizer_state_bytes(),
            parameters=sum(p.numel() for p in self.fused.fused_parameters()),
            full_bytes=full_embedding_bytes(self.tables, self.dim), breakdown={"quantized_rows": inference},
        )

    def inference_error_bound(self, features: KeyedJaggedTensor) -> float:
        """Stated max |to_inference() - training form| over the outputs of ``features``:
        per field, the per-id bound (``row_error_bound``) times the largest bag (1 for mean)."""
        bound = 0.0
        weights = self._weights()
        for t in self.tables:
            lengths = features[t.name].lengths()
            bag = 1 if t.pooling == "mean" or not len(lengths) else max(int(lengths.max()), 1)
            bound = max(bound, bag * row_error_bound(weights[t.name], self.hparams["bits"][t.name]))
        return bound

    def to_inference(self) -> nn.Module:
        return QuantizedTables(self.tables, self.dim, self.hparams["bits"], self._weights()).eval()


@dataclass
class PTQSettings:
    """Hyperparameters of ``ptq`` (default: per-field precision solved from the budget)."""

    bits: Any = "auto"  #: auto (per-field precision landing the budget) | 16 | 8 | 4 | 2


class PTQ(CompressionMethod):
    """Post-training row-wise quantization; hyperparameters: ``PTQSettings``."""

    name = "ptq"
    settings_class = PTQSettings

    def check_settings(self) -> None:
        if self.bits != "auto" and self.bits not in (16, 8, 4, 2):
            raise ValueError(f"ptq: bits must be one of auto, 16, 8, 4, 2, got {self.bits!r}")

    def _total(self, tables: Sequence[TableSpec], dim: int, bits: Mapping[str, int]) -> int:
        return sum(table_bytes(t.num_embeddings, dim, bits[t.name]) for t in tables)

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        if dim % 8:
            raise ValueError(f"ptq: D={dim} must be a multiple of 8 (INT2 packs 4 values per byte, FBGEMM rows)")
        compressed, kept = budget_lib.split_tables(tables, budget)
        names = {t.name for t in compressed}
        target = budget_lib.target_bytes(tables, dim, budget)

        def uniform(level: int) -> Dict[str, int]:
            return {t.name: (level if t.name in names else 32) for t in tables}

        lowest, highest = self._total(tables, dim, uniform(2)), self._total(tables, dim, uniform(32))
        if self.bits != "auto":
            bits = uniform(int(self.bits))
            achieved = self._total(tables, dim, bits)
            if achieved > target:
                budget_lib.land(self.name, achieved, tables, dim, budget, lowest, highest,
                                f"bits={self.bits} gives ratio {achieved / full_embedding_bytes(tables, dim):.4g}")
            return {"bits": bits}
        fitting = [level for level in LEVELS if self._total(tables, dim, uniform(level)) <= target]
        if not fitting:
            budget_lib.land(self.name, lowest, tables, dim, budget, lowest, highest)
        level = fitting[0]
        bits = uniform(level)
        if level != 32:
            higher = LEVELS[LEVELS.index(level) - 1]
            for t in sorted(compressed, key=lambda t: -t.num_embeddings):
                trial = dict(bits, **{t.name: higher})
                if self._total(tables, dim, trial) <= target:
                    bits = trial
        budget_lib.land(self.name, self._total(tables, dim, bits), tables, dim, budget, lowest, highest)
        return {"bits": bits}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        inference = self._total(tables, dim, hparams["bits"])
        parts = closed_form_table_bytes(physical_tables(tables, dim, {}), optimizer)
        return MemoryReport(
            inference_bytes=int(inference), training_bytes=parts["weights"] + parts["optimizer_state"],
            parameters=sum(t.num_embeddings for t in tables) * dim,
            full_bytes=full_embedding_bytes(tables, dim), breakdown={"quantized_rows": int(inference)},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> PTQEmbedding:
        return PTQEmbedding(tables, dim, plan.hparams, optimizer)
