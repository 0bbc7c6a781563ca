"""``hashing``: the hashing trick — each field's ids hashed into a smaller table of its own.

References: Weinberger et al., "Feature Hashing for Large Scale Multitask Learning", ICML 2009.

Mechanism: field f with n_f ids owns an (m_f, D) fp32 table, m_f <= n_f; id x is looked up at row
h_f(x), with h_f drawn from the universal family ((a_f x + b_f) mod p) mod m_f (salted per field,
``recbench.methods.hashing_fns``) or plain x mod m_f (``hash_function: modulo``). The KJT's ids are
rewritten and looked up in fused FBGEMM tables (fused optimizer, shardable), so a multi-hot bag
pools the hashed rows of its ids.
Budget (``allocation``): ``cap`` (default) m_f = min(n_f, M) with the largest integer M whose bytes
fit — only fields larger than M are hashed, as DLRM's ``--max-ind-range`` does on Criteo;
``proportional`` m_f = min(n_f, ceil(r * n_f)) (at least 1) with r bisected. A field whose m_f
equals n_f is looked up by its ids unchanged (no hash, no collision). Either way
sum_f m_f * D * 4 (+ kept fields in full) lands in [1 - tolerance, 1] x target.
Fields below ``budget.min_rows_to_compress`` keep their full table. Infeasible when one row per
compressed field already exceeds the budget.
Shapes: KJT (F keys, B bags) -> ids rewritten in place -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods import hashing_fns
from recbench.methods.base import CompressionMethod
from recbench.methods.budget import (bisect_continuous, check_auto, land, largest_integer_within, split_tables,
                                    target_bytes)
from recbench.methods.per_id import value_fields, with_values
from recbench.methods.tables import FusedIdMapEmbedding, FusedTables, physical_tables, table_memory
from recbench.types import Budget, EmbeddingOptimizer, MemoryReport, TableSpec


class HashingEmbedding(FusedIdMapEmbedding):
    """Per-field hashed tables. forward: KJT (F keys, B bags) -> KeyedTensor (B, F * D).

    Args:
        rows: hashed table rows per compressed field (absent fields are kept in full).
        hash_function: "universal" or "modulo".
        hash_seed: seed of the per-field (a, b) of the universal family.
    """

    def __init__(self, tables: Sequence[TableSpec], dim: int, rows: Mapping[str, int], hash_function: str,
                 hash_seed: int, optimizer: EmbeddingOptimizer):
        super().__init__(tables, dim)
        self.hash_function = hashing_fns.check_kind("hashing", hash_function)
        self.field_index = {t.name: i for i, t in enumerate(self.tables)}
        hashing_fns.check_hashable("hashing", [(t.name, t.num_embeddings) for t in self.tables],
                                   max(rows.values(), default=1))
        a, b = hashing_fns.draw(hash_seed, (len(self.tables),))
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)
        self.register_buffer("buckets", torch.tensor([int(rows.get(t.name, t.num_embeddings)) for t in self.tables]),
                             persistent=False)
        # only tables the allocation shrank are hashed; a table left at one row per id keeps its ids
        self.register_buffer("hashed", torch.tensor([int(rows.get(t.name, t.num_embeddings)) < t.num_embeddings
                                                     for t in self.tables]), persistent=False)
        self.fused = FusedTables(physical_tables(self.tables, dim, rows), optimizer)

    def rows_of(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """(N,) the table row of every value: h_f(id) for compressed fields, the id for kept ones."""
        fields = value_fields(features, self.field_index)
        ids = features.values().long()
        hashed = hashing_fns.hash_ids(self.hash_function, ids, self.a[fields], self.b[fields], self.buckets[fields])
        return torch.where(self.hashed[fields], hashed, ids)

    def rewrite(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return with_values(features, self.rows_of(features))


class Hashing(CompressionMethod):
    name = "hashing"
    #: 2: fields the allocation leaves at m_f = n_f are no longer hashed into n_f buckets (where
    #: ~63% of their ids shared a row); see methods/hashing.md, "Revisions".
    revision = 2

    ALLOCATIONS = ("cap", "proportional")

    def __init__(self, name: str | None = None, rows: Any = "auto", hash_function: str = "universal",
                 hash_seed: int = 0, allocation: str = "cap"):
        super().__init__(name, rows=rows, hash_function=hash_function, hash_seed=hash_seed, allocation=allocation)
        check_auto(self.name, "rows", rows)
        if allocation not in self.ALLOCATIONS:
            raise ValueError(f"method 'hashing': allocation={allocation!r}; allowed: {', '.join(self.ALLOCATIONS)}")
        self.allocation = allocation
        self.hash_function = hashing_fns.check_kind(self.name, hash_function)
        self.hash_seed = int(hash_seed)

    @staticmethod
    def rows_at(ratio: float, compressed: Sequence[TableSpec]) -> Dict[str, int]:
        """Proportional allocation: m_f = ceil(r * n_f) (at least 1)."""
        return {t.name: max(1, min(t.num_embeddings, math.ceil(ratio * t.num_embeddings))) for t in compressed}

    @staticmethod
    def rows_capped(cap: int, compressed: Sequence[TableSpec]) -> Dict[str, int]:
        """Cap allocation: m_f = min(n_f, M) — only fields larger than M are hashed (DLRM's
        ``--max-ind-range``), small fields keep one row per id."""
        return {t.name: max(1, min(t.num_embeddings, int(cap))) for t in compressed}

    def solve(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        compressed, _ = split_tables(tables, budget)
        limit = target_bytes(tables, dim, budget)
        extra: Dict[str, Any] = {}
        if self.allocation == "cap":
            largest = max((t.num_embeddings for t in compressed), default=1)

            def bytes_at(cap) -> int:
                return self.memory(tables, dim, {"rows": self.rows_capped(cap, compressed)}).inference_bytes

            cap = largest_integer_within(bytes_at, 1, largest, limit)
            cap = max(cap, 1)
            achieved, lowest, highest = bytes_at(cap), bytes_at(1), bytes_at(largest)
            rows = self.rows_capped(cap, compressed)
            extra["row_cap"] = int(cap)
        else:
            def bytes_at(ratio: float) -> int:
                return self.memory(tables, dim, {"rows": self.rows_at(ratio, compressed)}).inference_bytes

            ratio = bisect_continuous(bytes_at, 0.0, 1.0, limit)
            achieved, lowest, highest = bytes_at(ratio), bytes_at(0.0), bytes_at(1.0)
            rows = self.rows_at(ratio, compressed)
            extra["row_fraction"] = ratio
        land(self.name, achieved, tables, dim, budget, lowest, highest,
             "one row per compressed field already exceeds the budget" if lowest > limit else "")
        return {"rows": rows, **extra, "allocation": self.allocation,
                "hash_function": self.hash_function, "hash_seed": self.hash_seed}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        return table_memory(physical_tables(tables, dim, hparams["rows"]), tables, dim, optimizer)

    def build(self, tables: Sequence[TableSpec], dim: int, budget: Budget,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> HashingEmbedding:
        hparams = self.solve(tables, dim, budget)
        return HashingEmbedding(tables, dim, hparams["rows"], self.hash_function, self.hash_seed, optimizer)
