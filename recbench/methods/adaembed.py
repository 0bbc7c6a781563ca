"""``adaembed``: a fixed pool of embedding rows reallocated online to the most important ids.

References: Lai, Zhang, Liu, Tsai, Wei, Hu, Devkota, Huang, Park, Liu, Chen, Wen, Rivera, You,
Chen, Chowdhury, "AdaEmbed: Adaptive Embedding for Large-Scale Recommendation Models", OSDI 2023.

Mechanism: the compressed fields share one FBGEMM table of R rows (the row pool) plus one fallback
row per field. An int32 map ``row_of`` (one entry per id of every compressed field) sends an id
to its pool row, or to its field's fallback row when it owns none (-1). The fallback is the
paper's zero vector by default (``fallback: zero``: the row is held at 0) or a trained shared
row per field (``fallback: shared``). Importance (the paper's EI = access frequency x gradient
magnitude, as a decayed running sum): after every backward each id of the batch adds the L2 norm
of its row gradient d loss / d e_id (``recbench.methods.blocks.id_gradients``; available for ids without
a row too), and every ``decay_every`` steps all scores are multiplied by ``decay``. Ids of
different fields are compared by their score relative to their field's ``quantile`` (0.95, the
paper's EI / EI_95th(feature)); with ``normalize: none`` raw scores are compared. Every
``reallocate_every`` steps (a Hook) the R ids with the highest scores own the pool: an evicted id
falls back, its row is re-initialised (zero, or a copy of the fallback row; its fused optimizer
state is kept) and handed to an admitted id; ``owner`` (R,) int32 is the inverse map. Rows start owned by
the most frequent ids of the training split (``TableSpec.counts``, same normalisation).

Budget: inference bytes = (R + F_c) * D * 4 (pool + fallback rows) + 4 * sum_f n_f (the int32 map)
+ kept fields in full; R is the largest integer that fits. The map alone costs 1/D of the full
tables, so ratios below about 1/D + (F_c + 1) rows are infeasible (reported with the range).
Training bytes add the optimizer state, ``owner`` (4 R), the fp32 importance (4 per id) and an
int64 step counter.

Distributed runs: the pool table is sharded by TorchRec (whole rows per shard); the batch's id
gradients are joined over ranks in the backward (``id_gradients.attach(..., world)``), so every
rank holds the same importance, map and owners, and re-initialisations act on each rank's column
shards (``tables.column_slices``).

Shapes: KJT (F keys, B bags) -> ids rewritten to pool rows -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods.blocks import batch_part, id_gradients
from recbench.methods.base import CompressionMethod, Hook
from recbench.methods.blocks.budget import land, largest_integer_within, split_tables, target_bytes
from recbench.methods.blocks.per_id import value_fields, with_values
from recbench.methods.blocks.tables import (FusedIdMapEmbedding, FusedTables, PhysicalTable, closed_form_table_bytes,
                                     column_slices, pool_outputs)
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, Plan, TableSpec, full_embedding_bytes

FALLBACKS = ("zero", "shared")
NORMALIZATIONS = ("field_quantile", "none")
INT32_BYTES, INT64_BYTES = 4, 8
POOL = "adaembed_pool"


def normalized_scores(scores: torch.Tensor, field_of_id: torch.Tensor, num_fields: int, quantile: Optional[float]) -> torch.Tensor:
    """Scores divided by their field's ``quantile`` of positive scores (None: unchanged)."""
    if quantile is None:
        return scores
    out = scores.clone()
    for f in range(num_fields):
        mask = field_of_id == f
        positive = scores[mask]
        positive = positive[positive > 0]
        if positive.numel():
            out[mask] = scores[mask] / torch.quantile(positive.double(), quantile).clamp(min=1e-30).float()
    return out


