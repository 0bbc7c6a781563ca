"""``hashing``: the hashing trick — ids hashed into smaller tables, per field or into one global table.

References: Weinberger et al., "Feature Hashing for Large Scale Multitask Learning", ICML 2009;
Hsword/Hetu tools/EmbeddingMemoryCompression methods/layers/hash.py, methods/scheduler/hash.py and
models/load_data.py at a1cb1bcaf236c9f1d452733b105997d50c16c9df (the VLDB 2024 artifact's ``hash``).

Layouts (``layout``):
- ``per_field`` (default): field f with n_f ids owns an (m_f, D) fp32 table, m_f <= n_f; id x is
  looked up at row h_f(x), with h_f drawn from the universal family ((a_f x + b_f) mod p) mod m_f
  (salted per field, ``recbench.methods.blocks.hashing_fns``) or plain x mod m_f (``hash_function: modulo``).
  Budget (``allocation``): ``cap`` (default) m_f = min(n_f, M) with the largest integer M whose
  bytes fit — only fields larger than M are hashed, as DLRM's ``--max-ind-range`` does on Criteo;
  ``proportional`` m_f = min(n_f, ceil(r * n_f)) (at least 1) with r bisected. A field whose m_f
  equals n_f is looked up by its ids unchanged (no hash, no collision).
- ``global`` (the VLDB 2024 artifact's ``hash`` with ``use_multi = 0``): the compressed fields'
  ids are offset into one global id space (g = x + sum_{f' < f} n_f', fields in table order, as
  Hetu's ``process_sparse_feats``) and all look up ONE (M, D) fp32 table at row h(g): g mod M with
  ``hash_function: modulo`` (Hetu's ``mod_hash_op``), or one universal function. M is the largest
  integer whose bytes fit (Hetu: M = ceil(r * N), N = sum_f n_f); M = N looks the global ids up
  unchanged. ``allocation`` does not apply.
Either way the KJT's ids are rewritten and looked up in fused FBGEMM tables (fused optimizer,
shardable), so a multi-hot bag pools the hashed rows of its ids, and the inference bytes (the
stored rows x D x 4, kept fields in full) are at most the target. Fields below
``budget.min_rows_to_compress`` keep their full table. Infeasible when one row per compressed
field (per_field) or one shared row (global) already exceeds the budget.
Shapes: KJT (F keys, B bags) -> ids rewritten in place -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods.blocks import hashing_fns
from recbench.methods.base import CompressionMethod, QuantizeSettings
from recbench.methods.blocks.budget import (bisect_continuous, check_auto, kept_bytes, land, largest_integer_within,
                                    split_tables, target_bytes)
from recbench.methods.blocks.per_id import value_fields, with_values
from recbench.methods.blocks.tables import (FusedIdMapEmbedding, FusedTables, PhysicalTable, physical_tables,
                                     table_memory)
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, Plan, TableSpec

#: name of the one shared table of ``layout: global``
GLOBAL_TABLE = "hashing_global"


def global_tables(tables: Sequence[TableSpec], dim: int, rows: int, kept: Sequence[str]) -> List[PhysicalTable]:
    """Kept fields: their own full (n_f, D) tables; the others: features of one (M, D) table."""
    kept = set(kept)
    own = [PhysicalTable(t.name, t.num_embeddings, dim, [t.name], t.pooling) for t in tables if t.name in kept]
    shared = [t.name for t in tables if t.name not in kept]
    return own + ([PhysicalTable(GLOBAL_TABLE, int(rows), dim, shared, "sum")] if shared else [])


def global_offsets(tables: Sequence[TableSpec], kept: Sequence[str]) -> List[int]:
    """(F,) offset of each field in the global id space of the compressed fields (0 for kept ones)."""
    offsets, total = [], 0
    for t in tables:
        offsets.append(0 if t.name in kept else total)
        total += 0 if t.name in kept else t.num_embeddings
    return offsets


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


class GlobalHashingEmbedding(FusedIdMapEmbedding):
    """One hashed table over the compressed fields' global id space (Hetu's ``HashEmbedding`` with
    ``use_multi = 0``). forward: KJT (F keys, B bags) -> KeyedTensor (B, F * D).

    Args:
        rows: M, rows of the shared table.
        kept: fields that keep their own full table (looked up by their ids).
        hash_function: "modulo" (g mod M, the artifact's) or "universal" (one salted function).
        hash_seed: seed of the (a, b) of the universal function.
    """

    def __init__(self, tables: Sequence[TableSpec], dim: int, rows: int, kept: Sequence[str], hash_function: str,
                 hash_seed: int, optimizer: EmbeddingOptimizer):
        super().__init__(tables, dim)
        self.hash_function = hashing_fns.check_kind("hashing", hash_function)
        self.rows, self.kept = int(rows), set(kept)
        self.field_index = {t.name: i for i, t in enumerate(self.tables)}
        offsets = global_offsets(self.tables, self.kept)
        total = sum(t.num_embeddings for t in self.tables if t.name not in self.kept)
        hashing_fns.check_hashable("hashing", [("global id space", total)], self.rows)
        a, b = hashing_fns.draw(hash_seed, (1,))
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64), persistent=False)
        self.register_buffer("shared", torch.tensor([t.name not in self.kept for t in self.tables]), persistent=False)
        # M = N stores one row per global id: the ids are looked up unchanged (no collision)
        self.hashed = self.rows < total
        self.mean_shared = [t.name for t in self.tables if t.name not in self.kept and t.pooling == "mean"]
        self.fused = FusedTables(global_tables(self.tables, dim, self.rows, self.kept), optimizer)

    def rows_of(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """(N,) the table row of every value: h(id + offset_f) for shared fields, the id for kept ones."""
        fields = value_fields(features, self.field_index)
        ids = features.values().long()
        global_ids = ids + self.offsets[fields]
        if self.hashed:
            global_ids = hashing_fns.hash_ids(self.hash_function, global_ids, self.a, self.b, self.rows)
        return torch.where(self.shared[fields], global_ids, ids)

    def rewrite(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return with_values(features, self.rows_of(features))

    def combine(self, looked_up: KeyedTensor, features: KeyedJaggedTensor) -> KeyedTensor:
        """Blocks back in field order; mean-pooled shared fields divided by their bag sizes (the
        shared table sums; kept tables are already divided by FusedTables)."""
        if not self.mean_shared and looked_up.keys() == self.feature_names:
            return looked_up
        blocks = looked_up.to_dict()
        for name in self.mean_shared:
            blocks[name] = blocks[name] / features[name].lengths().clamp(min=1).to(blocks[name].dtype).unsqueeze(1)
        return self.keyed_output(torch.cat([blocks[name] for name in self.feature_names], dim=1))


@dataclass
class HashingSettings(QuantizeSettings):
    """Hyperparameters of ``hashing`` (defaults: per-field tables with DLRM's capped allocation; the
    VLDB 2024 artifact's ``hash`` is ``layout: global``, ``hash_function: modulo``)."""

    rows: Any = "auto"  #: solved from the budget (per_field: by `allocation`; global: the shared table's M)
    layout: str = "per_field"  #: per_field: one table per field | global: one (M, D) table over the fields' offset ids (Hetu)
    #: per_field only. cap: m_f = min(n_f, M), M solved (DLRM --max-ind-range) | proportional: m_f = ceil(r * n_f)
    allocation: str = "cap"
    hash_function: str = "universal"  #: universal ((a x + b) mod p) mod m | modulo (x mod m)
    hash_seed: int = 0  #: seed of the hash parameters (per field, or one for global)


class Hashing(CompressionMethod):
    """The hashing trick; hyperparameters: ``HashingSettings``."""

    name = "hashing"
    settings_class = HashingSettings
    #: 2: fields the allocation leaves at m_f = n_f are no longer hashed into n_f buckets (where
    #: ~63% of their ids shared a row); see methods/hashing.md, "Revisions".
    revision = 2

    ALLOCATIONS = ("cap", "proportional")
    LAYOUTS = ("per_field", "global")

    def check_settings(self) -> None:
        check_auto(self.name, "rows", self.rows)
        if self.allocation not in self.ALLOCATIONS:
            raise ValueError(f"method 'hashing': allocation={self.allocation!r}; allowed: {', '.join(self.ALLOCATIONS)}")
        if self.layout not in self.LAYOUTS:
            raise ValueError(f"method 'hashing': layout={self.layout!r}; allowed: {', '.join(self.LAYOUTS)}")
        self.hash_function = hashing_fns.check_kind(self.name, self.hash_function)
        self.hash_seed = int(self.hash_seed)

    @staticmethod
    def rows_at(ratio: float, compressed: Sequence[TableSpec]) -> Dict[str, int]:
        """Proportional allocation: m_f = ceil(r * n_f) (at least 1)."""
        return {t.name: max(1, min(t.num_embeddings, math.ceil(ratio * t.num_embeddings))) for t in compressed}

    @staticmethod
    def rows_capped(cap: int, compressed: Sequence[TableSpec]) -> Dict[str, int]:
        """Cap allocation: m_f = min(n_f, M) — only fields larger than M are hashed (DLRM's
        ``--max-ind-range``), small fields keep one row per id."""
        return {t.name: max(1, min(t.num_embeddings, int(cap))) for t in compressed}

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        common = {"layout": self.layout, "hash_function": self.hash_function, "hash_seed": self.hash_seed}
        if self.layout == "global":
            return {**self.solve_global(tables, dim, budget), **common}
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
        return {"rows": rows, **extra, "allocation": self.allocation, **common}

    def solve_global(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        """M = the largest number of shared rows within the target, in [1, N] (N = the compressed
        fields' ids)."""
        compressed, kept = split_tables(tables, budget)
        kept_names = [t.name for t in kept]
        total = sum(t.num_embeddings for t in compressed)

        def bytes_at(rows: int) -> int:
            return kept_bytes(kept, dim) + rows * dim * FP32_BYTES

        low = 1 if compressed else 0
        rows = max(largest_integer_within(bytes_at, low, total, target_bytes(tables, dim, budget)), low)
        land(self.name, bytes_at(rows), tables, dim, budget, bytes_at(low), bytes_at(total),
             "one shared row already exceeds the budget" if compressed else "every field is below min_rows_to_compress")
        return {"global_rows": int(rows), "kept": kept_names}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        return table_memory(self.physical_tables(tables, dim, hparams), tables, dim, optimizer)

    def physical_tables(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any]) -> List[PhysicalTable]:
        if hparams.get("layout", "per_field") == "global":
            return global_tables(tables, dim, hparams["global_rows"], hparams["kept"])
        return physical_tables(tables, dim, hparams["rows"])

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> FusedIdMapEmbedding:
        hparams = plan.hparams
        if self.layout == "global":
            return GlobalHashingEmbedding(tables, dim, hparams["global_rows"], hparams["kept"], self.hash_function,
                                          self.hash_seed, optimizer)
        return HashingEmbedding(tables, dim, hparams["rows"], self.hash_function, self.hash_seed, optimizer)
