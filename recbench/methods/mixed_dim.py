"""``mixed_dim``: mixed-dimension embeddings (power-law dims by popularity, projected to D).

References: Ginart, Naumov, Mudigere, Yang, Zou, "Mixed Dimension Embeddings with Application to
Memory-Efficient Recommendation Systems", ISIT 2021 (arXiv:1909.11810).

Mechanism: the ids of each field are split into ``blocks_per_field`` blocks of equal row count by
descending training frequency (``TableSpec.counts``); block i has popularity p_i, the mean
training count per row of the block (``popularity: counts``) or 1/n of its field (``popularity:
rows``, the DLRM reference's proxy). Its width follows the paper's power-law rule
d_i = lambda * p_i^alpha with lambda = D / max_j p_j^alpha (the most popular block keeps D),
rounded to a multiple of 4 (FBGEMM) within [min_dim, D]. Each block is its own FBGEMM table of
width d_i, pooled in FBGEMM (SUM) and projected to D by a bias-free dense projection
(``recbench.methods.projection``); pooling commutes with the linear projection, so a bag is the
sum of its ids' projected vectors. A block where the projection costs more bytes than the width
saves keeps width D (no projection).

Budget: the temperature alpha (alpha = 0: every block D wide) is bisected
(``budget.bisect_continuous``) so that table + projection + remap bytes land in
[1 - tolerance, 1] x target; the reachable minimum is every block at ``min_dim`` (except the most
popular, which keeps D).

Shapes: KJT with F keys, B bags per key -> KeyedTensor (B, F * D); block i: (B, d_i) -> (B, D).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods import budget as budget_lib
from recbench.methods.base import CompressionMethod, EmbeddingModule, ParamGroup
from recbench.methods.projection import Projections, projection_bytes, projection_parameters
from recbench.methods.tables import FusedTables, PhysicalTable
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, TableSpec, full_embedding_bytes

REMAP_BYTES = 4  # int32 frequency rank per id, held only by fields split into several blocks
ALPHA_MAX = 64.0


# ----------------------------------------------------------------------------- pure helpers
def block_rows(num_embeddings: int, blocks: int) -> List[int]:
    """Rows per block: equal blocks of ceil(n / blocks) rows, the last one smaller."""
    size = -(-num_embeddings // blocks)
    return [min(size, num_embeddings - j * size) for j in range(-(-num_embeddings // size))]


def frequency_order(table: TableSpec) -> np.ndarray:
    """Ids by descending training count (ties by id)."""
    return np.lexsort((np.arange(table.num_embeddings), -np.asarray(table.counts)))


def block_popularity(table: TableSpec, blocks: int, popularity: str) -> List[float]:
    rows = block_rows(table.num_embeddings, blocks)
    if popularity == "rows":
        return [1.0 / table.num_embeddings] * len(rows)
    if table.counts is None:
        raise ValueError(f"mixed_dim: popularity=counts needs training counts of field {table.name!r} "
                         "(TableSpec.counts); use popularity=rows for the 1/n proxy")
    sorted_counts = np.asarray(table.counts, dtype=np.float64)[frequency_order(table)]
    bounds = np.cumsum([0] + rows)
    return [float(sorted_counts[a:b].mean()) for a, b in zip(bounds[:-1], bounds[1:])]


def raw_dims(popularity: Sequence[float], alpha: float, dim: int) -> np.ndarray:
    """The power law before rounding: d_i = lambda p_i^alpha, lambda = D / max(p)^alpha."""
    p = np.asarray(popularity, dtype=np.float64)
    return dim * (p / p.max()) ** alpha


def round_dims(raw: np.ndarray, dim: int, min_dim: int) -> np.ndarray:
    return np.clip(np.round(raw / 4.0) * 4, min_dim, dim).astype(np.int64)


def _bytes_of_block(rows: int, d: int, dim: int) -> int:
    return (rows * d + (d * dim if d != dim else 0)) * FP32_BYTES


# ----------------------------------------------------------------------------- module
class _MDForward(nn.Module):
    """Block lookups (fused while training, plain when deployed) + projections + mean division."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any], lookup: nn.Module,
                 projections: Projections, ranks: Mapping[str, torch.Tensor]):
        super().__init__()
        self.tables, self.dim = list(tables), int(dim)
        self.block_rows: Dict[str, List[int]] = {k: list(v) for k, v in hparams["block_rows"].items()}
        self.lookup, self.projections = lookup, projections
        self.rank_names = {}
        for name, rank in ranks.items():
            buffer = "rank_" + name.replace(".", "_")
            self.register_buffer(buffer, rank)
            self.rank_names[name] = buffer

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        jagged = features.to_dict()
        batch = features.stride()
        inputs: Dict[str, tuple] = {}
        for t in self.tables:
            values, lengths = jagged[t.name].values(), jagged[t.name].lengths()
            rows = self.block_rows[t.name]
            if len(rows) == 1:
                inputs[f"{t.name}/b0"] = (values, lengths)
                continue
            rank = getattr(self, self.rank_names[t.name])[values].to(torch.long)
            block = rank // rows[0]
            local = rank - block * rows[0]
            bag = torch.repeat_interleave(torch.arange(batch), lengths.to(torch.long))
            for j in range(len(rows)):
                mask = block == j
                inputs[f"{t.name}/b{j}"] = (local[mask], torch.bincount(bag[mask], minlength=batch))
        order = self.lookup.feature_order
        kjt = KeyedJaggedTensor(keys=list(order), values=torch.cat([inputs[k][0] for k in order]),
                                lengths=torch.cat([inputs[k][1].to(torch.int32) for k in order]))
        pooled = self.lookup(kjt).to_dict()
        out = []
        for t in self.tables:
            keys = [f"{t.name}/b{j}" for j in range(len(self.block_rows[t.name]))]
            field = self.projections(keys[0], pooled[keys[0]])
            for k in keys[1:]:
                field = field + self.projections(k, pooled[k])
            if t.pooling == "mean":
                field = field / jagged[t.name].lengths().clamp(min=1).to(field.dtype).unsqueeze(1)
            out.append(field)
        return KeyedTensor(keys=[t.name for t in self.tables], length_per_key=[self.dim] * len(self.tables),
                           values=torch.cat(out, dim=1))