class AdaEmbedEmbedding(FusedIdMapEmbedding):
    """The row pool + map. forward: KJT (F keys, B bags) -> KeyedTensor (B, F * D).

    Args:
        tables: one TableSpec per field (KJT key order).
        dim: D.
        pool_rows: R, rows of the shared pool.
        compressed: names of the fields served by the pool (others keep their full table).
        fallback: "zero" or "shared".
        decay / quantile: importance decay factor and field normalisation quantile (None: raw).
        optimizer: the fused embedding optimizer.
    """

    def __init__(self, tables: Sequence[TableSpec], dim: int, pool_rows: int, compressed: Sequence[str],
                 fallback: str, decay: float, quantile: Optional[float], optimizer: EmbeddingOptimizer):
        super().__init__(tables, dim)
        self.field_index = {t.name: i for i, t in enumerate(self.tables)}
        self.compressed = [t.name for t in self.tables if t.name in set(compressed)]
        self.fallback, self.decay, self.quantile = fallback, float(decay), quantile
        comp = [t for t in self.tables if t.name in set(self.compressed)]
        self.pool_rows = int(pool_rows)
        sizes = torch.tensor([t.num_embeddings if t.name in set(self.compressed) else 0 for t in self.tables])
        self.register_buffer("id_offset", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.register_buffer("is_compressed", sizes > 0, persistent=False)
        self.register_buffer("is_mean", torch.tensor([t.pooling == "mean" for t in self.tables]), persistent=False)
        slot = torch.full((len(self.tables),), -1, dtype=torch.int64)
        for c, t in enumerate(comp):
            slot[self.field_index[t.name]] = c
        self.register_buffer("fallback_row", torch.where(slot >= 0, self.pool_rows + slot, slot), persistent=False)
        self.register_buffer("field_of_id", torch.repeat_interleave(torch.arange(len(comp)),
                                                                    torch.tensor([t.num_embeddings for t in comp],
                                                                                 dtype=torch.int64)),
                             persistent=False)
        total = int(sizes.sum())
        if self.pool_rows > total:
            raise ValueError(f"adaembed: pool_rows={self.pool_rows} exceeds the {total} ids of the compressed fields")
        # persistent state (checkpointed): the map, its inverse, the importance, the step counter
        self.register_buffer("row_of", torch.full((total,), -1, dtype=torch.int32))
        self.register_buffer("owner", torch.full((self.pool_rows,), -1, dtype=torch.int32))
        self.register_buffer("importance", torch.zeros(total, dtype=torch.float32))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        physical = [PhysicalTable(POOL, self.pool_rows + len(comp), dim, self.compressed, "sum")] if comp else []
        physical += [PhysicalTable(t.name, t.num_embeddings, dim, [t.name], "sum") for t in self.tables
                     if t.name not in set(self.compressed)]
        self.fused = FusedTables(physical, optimizer)
        self.mean_names = [t.name for t in self.tables if t.pooling == "mean"]
        if comp:
            prior = torch.from_numpy(np.concatenate([np.asarray(t.counts if t.counts is not None else
                                                                np.zeros(t.num_embeddings), dtype=np.float64)
                                                     for t in comp])).float()
            self.assign(self.top_ids(prior))  # rows keep FusedTables' DLRM initialisation
            self._hold_fallback()

    # ----- the map -----
    def top_ids(self, scores: torch.Tensor) -> torch.Tensor:
        """The R ids with the highest field-normalised scores (ties: current owners first, then lower id)."""
        norm = normalized_scores(scores, self.field_of_id, int(self.field_of_id.max()) + 1 if self.field_of_id.numel() else 0,
                                 self.quantile)
        keep = (self.row_of >= 0).float()
        order = np.lexsort((np.arange(norm.numel()), -keep.numpy(), -norm.double().numpy()))
        return torch.from_numpy(order[: self.pool_rows].copy())

    def assign(self, ids: torch.Tensor) -> None:
        """Initial allocation: ``ids`` (R,) own rows 0..R-1."""
        self.row_of.fill_(-1)
        self.row_of[ids] = torch.arange(ids.numel(), dtype=torch.int32)
        self.owner.copy_(ids.to(torch.int32))

    @torch.no_grad()
    def reallocate(self) -> Dict[str, int]:
        """Give the pool to the R most important ids; returns {"admitted": k, "evicted": k}."""
        if not self.pool_rows:
            return {"admitted": 0, "evicted": 0}
        target = torch.zeros_like(self.row_of, dtype=torch.bool)
        target[self.top_ids(self.importance)] = True
        allocated = self.row_of >= 0
        admitted = (target & ~allocated).nonzero().flatten()
        evicted = (allocated & ~target).nonzero().flatten()
        assert admitted.numel() == evicted.numel(), "the pool is always full: admissions equal evictions"
        rows = self.row_of[evicted].long()
        self.row_of[evicted] = -1
        self.row_of[admitted] = rows.to(torch.int32)
        self.owner[rows] = admitted.to(torch.int32)
        self._reset_rows(rows, admitted)
        return {"admitted": int(admitted.numel()), "evicted": int(evicted.numel())}

    def _reset_rows(self, rows: torch.Tensor, ids: torch.Tensor) -> None:
        """Re-initialise pool rows handed to new ids ``ids``: zero (the vector the id had as an
        unallocated id) or a copy of its field's shared fallback row, in every column slice this
        process holds (``tables.column_slices``: the whole table, or this rank's shards). The fused
        optimizer's row state is kept (see the card: revision 1's reset never ran)."""
        if not rows.numel():
            return
        with torch.no_grad():
            for weight in self._pool_slices():
                if self.fallback == "shared":
                    weight[rows] = weight[self.pool_rows + self.field_of_id[ids]]
                else:
                    weight[rows] = 0.0

    def _pool_slices(self) -> List[torch.Tensor]:
        """The pool table's weights this process holds (training or deployable form)."""
        return column_slices(self.fused, POOL, self.pool_rows + len(self.compressed), "adaembed")

    def _hold_fallback(self) -> None:
        if self.fallback == "zero" and self.compressed:
            with torch.no_grad():
                for weight in self._pool_slices():
                    weight[self.pool_rows:] = 0.0

    # ----- importance -----
    def observe(self, keys: torch.Tensor, norms: torch.Tensor, counts: torch.Tensor) -> None:
        """EI += ||d loss / d e_id|| per id of the batch (frequency x gradient, summed)."""
        self.importance.index_add_(0, keys, norms.float())

    def decay_importance(self) -> None:
        self.importance.mul_(self.decay)

    # ----- lookup -----
    def rows_of(self, features: KeyedJaggedTensor):
        fields = value_fields(features, self.field_index)
        ids = features.values().long()
        compressed = self.is_compressed[fields]
        keys = torch.where(compressed, self.id_offset[fields] + ids, torch.zeros_like(ids))
        mapped = self.row_of[keys].long() if self.row_of.numel() else torch.zeros_like(ids)
        pooled = torch.where(mapped >= 0, mapped, self.fallback_row[fields])
        return torch.where(compressed, pooled, ids), keys, compressed

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        self._hold_fallback()
        rows, keys, compressed = self.rows_of(features)
        out = pool_outputs(self.fused(with_values(features, rows)), features, self.feature_names, self.mean_names)
        if self.training:
            # distributed: every rank gets the whole global batch's id gradients (same importance everywhere)
            id_gradients.attach(out.values(), features, self.field_index, self.is_mean, keys, compressed, self.dim,
                                self.observe, batch_part.world_size())
        return out

    # ----- memory -----
    def memory_report(self) -> MemoryReport:
        weights = self.fused.weight_bytes()
        map_bytes = self.row_of.numel() * self.row_of.element_size()
        extra = sum(b.numel() * b.element_size() for b in (self.owner, self.importance, self.steps))
        return MemoryReport(
            inference_bytes=weights + map_bytes,
            training_bytes=weights + map_bytes + self.fused.optimizer_state_bytes() + extra,
            parameters=sum(p.numel() for p in self.fused.fused_parameters()),
            full_bytes=full_embedding_bytes(self.tables, self.dim),
            breakdown={"weights": weights, "map": map_bytes},
        )

    def to_inference(self) -> nn.Module:
        """Plain EmbeddingBagCollection + the map; training-only state (owner, importance) dropped."""
        self._hold_fallback()
        unfused = self.fused.unfused_copy()
        clone = copy.deepcopy(self, memo={id(self.fused): unfused, id(self.owner): torch.empty(0, dtype=torch.int32),
                                          id(self.importance): torch.empty(0)})
        return clone.eval()


class ReallocationHook(Hook):
    """Counts steps on the module; decays importance and reallocates the pool on schedule."""

    def __init__(self, reallocate_every: int, decay_every: int):
        self.reallocate_every, self.decay_every = int(reallocate_every), int(decay_every)
        self.history: List[Dict[str, int]] = []

    def on_step_end(self, context: Any) -> Optional[bool]:
        module = context.embedding
        if not isinstance(module, AdaEmbedEmbedding):
            raise TypeError(f"adaembed's hook needs an AdaEmbedEmbedding, got {type(module).__name__}")
        module.steps += 1
        step = int(module.steps)
        if step % self.reallocate_every == 0:
            self.history.append({"step": step, **module.reallocate()})
        if step % self.decay_every == 0:
            module.decay_importance()
        return None


@dataclass
class AdaEmbedSettings:
    """Hyperparameters of ``adaembed`` (defaults: the paper, Lai et al., OSDI 2023)."""

    pool_rows: Any = "auto"  #: R, rows of the shared pool, solved from the budget (or a positive integer)
    fallback: str = "zero"  #: zero: ids without a row read a zero vector (the paper) | shared: a trained row per field
    reallocate_every: int = 100  #: steps between reallocations (the Hook)
    decay: float = 0.8  #: importance x decay ...
    decay_every: int = 100  #: ... every this many steps
    normalize: str = "field_quantile"  #: field_quantile: score / the field's quantile (paper: EI / EI_95th) | none: raw scores
    quantile: float = 0.95  #: the quantile of the field's positive scores that normalize=field_quantile divides by (in (0, 1])


class AdaEmbed(CompressionMethod):
    """AdaEmbed; hyperparameters: ``AdaEmbedSettings``."""

    name = "adaembed"
    settings_class = AdaEmbedSettings
    table_backed = True

    def check_settings(self) -> None:
        pool_rows, fallback, normalize = self.pool_rows, self.fallback, self.normalize
        reallocate_every, decay, decay_every, quantile = self.reallocate_every, self.decay, self.decay_every, self.quantile
        if pool_rows != "auto" and not (isinstance(pool_rows, int) and pool_rows >= 1):
            raise ValueError(f"adaembed: pool_rows must be 'auto' or a positive integer, got {pool_rows!r}")
        if fallback not in FALLBACKS:
            raise ValueError(f"adaembed: fallback={fallback!r}; allowed: {', '.join(FALLBACKS)}")
        if normalize not in NORMALIZATIONS:
            raise ValueError(f"adaembed: normalize={normalize!r}; allowed: {', '.join(NORMALIZATIONS)}")
        if int(reallocate_every) < 1 or int(decay_every) < 1:
            raise ValueError("adaembed: reallocate_every and decay_every must be >= 1 (steps)")
        if not 0.0 < float(decay) <= 1.0:
            raise ValueError(f"adaembed: decay must be in (0, 1], got {decay}")
        if not 0.0 < float(quantile) <= 1.0:
            raise ValueError(f"adaembed: quantile must be in (0, 1], got {quantile}")
        self.reallocate_every, self.decay, self.decay_every = int(reallocate_every), float(decay), int(decay_every)
        #: None when normalize is none (raw scores)
        self.quantile = float(quantile) if normalize == "field_quantile" else None

    # ----- budget -----
    @staticmethod
    def _bytes(tables: Sequence[TableSpec], dim: int, compressed: Sequence[str], pool_rows: int,
               optimizer: EmbeddingOptimizer) -> Dict[str, int]:
        names = set(compressed)
        comp = [t for t in tables if t.name in names]
        physical = ([PhysicalTable(POOL, pool_rows + len(comp), dim, list(names))] if comp else []) + \
                   [PhysicalTable(t.name, t.num_embeddings, dim, [t.name]) for t in tables if t.name not in names]
        parts = closed_form_table_bytes(physical, optimizer)
        ids = sum(t.num_embeddings for t in comp)
        map_bytes = INT32_BYTES * ids
        extra = INT32_BYTES * pool_rows + FP32_BYTES * ids + INT64_BYTES
        return {"weights": parts["weights"], "map": map_bytes, "state": parts["optimizer_state"], "extra": extra}

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        compressed, _ = split_tables(tables, budget)
        names = [t.name for t in compressed]
        total = sum(t.num_embeddings for t in compressed)
        limit = target_bytes(tables, dim, budget)

        def bytes_at(rows: int) -> int:
            b = self._bytes(tables, dim, names, rows, EmbeddingOptimizer())
            return b["weights"] + b["map"]

        if self.pool_rows != "auto":
            rows = min(int(self.pool_rows), total)
            if bytes_at(rows) > limit:
                land(self.name, bytes_at(rows), tables, dim, budget, bytes_at(1), bytes_at(total),
                     f"pool_rows={rows} gives ratio {bytes_at(rows) / full_embedding_bytes(tables, dim):.4g}")
        else:
            rows = max(largest_integer_within(bytes_at, 1, max(total, 1), limit), 1)
            land(self.name, bytes_at(rows), tables, dim, budget, bytes_at(1), bytes_at(max(total, 1)),
                 "the int32 id map (1/D of the full tables) plus one row per field already exceeds the budget"
                 if bytes_at(1) > limit else "")
        return {"pool_rows": int(rows), "compressed": names, "fallback": self.fallback}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        b = self._bytes(tables, dim, hparams["compressed"], int(hparams["pool_rows"]), optimizer)
        comp = [t for t in tables if t.name in set(hparams["compressed"])]
        rows = int(hparams["pool_rows"]) + len(comp) if comp else 0
        rows += sum(t.num_embeddings for t in tables if t.name not in set(hparams["compressed"]))
        return MemoryReport(
            inference_bytes=b["weights"] + b["map"],
            training_bytes=b["weights"] + b["map"] + b["state"] + b["extra"],
            parameters=rows * dim, full_bytes=full_embedding_bytes(tables, dim),
            breakdown={"weights": b["weights"], "map": b["map"]},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> AdaEmbedEmbedding:
        hparams = plan.hparams
        return AdaEmbedEmbedding(tables, dim, hparams["pool_rows"], hparams["compressed"], self.fallback, self.decay,
                                 self.quantile, optimizer)

    def hooks(self) -> List[Hook]:
        return [ReallocationHook(self.reallocate_every, self.decay_every)]
