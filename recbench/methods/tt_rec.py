"""``tt_rec``: TT-Rec — tensor-train embedding tables.

References: Yin, Acun, Wu, Liu, "TT-Rec: Tensor Train Compression for Deep Learning
Recommendation Model Embeddings", MLSys 2021 (arXiv:2101.11714).

Mechanism: a field with n rows is a virtual (n1 n2 n3) x (d1 d2 d3) matrix, n <= n1 n2 n3,
D = d1 d2 d3, stored as three tensor-train cores G1 (n1, d1, r), G2 (n2, r, d2, r), G3 (n3, r, d3)
of rank r. Id i has digits (i1, i2, i3) = (i // (n2 n3), (i // n3) % n2, i % n3) and row
W[i] = G1[i1] x G2[i2] x G3[i3] contracted over the ranks, reshaped to D. fbgemm_gpu 1.8.0's CPU
build has no TT ops (``fbgemm_gpu.tt_embeddings`` and the ``torch.ops.fbgemm`` TT functions are
CUDA-only), so the lookup gathers the core slices of every id of the batch and contracts them with
two batched einsums: (N, d1, r) x (N, r, d2, r) -> (N, d1, d2, r), x (N, r, d3) -> (N, D); the per-id
rows are then segment-summed into the bags (divided for mean pooling). Cores are small dense
parameters (Adam). Init (the paper's sampled Gaussian cores): every core N(0, s^2) with
s = (1 / (3 n r^2))^(1/6), so a reconstructed entry has the variance 1/(3n) of the plain table's
uniform(+-1/sqrt(n)) init.

Budget: the rank r (shared by all TT fields) is the largest whose bytes fit the target
(``budget.largest_integer_within``); a field whose cores would not be smaller than its plain
table, or with fewer than ``budget.min_rows_to_compress`` rows, stays a plain FBGEMM table.

Shapes: KJT with F keys, B bags per key -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods import budget as budget_lib
from recbench.methods.base import CompressionMethod, EmbeddingModule, ParamGroup
from recbench.methods.tables import FusedTables, PhysicalTable
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, TableSpec, full_embedding_bytes

MAX_RANK = 1024


def row_factors(num_embeddings: int) -> Tuple[int, int, int]:
    """n1, n2, n3 with n1 n2 n3 >= n, balanced (n1 = ceil(n^(1/3)))."""
    n1 = max(1, math.ceil(round(num_embeddings ** (1.0 / 3.0), 9)))
    n2 = max(1, math.ceil(math.sqrt(num_embeddings / n1)))
    n3 = max(1, math.ceil(num_embeddings / (n1 * n2)))
    return n1, n2, n3


def dim_factors(dim: int) -> Tuple[int, int, int]:
    """d1 <= d2 <= d3 with d1 d2 d3 = D, the most balanced factorisation."""
    best = None
    for d1 in range(1, dim + 1):
        if dim % d1:
            continue
        for d2 in range(d1, dim // d1 + 1):
            if (dim // d1) % d2 or dim // d1 // d2 < d2:
                continue
            d3 = dim // d1 // d2
            if best is None or d3 - d1 < best[2] - best[0]:
                best = (d1, d2, d3)
    return best


def core_parameters(num_embeddings: int, dim: int, rank: int) -> int:
    (n1, n2, n3), (d1, d2, d3) = row_factors(num_embeddings), dim_factors(dim)
    return n1 * d1 * rank + n2 * rank * d2 * rank + n3 * rank * d3


def tt_fields(tables: Sequence[TableSpec], dim: int, budget: Budget, rank: int) -> List[str]:
    compressed, _ = budget_lib.split_tables(tables, budget)
    return [t.name for t in compressed if core_parameters(t.num_embeddings, dim, rank) < t.num_embeddings * dim]


class TTCores(nn.Module):
    """Three TT cores of one field. forward(ids: (N,)) -> rows (N, D)."""

    def __init__(self, num_embeddings: int, dim: int, rank: int):
        super().__init__()
        (self.n1, self.n2, self.n3), (d1, d2, d3) = row_factors(num_embeddings), dim_factors(dim)
        self.dim, self.rank = dim, rank
        std = (1.0 / (3.0 * num_embeddings * rank * rank)) ** (1.0 / 6.0)
        self.core1 = nn.Parameter(torch.randn(self.n1, d1, rank) * std)
        self.core2 = nn.Parameter(torch.randn(self.n2, rank, d2, rank) * std)
        self.core3 = nn.Parameter(torch.randn(self.n3, rank, d3) * std)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        i1, rest = ids // (self.n2 * self.n3), ids % (self.n2 * self.n3)
        i2, i3 = rest // self.n3, rest % self.n3
        left = torch.einsum("nar,nrbs->nabs", self.core1[i1], self.core2[i2])
        return torch.einsum("nabs,nsc->nabc", left, self.core3[i3]).reshape(len(ids), self.dim)

    def full_table(self) -> torch.Tensor:
        """The whole virtual (n1 n2 n3, D) table (tests and small fields only)."""
        return torch.einsum("iar,jrbs,ksc->ijkabc", self.core1, self.core2, self.core3).reshape(-1, self.dim)


class _TTForward(nn.Module):
    def __init__(self, tables: Sequence[TableSpec], dim: int, cores: nn.ModuleDict, plain: Optional[nn.Module]):
        super().__init__()
        self.tables, self.dim, self.cores, self.plain = list(tables), dim, cores, plain

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        jagged = features.to_dict()
        batch = features.stride()
        plain_out = {}
        if self.plain is not None:
            order = self.plain.feature_order
            kjt = KeyedJaggedTensor(keys=list(order), values=torch.cat([jagged[k].values() for k in order]),
                                    lengths=torch.cat([jagged[k].lengths() for k in order]))
            plain_out = self.plain(kjt).to_dict()
        blocks = []
        for t in self.tables:
            if t.name not in self.cores:
                blocks.append(plain_out[t.name])
                continue
            values, lengths = jagged[t.name].values(), jagged[t.name].lengths().to(torch.long)
            rows = self.cores[t.name](values)
            bag = torch.repeat_interleave(torch.arange(batch), lengths)
            pooled = torch.zeros(batch, self.dim, dtype=rows.dtype).index_add_(0, bag, rows)
            if t.pooling == "mean":
                pooled = pooled / lengths.clamp(min=1).to(rows.dtype).unsqueeze(1)
            blocks.append(pooled)
        return KeyedTensor(keys=[t.name for t in self.tables], length_per_key=[self.dim] * len(self.tables),
                           values=torch.cat(blocks, dim=1))


class TTRecEmbedding(EmbeddingModule):
    """TT cores for large fields, plain fused tables for the rest. forward: KJT -> (B, F * D)."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
                 optimizer: EmbeddingOptimizer):
        super().__init__(tables, dim)
        self.hparams = dict(hparams)
        rank, tt = int(hparams["rank"]), set(hparams["tt_fields"])
        self.cores = nn.ModuleDict({t.name: TTCores(t.num_embeddings, dim, rank) for t in tables if t.name in tt})
        plain = [PhysicalTable(t.name, t.num_embeddings, dim, [t.name], t.pooling) for t in tables if t.name not in tt]
        self.plain = FusedTables(plain, optimizer) if plain else None
        self.core = _TTForward(tables, dim, self.cores, self.plain)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.core(features)

    def fused_optimizer(self):
        return self.plain.fused_optimizer() if self.plain is not None else None

    def fused_parameters(self):
        return self.plain.fused_parameters() if self.plain is not None else []

    def param_groups(self) -> List[ParamGroup]:
        params = list(self.cores.parameters())
        return [ParamGroup("tt_cores", params)] if params else []

    def memory_report(self) -> MemoryReport:
        cores = sum(p.numel() * p.element_size() for p in self.cores.parameters())
        plain = self.plain.weight_bytes() if self.plain is not None else 0
        state = self.plain.optimizer_state_bytes() if self.plain is not None else 0
        return MemoryReport(
            inference_bytes=cores + plain, training_bytes=cores + plain + state + 2 * cores,  # Adam: 2 moments
            parameters=sum(p.numel() for p in self.cores.parameters()) + sum(p.numel() for p in self.fused_parameters()),
            full_bytes=full_embedding_bytes(self.tables, self.dim), breakdown={"tt_cores": cores, "weights": plain},
        )

    def to_inference(self) -> nn.Module:
        plain = self.plain.unfused_copy() if self.plain is not None else None
        return _TTForward(self.tables, self.dim, copy.deepcopy(self.cores), plain).eval()