def physical_tables(tables: Sequence[TableSpec], hparams: Mapping[str, Any]) -> List[PhysicalTable]:
    return [PhysicalTable(f"{t.name}/b{j}", rows, int(d), [f"{t.name}/b{j}"], "sum")
            for t in tables
            for j, (rows, d) in enumerate(zip(hparams["block_rows"][t.name], hparams["dims"][t.name]))]


def block_dims(tables: Sequence[TableSpec], hparams: Mapping[str, Any]) -> Dict[str, int]:
    return {f"{t.name}/b{j}": int(d) for t in tables for j, d in enumerate(hparams["dims"][t.name])}


class MixedDimEmbedding(EmbeddingModule):
    """Per-block widths d_i <= D, projected to D. forward: KJT (F keys, B bags) -> (B, F * D)."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
                 optimizer: EmbeddingOptimizer):
        super().__init__(tables, dim)
        self.hparams = dict(hparams)
        self.fused = FusedTables(physical_tables(tables, hparams), optimizer)
        self.projections = Projections(block_dims(tables, hparams), dim)
        ranks = {}
        for t in tables:
            if len(hparams["block_rows"][t.name]) > 1:
                rank = np.empty(t.num_embeddings, dtype=np.int32)
                rank[frequency_order(t)] = np.arange(t.num_embeddings, dtype=np.int32)
                ranks[t.name] = torch.from_numpy(rank)
        self.core = _MDForward(tables, dim, hparams, self.fused, self.projections, ranks)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.core(features)

    def fused_optimizer(self):
        return self.fused.fused_optimizer()

    def fused_parameters(self):
        return self.fused.fused_parameters()

    def param_groups(self) -> List[ParamGroup]:
        params = list(self.projections.parameters())
        return [ParamGroup("projections", params)] if params else []

    def memory_report(self) -> MemoryReport:
        weights = self.fused.weight_bytes()
        projections = self.projections.weight_bytes()
        remap = sum(b.numel() * b.element_size() for b in self.core.buffers())
        inference = weights + projections + remap
        return MemoryReport(
            inference_bytes=inference,
            training_bytes=inference + self.fused.optimizer_state_bytes() + 2 * projections,  # Adam: 2 moments
            parameters=sum(p.numel() for p in self.fused.fused_parameters()) + self.projections.parameter_count(),
            full_bytes=full_embedding_bytes(self.tables, self.dim),
            breakdown={"weights": weights, "projections": projections, "remap": remap},
        )

    def to_inference(self) -> nn.Module:
        """Plain EmbeddingBagCollection with the same block weights, projections and remap."""
        import copy

        ranks = {t: getattr(self.core, b).clone() for t, b in self.core.rank_names.items()}
        return _MDForward(self.tables, self.dim, self.hparams, self.fused.unfused_copy(),
                          copy.deepcopy(self.projections), ranks).eval()


# ----------------------------------------------------------------------------- method
class MixedDim(CompressionMethod):
    """Hyperparameters: ``alpha`` (auto or a temperature >= 0), ``blocks_per_field``,
    ``popularity`` (counts|rows), ``min_dim`` (multiple of 4)."""

    name = "mixed_dim"

    def __init__(self, name: Optional[str] = None, alpha: Any = "auto", blocks_per_field: int = 1,
                 popularity: str = "counts", min_dim: int = 4):
        super().__init__(name, alpha=alpha, blocks_per_field=blocks_per_field, popularity=popularity,
                         min_dim=min_dim)
        if alpha != "auto" and not (isinstance(alpha, (int, float)) and alpha >= 0):
            raise ValueError(f"mixed_dim: alpha must be 'auto' or a number >= 0, got {alpha!r}")
        if popularity not in ("counts", "rows"):
            raise ValueError(f"mixed_dim: popularity must be 'counts' or 'rows', got {popularity!r}")
        if int(blocks_per_field) < 1:
            raise ValueError(f"mixed_dim: blocks_per_field must be >= 1, got {blocks_per_field!r}")
        if int(min_dim) < 4 or int(min_dim) % 4:
            raise ValueError(f"mixed_dim: min_dim must be a positive multiple of 4, got {min_dim!r}")
        self.alpha, self.blocks_per_field = alpha, int(blocks_per_field)
        self.popularity, self.min_dim = popularity, int(min_dim)

    def popularities(self, tables: Sequence[TableSpec], budget: Budget) -> Dict[str, List[float]]:
        """Block popularities of the compressed fields (kept fields are absent)."""
        compressed, _ = budget_lib.split_tables(tables, budget)
        return {t.name: block_popularity(t, self.blocks_per_field, self.popularity) for t in compressed}

    def hparams_at(self, tables: Sequence[TableSpec], dim: int, popularity: Mapping[str, List[float]],
                   alpha: float) -> Dict[str, Any]:
        if dim % 4 or dim < self.min_dim:
            raise ValueError(f"mixed_dim: D={dim} must be a multiple of 4 and >= min_dim={self.min_dim}")
        names = [n for n in popularity]
        flat = np.concatenate([popularity[n] for n in names]) if names else np.zeros(0)
        dims = round_dims(raw_dims(flat, alpha, dim), dim, self.min_dim) if len(flat) else flat
        out_dims, out_rows, start = {}, {}, 0
        for t in tables:
            if t.name not in popularity:
                out_dims[t.name], out_rows[t.name] = [dim], [t.num_embeddings]
                continue
            rows = block_rows(t.num_embeddings, self.blocks_per_field)
            ds = [int(d) for d in dims[start:start + len(rows)]]
            start += len(rows)
            # a block whose projection costs more than its narrower rows save keeps width D
            ds = [d if _bytes_of_block(r, d, dim) < r * dim * FP32_BYTES else dim for r, d in zip(rows, ds)]
            if len(rows) > 1 and all(d == dim for d in ds):
                rows, ds = [t.num_embeddings], [dim]  # nothing narrowed: one table, no remap
            out_dims[t.name], out_rows[t.name] = ds, rows
        return {"alpha": float(alpha), "blocks_per_field": self.blocks_per_field, "popularity": self.popularity,
                "min_dim": self.min_dim, "dims": out_dims, "block_rows": out_rows}

    def solve(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        popularity = self.popularities(tables, budget)
        target = budget_lib.target_bytes(tables, dim, budget)

        def total(alpha: float) -> int:
            return self.memory(tables, dim, self.hparams_at(tables, dim, popularity, alpha)).inference_bytes

        if self.alpha != "auto":
            hp = self.hparams_at(tables, dim, popularity, float(self.alpha))
            achieved = self.memory(tables, dim, hp).inference_bytes
            if achieved > target:
                budget_lib.land(self.name, achieved, tables, dim, budget, total(ALPHA_MAX), total(0.0),
                                f"alpha={self.alpha} gives ratio {achieved / full_embedding_bytes(tables, dim):.4g}")
            return hp
        alpha = budget_lib.bisect_continuous(total, 0.0, ALPHA_MAX, target, increasing=False)
        hp = self.hparams_at(tables, dim, popularity, alpha)
        budget_lib.land(self.name, self.memory(tables, dim, hp).inference_bytes, tables, dim, budget,
                        total(ALPHA_MAX), total(0.0))
        return hp

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        physical = physical_tables(tables, hparams)
        weights = sum(p.rows * p.dim for p in physical) * FP32_BYTES
        state = sum(p.rows * optimizer.state_bytes_per_row(p.dim) for p in physical)
        dims = block_dims(tables, hparams)
        projections = projection_bytes(dims, dim)
        remap = sum(t.num_embeddings * REMAP_BYTES for t in tables if len(hparams["block_rows"][t.name]) > 1)
        inference = weights + projections + remap
        return MemoryReport(
            inference_bytes=int(inference), training_bytes=int(inference + state + 2 * projections),
            parameters=int(sum(p.rows * p.dim for p in physical) + projection_parameters(dims, dim)),
            full_bytes=full_embedding_bytes(tables, dim),
            breakdown={"weights": int(weights), "projections": int(projections), "remap": int(remap)},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, budget: Budget,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MixedDimEmbedding:
        return MixedDimEmbedding(tables, dim, self.solve(tables, dim, budget), optimizer)
