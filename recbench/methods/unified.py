"""``unified``: Unified Embedding / feature multiplexing — one hashed table shared by all fields.

References: Coleman, Kang, Fahrbach, Wang, Hong, Chi & Cheng, "Unified Embedding: Battle-Tested
Feature Representations for Web-Scale ML Systems", NeurIPS 2023.

Mechanism: every compressed field f maps id x with k salted hash functions h_{f,j} (j < k,
``probes``) into ONE shared (R, D / k) fp32 table; the D-dim embedding of x is the concatenation
[T[h_{f,0}(x)], ..., T[h_{f,k-1}(x)]] (the paper's multi-probe "variable-length" lookup). It runs as
a KJT transform: each (f, j) becomes a feature "f/j" whose ids are h_{f,j}(x), and all those
features look up one fused FBGEMM table (fused optimizer, shardable). Concatenation commutes with
sum/mean pooling, so a pooled bag is exactly the concatenation of the pooled probes.
Budget: the shared table's rows R are the knob: inference bytes = R * (D / k) * 4 (+ kept fields in
full); R is the largest integer within the target (infeasible when one row already exceeds it).
Shapes: KJT (F keys, B bags) -> KJT (F * k keys) -> (B, F * k * D / k) = KeyedTensor (B, F * D).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods.blocks import hashing_fns
from recbench.methods.base import CompressionMethod, InfeasibleBudget, QuantizeSettings
from recbench.methods.blocks.budget import kept_bytes, land, largest_integer_within, split_tables, target_bytes
from recbench.methods.blocks.budget import check_auto
from recbench.methods.blocks.tables import FusedIdMapEmbedding, FusedTables, PhysicalTable, check_fbgemm_dim, table_memory
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, Plan, TableSpec

SHARED = "unified_shared"


def probe_key(field: str, probe: int) -> str:
    return f"{field}/{probe}"


def probe_width(dim: int, probes: int) -> int:
    """D / k, checked: k divides D and D / k is a multiple of 4 (FBGEMM)."""
    if probes < 1 or dim % probes:
        raise ValueError(f"method 'unified': probes={probes} must divide embedding_dim={dim}")
    check_fbgemm_dim(dim // probes, f"method 'unified' with probes={probes} (table dim = {dim}/{probes})")
    return dim // probes


def physical_tables(tables: Sequence[TableSpec], dim: int, rows: int, probes: int,
                    kept: Sequence[str]) -> List[PhysicalTable]:
    """Kept fields: their own full (n_f, D) tables; the rest: probe features of one (R, D/k) table."""
    kept = set(kept)
    own = [PhysicalTable(t.name, t.num_embeddings, dim, [t.name], t.pooling) for t in tables if t.name in kept]
    features = [probe_key(t.name, j) for t in tables if t.name not in kept for j in range(probes)]
    shared = [PhysicalTable(SHARED, rows, probe_width(dim, probes), features, "sum")] if features else []
    return own + shared


class UnifiedEmbedding(FusedIdMapEmbedding):
    """One shared multi-probe table. forward: KJT (F keys, B bags) -> KeyedTensor (B, F * D).

    Args:
        rows: R, rows of the shared table.
        probes: k lookups per id, each D / k wide.
        kept: fields that keep their own full table.
        hash_seed: seed of the (F, k) salts (a, b) of the universal family.
    """

    def __init__(self, tables: Sequence[TableSpec], dim: int, rows: int, probes: int, kept: Sequence[str],
                 hash_seed: int, optimizer: EmbeddingOptimizer):
        super().__init__(tables, dim)
        self.rows, self.probes, self.kept = int(rows), int(probes), set(kept)
        names = {t.name for t in self.tables}
        clashes = {probe_key(n, j) for n in names for j in range(self.probes)} & names
        if clashes:
            raise ValueError(f"method 'unified': field names {sorted(clashes)} clash with probe feature names")
        hashing_fns.check_hashable("unified", [(t.name, t.num_embeddings) for t in self.tables], self.rows)
        self.field_index = {t.name: i for i, t in enumerate(self.tables)}
        a, b = hashing_fns.draw(hash_seed, (len(self.tables), self.probes))
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)
        self.fused = FusedTables(physical_tables(self.tables, dim, self.rows, self.probes, self.kept), optimizer)

    def probe_rows(self, field: str, ids: torch.Tensor) -> torch.Tensor:
        """(n,) ids of ``field`` -> (n, k) shared-table rows h_{f,j}(id)."""
        f = self.field_index[field]
        return hashing_fns.universal(ids.long().unsqueeze(1), self.a[f], self.b[f], self.rows)

    def rewrite(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        jagged = features.to_dict()
        keys, values, lengths = [], [], []
        for name in features.keys():
            ids, bag_sizes = jagged[name].values(), jagged[name].lengths()
            if name in self.kept:
                keys.append(name), values.append(ids.long()), lengths.append(bag_sizes)
                continue
            rows = self.probe_rows(name, ids)
            for j in range(self.probes):
                keys.append(probe_key(name, j)), values.append(rows[:, j]), lengths.append(bag_sizes)
        return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths),
                                 stride=features.stride())

    def rewritten_keys(self, field: str) -> List[str]:
        return [field] if field in self.kept else [probe_key(field, j) for j in range(self.probes)]

    def combine(self, looked_up: KeyedTensor, features: KeyedJaggedTensor) -> KeyedTensor:
        blocks = looked_up.to_dict()
        out = []
        for t in self.tables:
            if t.name in self.kept:
                out.append(blocks[t.name])  # already mean-divided by FusedTables
                continue
            block = torch.cat([blocks[probe_key(t.name, j)] for j in range(self.probes)], dim=1)
            if t.pooling == "mean":
                block = block / features[t.name].lengths().clamp(min=1).to(block.dtype).unsqueeze(1)
            out.append(block)
        return self.keyed_output(torch.cat(out, dim=1))


@dataclass
class UnifiedSettings(QuantizeSettings):
    """Hyperparameters of ``unified`` (defaults follow the paper, NeurIPS 2023: multi-probe lookups)."""

    rows: Any = "auto"  #: rows of the shared table, solved from the budget (only auto is supported)
    probes: int = 2  #: k lookups per id, each embedding_dim / k wide (must be a multiple of 4)
    hash_seed: int = 0  #: seed of the per-(field, probe) hash salts


class Unified(CompressionMethod):
    """Unified Embedding; hyperparameters: ``UnifiedSettings``."""

    name = "unified"
    settings_class = UnifiedSettings

    def check_settings(self) -> None:
        check_auto(self.name, "rows", self.rows)
        self.probes, self.hash_seed = int(self.probes), int(self.hash_seed)

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        width = probe_width(dim, self.probes)
        compressed, kept = split_tables(tables, budget)
        kept_names = [t.name for t in kept]
        limit = target_bytes(tables, dim, budget)
        if not compressed:
            raise InfeasibleBudget(self.name, budget.compression_ratio, 1.0, 1.0,
                                   "every field is below min_rows_to_compress")

        def bytes_at(rows: int) -> int:
            return kept_bytes(kept, dim) + rows * width * FP32_BYTES

        most = self.probes * sum(t.num_embeddings for t in compressed)  # as many bytes as the full tables
        rows = largest_integer_within(bytes_at, 1, most, limit)
        land(self.name, bytes_at(max(rows, 1)), tables, dim, budget, bytes_at(1), bytes_at(most),
             "one shared row already exceeds the budget" if rows < 1 else "")
        return {"rows": rows, "probes": self.probes, "kept": kept_names, "hash_seed": self.hash_seed}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        return table_memory(self.physical_tables(tables, dim, hparams), tables, dim, optimizer)

    def physical_tables(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any]) -> List[PhysicalTable]:
        return physical_tables(tables, dim, hparams["rows"], hparams["probes"], hparams["kept"])

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> UnifiedEmbedding:
        hp = plan.hparams
        return UnifiedEmbedding(tables, dim, hp["rows"], hp["probes"], hp["kept"], self.hash_seed, optimizer)
