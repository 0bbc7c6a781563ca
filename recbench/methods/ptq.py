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
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods.blocks import budget as budget_lib
from recbench.methods.base import CompressionMethod
from recbench.methods.full import FullEmbedding
from recbench.methods.blocks.tables import closed_form_table_bytes, physical_tables, skip_bounds_check
from recbench.types import Budget, EmbeddingOptimizer, MemoryReport, Plan, TableSpec, full_embedding_bytes

LEVELS = (32, 16, 8, 4, 2)
SCALE_BIAS_BYTES = 4  # fp16 scale + fp16 bias per quantized row
TABLE_ALIGNMENT = 128  # FBGEMM pads each table's storage to a 128-byte cache line


def row_bytes(dim: int, bits: int) -> int:
    """Bytes of one stored row (FBGEMM's unpadded_row_size_in_bytes; CPU row alignment is 1)."""
    return {32: 4 * dim, 16: 2 * dim, 8: dim + SCALE_BIAS_BYTES, 4: dim // 2 + SCALE_BIAS_BYTES,
            2: dim // 4 + SCALE_BIAS_BYTES}[int(bits)]


def table_bytes(rows: int, dim: int, bits: int) -> int:
    raw = rows * row_bytes(dim, bits)
    return -(-raw // TABLE_ALIGNMENT) * TABLE_ALIGNMENT


def _sparse_type(bits: int):
    from fbgemm_gpu.split_embedding_configs import SparseType

    return {32: SparseType.FP32, 16: SparseType.FP16, 8: SparseType.INT8, 4: SparseType.INT4,
            2: SparseType.INT2}[int(bits)]


def quantize_rows(weight: torch.Tensor, bits: int) -> List[torch.Tensor]:
    """fp32 rows -> [data] (fp32/fp16 as bytes) or [data, fp16 scale+bias] as uint8, FBGEMM layout."""
    if bits == 32:
        return [weight.contiguous().view(torch.uint8)]
    if bits == 16:
        return [weight.to(torch.float16).contiguous().view(torch.uint8)]
    fused = torch.ops.fbgemm.FloatToFusedNBitRowwiseQuantizedSBHalf(weight.contiguous(), int(bits))
    return [fused[:, :-SCALE_BIAS_BYTES], fused[:, -SCALE_BIAS_BYTES:]]


def row_error_bound(weight: torch.Tensor, bits: int) -> float:
    """Stated bound on |dequantized - fp32| per element of one id, max over the table's rows.

    INT-b: half a step (max - min) / (2^b - 1) plus fp16 rounding of scale and bias
    (2^-10 (range + |min|)); FP16: round-to-nearest, 2^-11 |w|; FP32: exact.
    """
    if bits == 32 or weight.numel() == 0:
        return 0.0
    if bits == 16:
        return float(weight.abs().max()) * 2.0 ** -11
    lo, hi = weight.min(1).values, weight.max(1).values
    step = (hi - lo) / (2 ** bits - 1)
    return float((0.5 * step + 2.0 ** -10 * ((hi - lo) + lo.abs())).max())


class QuantizedTables(nn.Module):
    """FBGEMM's n-bit TBE over all fields (per-field precision). forward: KJT -> (B, F * D)."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, bits: Mapping[str, int],
                 weights: Optional[Mapping[str, torch.Tensor]] = None):
        super().__init__()
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
        from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

        self.names, self.dim = [t.name for t in tables], int(dim)
        self.mean = [t.name for t in tables if t.pooling == "mean"]
        self.tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
            embedding_specs=[(t.name, t.num_embeddings, dim, _sparse_type(bits[t.name]), EmbeddingLocation.HOST)
                             for t in tables],
            device="cpu", pooling_mode=PoolingMode.SUM, output_dtype=_sparse_type(32))
        skip_bounds_check(self.tbe)  # ids are checked by the embedding module's guard (base.check_ids)
        self.tbe.initialize_weights()  # allocates the row storage (FBGEMM defers it)
        if weights is not None:
            with torch.no_grad():
                for t, dest in zip(tables, self.tbe.split_embedding_weights()):
                    for target, source in zip([x for x in dest if x is not None], quantize_rows(weights[t.name], bits[t.name])):
                        target.copy_(source)

    def weight_bytes(self) -> int:
        """Bytes of the stored rows: data, per-row scale/bias and FBGEMM's padding."""
        return int(self.tbe.weights_host.numel() * self.tbe.weights_host.element_size())

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if features.keys() != self.names:
            jagged = features.to_dict()
            features = KeyedJaggedTensor(keys=self.names, values=torch.cat([jagged[k].values() for k in self.names]),
                                         lengths=torch.cat([jagged[k].lengths() for k in self.names]))
        out = self.tbe(features.values().to(torch.int64), features.offsets().to(torch.int64))
        if self.mean:
            lengths = features.lengths().view(len(self.names), -1).clamp(min=1).to(out.dtype)
            divisor = torch.stack([lengths[i] if n in self.mean else torch.ones_like(lengths[i])
                                   for i, n in enumerate(self.names)], dim=1)
            out = (out.view(out.shape[0], len(self.names), self.dim) / divisor.unsqueeze(2)).reshape(out.shape[0], -1)
        return KeyedTensor(keys=self.names, length_per_key=[self.dim] * len(self.names), values=out)


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
