"""``qat``: quantisation-aware training of the embedding rows (INT8 / INT4 / INT2, straight-through).

References: Tran, Chen, Nguyen, Huang, Cui, Yin, "A Thorough Performance Benchmarking on Lightweight
Embedding-based Recommender Systems" (LERS), ACM TOIS (arXiv:2406.17335); code
chenxing1999/recsys-benchmark at commit 31dc3095e358db1da858d78308ac4184fa703315:
``src/models/embeddings/qat_emb.py`` (``QAT_EmbInt``, ``StotasticRounding``),
``configs/deepfm/qat_config.yaml``, ``src/models/deepfm.py`` (``get_optimizers``); the step-size
gradient is LSQ's (Esser et al., "Learned Step Size Quantization", ICLR 2020) without its gradient
scale; deployable rows in FBGEMM's n-bit TBE (``IntNBitTableBatchedEmbeddingBagsCodegen``).

Mechanism (LERS's ``QAT_EmbInt``). The compressed fields' rows are one stacked fp32 table W (R, D)
(the master copy, trained with row-sparse gradients) and one learned scale s for the whole table
(LERS: ``scale`` initialised to (max W - min W) / (Q_max - Q_min) of the initial draw, a parameter
unless ``fixed_scale``). Training forward, per looked-up id (before pooling), fake quantisation
with LERS's stochastic rounding:
    v = w / s,  c = clip(v, Q_min, Q_max),  q = floor(c) + [u > floor(c) + 1 - c],  u ~ U[0, 1),
    e = s q,    Q_min = -2^(b-1), Q_max = 2^(b-1) - 1.
Backward (straight-through): dL/dw = dL/de for every entry (no clipping mask, as LERS), and
dL/ds = sum over the batch's entries of dL/de * m with m = Q_max where v >= Q_max, Q_min where
v <= Q_min, and q - v inside. Eval mode (validation, test) rounds to nearest with the scale as the
deployable form stores it (fbgemm: fp16, packed: fp32), so it equals the deployable table exactly
(LERS rounds stochastically in eval too: a deviation).

Deployable form (``to_inference``): the same n-bit FBGEMM TBE that ``ptq`` builds, filled with the
QAT codes instead of a re-quantisation: per row the unsigned codes q + 2^(b-1) (packed 8 / b per
byte, low bits first), fp16 scale s and fp16 bias -s 2^(b-1), so a row de-quantises to s q exactly.

``storage: packed`` deploys instead what LERS holds: the codes of all compressed rows in one
bit-packed stream and the one fp32 scale (``PackedCodes``; no per-row scale or bias).

Budget: bytes are what the deployable form holds. fbgemm (default, ``ptq.table_bytes``): D b / 8
+ 4 bytes per row (the fp16 scale and bias FBGEMM stores with every row), each table padded to
128 bytes; packed: ceil(R D b / 8) + 4 bytes. Fields below ``budget.min_rows_to_compress`` stay
fp32. One bit width for every compressed field (LERS quantises the whole table at one ``n_bits``):
``bits: auto`` takes the largest of ``levels`` (default 8, 4, 2) within the target. On D = 16 fbgemm reaches ratios 0.3125 (INT8), 0.1875 (INT4)
and 0.125 (INT2) plus padding (below about 0.125 is infeasible); packed reaches 0.25, 0.125, 0.0625.

Shapes: KJT (F keys, N values) -> per id (N, D) -> fake-quantised (N, D) -> KeyedTensor (B, F * D);
W (R, D), s ().
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recbench.methods.base import CompressionMethod, ParamGroup
from recbench.methods.blocks import bit_packing
from recbench.methods.blocks.budget import kept_bytes, land, split_tables, target_bytes
from recbench.methods.blocks.per_id import PerIdEmbedding, tensor_bytes
from recbench.methods.ptq import QuantizedTables, table_bytes
from recbench.types import (FP32_BYTES, Budget, EmbeddingOptimizer, InfeasibleBudget, MemoryReport, Plan, TableSpec,
                            full_embedding_bytes)

ALLOWED_LEVELS = (8, 4, 2)  # FBGEMM's n-bit row types (LERS: 8 and 16; FBGEMM has no INT16 rows)
INITIALIZERS = ("xavier", "normal", "dlrm")
#: fbgemm: FBGEMM's n-bit TBE (ptq's deployable table: fp16 scale and bias with every row);
#: packed: one bit-packed stream of the codes and one fp32 scale for the table (LERS's per-tensor scale)
STORAGES = ("fbgemm", "packed")
MIN_SCALE = 1e-12  # |s| below this is replaced (a division guard; LERS has none)


def q_bounds(bits: int):
    """(Q_min, Q_max) of a signed b-bit integer (LERS's ``get_qmax_qmin``)."""
    return float(-(1 << (int(bits) - 1))), float((1 << (int(bits) - 1)) - 1)


class StochasticFakeQuant(torch.autograd.Function):
    """LERS's ``StotasticRounding``: forward s * SR(clip(w / s)), straight-through backward.

    forward(scale (), w (N, D), q_min, q_max, uniform (N, D) in [0, 1)) -> (N, D).
    backward: dL/dw = dL/de (every entry); dL/ds = sum(dL/de * m), m = Q_max (v >= Q_max),
    Q_min (v <= Q_min), q - v otherwise (v = w / s).
    """

    @staticmethod
    def forward(ctx, scale, w, q_min, q_max, uniform):
        v = w / scale
        clipped = v.clamp(q_min, q_max)
        floor = torch.floor(clipped)
        q = floor + (uniform > floor + 1 - clipped).to(w.dtype)
        ctx.save_for_backward(q, v)
        ctx.bounds = (q_min, q_max)
        return q * scale

    @staticmethod
    def backward(ctx, grad):
        q, v = ctx.saved_tensors
        q_min, q_max = ctx.bounds
        grad_scale = None
        if ctx.needs_input_grad[0]:
            m = torch.where(v >= q_max, torch.full_like(v, q_max), torch.where(v <= q_min, torch.full_like(v, q_min), q - v))
            grad_scale = (grad * m).sum()
        return grad_scale, grad, None, None, None


def pack_codes(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, D) int64 codes in [0, 2^b) -> (R, D b / 8) uint8 in FBGEMM's row layout (value j of a
    byte in bits [b j, b (j + 1)), the ``bit_packing`` stream order)."""
    rows, dim = unsigned.shape
    return bit_packing.pack_bits(unsigned.reshape(-1), bits).view(rows, bit_packing.row_bytes(dim, bits))


class QATEmbedding(PerIdEmbedding):
    """fp32 master rows fake-quantised per id with one learned scale. forward: KJT -> (B, F * D).

    Args:
        tables, dim: as ``PerIdEmbedding``.
        bits: field name -> b (8, 4, 2 for compressed fields, 32 for kept ones).
        initializer: "xavier" (LERS's default, over the stacked compressed rows), "normal"
            (LERS's N(0, 0.1)) or "dlrm" (U(-1/sqrt(n), 1/sqrt(n)) per field, recbench's tables).
        fixed_scale: keep s at its initial value (LERS's ``fixed_scale``).
        storage: the deployable form, one of ``STORAGES``.
    """

    breakdown_name = "quantized_rows"

    def __init__(self, tables: Sequence[TableSpec], dim: int, bits: Mapping[str, int], initializer: str = "xavier",
                 fixed_scale: bool = False, storage: str = "fbgemm"):
        kept = [t.name for t in tables if int(bits[t.name]) == 32]
        super().__init__(tables, dim, kept)
        self.bits = {t.name: int(bits[t.name]) for t in self.tables}
        compressed = [t for t in self.tables if t.name not in set(kept)]
        compressed_names = {t.name for t in compressed}
        levels = {self.bits[t.name] for t in compressed}
        if len(levels) != 1:
            raise ValueError(f"qat: every compressed field has one bit width (LERS's n_bits), got {sorted(levels)}")
        self.level, self.storage = levels.pop(), storage
        self.q_min, self.q_max = q_bounds(self.level)
        rows = torch.tensor([t.num_embeddings if t.name in compressed_names else 0 for t in self.tables], dtype=torch.int64)
        self.register_buffer("row_offset", torch.cumsum(rows, 0) - rows, persistent=False)
        self.num_rows = int(rows.sum())
        self.weight = nn.Parameter(torch.empty(self.num_rows, dim))
        with torch.no_grad():
            if initializer == "xavier":
                nn.init.xavier_uniform_(self.weight)
            elif initializer == "normal":
                nn.init.normal_(self.weight, std=0.1)
            else:
                for t in compressed:
                    start, bound = int(self.row_offset[self.field_index[t.name]]), 1.0 / t.num_embeddings ** 0.5
                    self.weight[start:start + t.num_embeddings].uniform_(-bound, bound)
            initial = (self.weight.max() - self.weight.min()) / (self.q_max - self.q_min)
        self.scale = nn.Parameter(initial.clone(), requires_grad=not fixed_scale)

    # ----- lookup -----
    def safe_scale(self) -> torch.Tensor:
        return torch.where(self.scale.abs() < MIN_SCALE, torch.full_like(self.scale, MIN_SCALE), self.scale)

    def deploy_scale(self) -> torch.Tensor:
        """The scale as the deployable form stores it (fbgemm: fp16; packed: fp32), as fp32 ()."""
        scale = self.safe_scale().detach()
        return scale.to(torch.float16).to(torch.float32) if self.storage == "fbgemm" else scale.clone()

    def codes(self, weights: torch.Tensor) -> torch.Tensor:
        """(N, D) fp32 -> (N, D) signed codes: round-to-nearest of w / s (s as stored), clipped."""
        return torch.round(weights / self.deploy_scale()).clamp(self.q_min, self.q_max)

    def encode(self, fields: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        rows = self.row_offset[fields] + ids
        values = F.embedding(rows, self.weight, sparse=True)
        if self.training and torch.is_grad_enabled():
            return StochasticFakeQuant.apply(self.safe_scale(), values, self.q_min, self.q_max, torch.rand_like(values))
        return self.codes(values.detach()) * self.deploy_scale()

    # ----- optimisation -----
    def sparse_parameters(self) -> List[nn.Parameter]:
        return [self.weight] + super().sparse_parameters()

    def param_groups(self) -> List[ParamGroup]:
        groups = [ParamGroup("embedding", self.sparse_parameters(), kind="sparse")]
        return groups + ([ParamGroup("scale", [self.scale])] if self.scale.requires_grad else [])

    # ----- memory and deployment -----
    def memory_report(self) -> MemoryReport:
        if self.storage == "fbgemm":
            inference = QuantizedTables(self.tables, self.dim, self.bits).weight_bytes()  # storage only
        else:
            inference = tensor_bytes(self.to_inference().state_dict().values())
        trainable = [p for p in self.parameters() if p.requires_grad]
        sparse = tensor_bytes(self.sparse_parameters())
        dense = tensor_bytes(p for p in trainable if all(p is not s for s in self.sparse_parameters()))
        kept = tensor_bytes([self.kept_table]) if self.kept_table is not None else 0
        kept_stored = sum(table_bytes(t.num_embeddings, self.dim, 32) for t in self.tables
                          if t.name in self.kept_names) if self.storage == "fbgemm" else kept
        return MemoryReport(
            inference_bytes=inference,
            training_bytes=tensor_bytes(self.state_dict().values()) + sparse + 2 * dense,
            parameters=sum(p.numel() for p in trainable),
            full_bytes=full_embedding_bytes(self.tables, self.dim),
            breakdown={"quantized_rows": inference - kept_stored, "kept": kept},
        )

    @torch.no_grad()
    def to_inference(self) -> nn.Module:
        """fbgemm: FBGEMM's n-bit TBE holding the QAT codes (kept fields as fp32 tables of the same
        TBE); packed: ``PackedCodes``."""
        if self.storage == "packed":
            return PackedCodes(self).eval()
        deployable = QuantizedTables(self.tables, self.dim, self.bits)
        scale = self.deploy_scale()
        offset = 1 << (self.level - 1)
        for t, dest in zip(self.tables, deployable.tbe.split_embedding_weights()):
            i = self.field_index[t.name]
            if t.name in self.kept_names:
                start = int(self.kept_offset[i])
                dest[0].copy_(self.kept_table[start:start + t.num_embeddings].contiguous().view(torch.uint8))
                continue
            start = int(self.row_offset[i])
            q = self.codes(self.weight[start:start + t.num_embeddings]).to(torch.int64)
            dest[0].copy_(pack_codes(q + offset, self.level))
            scale_bias = torch.stack([scale, -scale * offset]).to(torch.float16)
            dest[1].copy_(scale_bias.view(torch.uint8).expand(t.num_embeddings, 4))
        return deployable.eval()


class PackedCodes(PerIdEmbedding):
    """Deployable form of ``storage: packed``: the compressed rows' codes q + 2^(b-1) in one bit-packed
    stream (R D b / 8 bytes), one fp32 scale, kept fields fp32. encode: (N,) -> (N, D) = s q."""

    breakdown_name = "quantized_rows"

    @torch.no_grad()
    def __init__(self, source: QATEmbedding):
        super().__init__(source.tables, source.dim, source.kept_names)
        if self.kept_table is not None:
            self.kept_table.copy_(source.kept_table)
        self.level, self.offset = source.level, 1 << (source.level - 1)
        self.register_buffer("row_offset", source.row_offset.clone(), persistent=False)
        codes = source.codes(source.weight.detach()).to(torch.int64) + self.offset
        self.register_buffer("codes", bit_packing.pack_bits(codes.reshape(-1), self.level))
        self.register_buffer("scale", source.deploy_scale())

    def encode(self, fields: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        q = bit_packing.read_rows(self.codes, self.level, self.dim, self.row_offset[fields] + ids) - self.offset
        return q.to(torch.float32) * self.scale


@dataclass
class QATSettings:
    """Hyperparameters of ``qat`` (defaults: LERS's ``QAT_EmbInt`` and ``configs/deepfm/qat_config.yaml``)."""

    bits: Any = "auto"  #: auto (the largest of `levels` within the budget) | 8 | 4 | 2
    levels: List[int] = field(default_factory=lambda: [8, 4, 2])  #: bit widths `auto` may use
    initializer: str = "xavier"  #: xavier (LERS) | normal (LERS's N(0, 0.1)) | dlrm (recbench's per-field init)
    fixed_scale: bool = False  #: keep the scale at its min-max initial value (LERS's fixed_scale; config: False)
    #: fbgemm (ptq's n-bit TBE: fp16 scale + bias per row) | packed (bit-packed codes + one fp32 scale, as LERS holds it)
    storage: str = "fbgemm"


class QAT(CompressionMethod):
    """Quantisation-aware training (LERS's QAT embedding); hyperparameters: ``QATSettings``."""

    name = "qat"
    settings_class = QATSettings
    table_backed = False

    def check_settings(self) -> None:
        levels = list(self.levels)
        if not levels or any(int(b) not in ALLOWED_LEVELS for b in levels):
            raise ValueError(f"method 'qat': levels {levels} must be a non-empty subset of {list(ALLOWED_LEVELS)}")
        if self.bits != "auto" and (isinstance(self.bits, bool) or self.bits not in ALLOWED_LEVELS):
            raise ValueError(f"method 'qat': bits must be one of auto, 8, 4, 2, got {self.bits!r}")
        if self.initializer not in INITIALIZERS:
            raise ValueError(f"method 'qat': initializer={self.initializer!r}; allowed: {', '.join(INITIALIZERS)}")
        if self.storage not in STORAGES:
            raise ValueError(f"method 'qat': storage={self.storage!r}; allowed: {', '.join(STORAGES)}")
        if not isinstance(self.fixed_scale, bool):
            raise ValueError(f"method 'qat': fixed_scale must be true or false, got {self.fixed_scale!r}")
        self.levels = sorted({int(b) for b in levels}, reverse=True)

    def _total(self, tables: Sequence[TableSpec], dim: int, bits: Mapping[str, int]) -> int:
        if self.storage == "fbgemm":
            return sum(table_bytes(t.num_embeddings, dim, bits[t.name]) for t in tables)
        kept = [t for t in tables if int(bits[t.name]) == 32]
        compressed = [t for t in tables if int(bits[t.name]) != 32]
        if not compressed:
            return kept_bytes(kept, dim)
        level = int(bits[compressed[0].name])
        rows = sum(t.num_embeddings for t in compressed)
        return bit_packing.packed_bytes(rows * dim, level) + FP32_BYTES + kept_bytes(kept, dim)

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        if self.storage == "fbgemm" and dim % 8:
            raise ValueError(f"qat: D={dim} must be a multiple of 8 (FBGEMM's n-bit rows; INT2 packs 4 values per byte)")
        for b in self.levels:
            bit_packing.row_bytes(dim, b)  # packed rows must be byte-aligned
        compressed, _ = split_tables(tables, budget)
        if not compressed:
            raise InfeasibleBudget(self.name, budget.compression_ratio, 1.0, 1.0, "every field is below min_rows_to_compress")
        names = {t.name for t in compressed}

        def uniform(level: int) -> Dict[str, int]:
            return {t.name: (level if t.name in names else 32) for t in tables}

        levels = self.levels if self.bits == "auto" else [int(self.bits)]
        lowest, highest = self._total(tables, dim, uniform(min(levels))), self._total(tables, dim, uniform(max(levels)))
        limit = target_bytes(tables, dim, budget)
        fitting = [b for b in levels if self._total(tables, dim, uniform(b)) <= limit]
        if not fitting:
            land(self.name, lowest, tables, dim, budget, lowest, highest)
        bits = uniform(fitting[0])
        land(self.name, self._total(tables, dim, bits), tables, dim, budget, lowest, highest)
        return {"bits": bits}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        bits = hparams["bits"]
        inference = self._total(tables, dim, bits)
        rows = sum(t.num_embeddings for t in tables)  # compressed (master copy) and kept, fp32
        kept = sum(t.num_embeddings for t in tables if int(bits[t.name]) == 32) * dim * FP32_BYTES
        kept_stored = self._total([t for t in tables if int(bits[t.name]) == 32], dim, bits) if self.storage == "fbgemm" \
            else kept
        scale = 0 if self.fixed_scale else 1
        # state: fp32 rows + scale; sparse rows trained by Adagrad (one fp32 per value), the scale by Adam (two)
        training = rows * dim * FP32_BYTES + FP32_BYTES + rows * dim * FP32_BYTES + 2 * scale * FP32_BYTES
        return MemoryReport(
            inference_bytes=inference, training_bytes=training, parameters=rows * dim + scale,
            full_bytes=full_embedding_bytes(tables, dim),
            breakdown={"quantized_rows": inference - kept_stored, "kept": kept},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> QATEmbedding:
        return QATEmbedding(tables, dim, plan.hparams["bits"], self.initializer, self.fixed_scale, self.storage)