class TTRec(CompressionMethod):
    """Hyperparameters: ``rank`` (auto or a positive integer, shared by every TT field)."""

    name = "tt_rec"
    table_backed = False

    def __init__(self, name: Optional[str] = None, rank: Any = "auto"):
        super().__init__(name, rank=rank)
        if rank != "auto" and not (isinstance(rank, int) and rank >= 1):
            raise ValueError(f"tt_rec: rank must be 'auto' or a positive integer, got {rank!r}")
        self.rank = rank

    def _hparams(self, tables, dim, budget, rank: int) -> Dict[str, Any]:
        return {"rank": int(rank), "tt_fields": tt_fields(tables, dim, budget, rank)}

    def solve(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        target = budget_lib.target_bytes(tables, dim, budget)

        def total(rank: int) -> int:
            return self.memory(tables, dim, self._hparams(tables, dim, budget, rank)).inference_bytes

        lowest, highest = total(1), full_embedding_bytes(tables, dim)
        if self.rank != "auto":
            hp = self._hparams(tables, dim, budget, int(self.rank))
            if total(int(self.rank)) > target:
                budget_lib.land(self.name, total(int(self.rank)), tables, dim, budget, lowest, highest,
                                f"rank={self.rank} exceeds the budget")
            return hp
        rank = max(budget_lib.largest_integer_within(total, 1, MAX_RANK, target), 1)
        budget_lib.land(self.name, total(rank), tables, dim, budget, lowest, highest)
        return self._hparams(tables, dim, budget, rank)

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        tt = set(hparams["tt_fields"])
        core_params = sum(core_parameters(t.num_embeddings, dim, hparams["rank"]) for t in tables if t.name in tt)
        plain_rows = sum(t.num_embeddings for t in tables if t.name not in tt)
        cores, plain = core_params * FP32_BYTES, plain_rows * dim * FP32_BYTES
        state = plain_rows * optimizer.state_bytes_per_row(dim)
        return MemoryReport(
            inference_bytes=int(cores + plain), training_bytes=int(cores + plain + state + 2 * cores),
            parameters=int(core_params + plain_rows * dim), full_bytes=full_embedding_bytes(tables, dim),
            breakdown={"tt_cores": int(cores), "weights": int(plain)},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, budget: Budget,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> TTRecEmbedding:
        return TTRecEmbedding(tables, dim, self.solve(tables, dim, budget), optimizer)
