"""``cafe``: CAFE — hot ids (found online by a HotSketch) own exclusive rows, the rest share hash rows.

References: Zhang, Liu, Jiang, Miao, Cui, "CAFE: Towards Compact, Adaptive, and Fast Embedding for
Large-scale Recommendation Models", SIGMOD 2024 (arXiv:2312.03256); the authors' reference
implementation (CAFE repository: ``sk_embedding_bag.py``, ``sketch.cpp``).

Mechanism: every id of the compressed fields has a global key (field offset + id). One FBGEMM
table holds [H exclusive rows | hash rows of level 1 | ... of level L]. A HotSketch
(``recbench.methods.hot_sketch``; W buckets x 4 slots of key, score, exclusive row) tracks the
important ids: after each backward, each id of the batch adds its importance — the L2 norm of its
row gradient (``recbench.methods.id_gradients``), scaled so the batch's scores sum to its number
of lookups, as the reference's ``grad_norm * N / sum(grad_norm)`` — and all scores decay by
``decay`` per step. Every ``migrate_every`` steps the (at most) H highest-scored ids are hot:
an id entering the hot set copies its current hashed vector into a free exclusive row (which
keeps the optimizer state its previous owner left); an id leaving it (outscored, or replaced in the sketch) writes its exclusive
vector back (``write_back``: the difference is spread over its hash rows so its hashed vector
equals the exclusive one) and frees the row. Lookup: hot ids read their exclusive row; the
others the sum of their hashed rows — one level (``hash_levels: 1``, CAFE), or with
``hash_levels: 2`` (CAFE's multi-level hash embedding) ids tracked by the sketch with a score of
at least ``medium_fraction`` x the hot threshold also add a second hashed row from an independent
table. Bags pool the per-id vectors (sum; mean divides by the bag size).

Distributed runs: the table is sharded by TorchRec (whole rows per shard); the batch's id
gradients are joined over ranks in the backward (``id_gradients.attach(..., world)``), so every
rank keeps the same sketch and hot set, and migrations act on each rank's column shards
(``_weight_slices``).

Budget: inference bytes = (H + M) * D * 4 (exclusive + hash rows) + 12 * W * 4 (the sketch: key,
score, row per slot) + 4 (the medium threshold) + kept fields in full, with H = round(hot_fraction
* R), M = R - H (at least one row per level) and W = ceil(sketch_slots_per_hot * H / 4) buckets;
R is the largest integer that fits. Nothing is stored per id, so ratios down to a few rows of the
whole layer are reachable (CAFE's 10000x): the smallest is one exclusive row, one hash row per
level and one bucket. Training bytes add the optimizer state and the exclusive rows' owner
keys (4 H).

Shapes: KJT (F keys, B bags) -> ids rewritten to table rows (hot: 1, cold: 1..L per id)
-> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods import batch_part, hashing_fns, id_gradients
from recbench.methods.base import CompressionMethod
from recbench.methods.budget import land, largest_integer_within, split_tables, target_bytes
from recbench.methods.hot_sketch import SLOT_BYTES, HotSketch
from recbench.methods.per_id import value_fields
from recbench.methods.tables import (FusedIdMapEmbedding, FusedTables, PhysicalTable, closed_form_table_bytes,
                                     column_slices, pool_outputs)
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, TableSpec, full_embedding_bytes

TABLE = "cafe"
SLOTS_PER_BUCKET = 4
INT32_BYTES = 4


def layout(rows: int, hot_fraction: float, levels: int, sketch_slots_per_hot: float,
           hot: Optional[int] = None) -> Dict[str, Any]:
    """(hot rows H, per-level hash rows, sketch buckets W) for a total of ``rows`` = H + M rows
    (H = round(hot_fraction * rows) unless given)."""
    hot = max(1, int(round(hot_fraction * rows)) if hot is None else int(hot))
    hashed = max(levels, rows - hot)
    per_level = [hashed - (levels - 1) * (hashed // levels)] + [hashed // levels] * (levels - 1)
    buckets = max(1, math.ceil(sketch_slots_per_hot * hot / SLOTS_PER_BUCKET))
    return {"hot_rows": hot, "hash_rows": per_level, "buckets": buckets}


class CafeEmbedding(FusedIdMapEmbedding):
    """Exclusive + hashed rows in one fused table, a HotSketch as the hot-id map.

    forward: KJT (F keys, B bags) -> KeyedTensor (B, F * D).
    """

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
                 optimizer: EmbeddingOptimizer):
        super().__init__(tables, dim)
        self.field_index = {t.name: i for i, t in enumerate(self.tables)}
        compressed = set(hparams["compressed"])
        self.compressed = [t.name for t in self.tables if t.name in compressed]
        self.hot_rows = int(hparams["hot_rows"])
        self.hash_rows = [int(m) for m in hparams["hash_rows"]]
        self.decay, self.migrate_every = float(hparams["decay"]), int(hparams["migrate_every"])
        self.medium_fraction, self.write_back = float(hparams["medium_fraction"]), bool(hparams["write_back"])
        sizes = torch.tensor([t.num_embeddings if t.name in compressed else 0 for t in self.tables])
        hashing_fns.check_hashable("cafe", [("compressed fields", int(sizes.sum()))], max(self.hash_rows))
        self.register_buffer("key_offset", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.register_buffer("is_compressed", sizes > 0, persistent=False)
        self.register_buffer("is_mean", torch.tensor([t.pooling == "mean" for t in self.tables]), persistent=False)
        a, b = hashing_fns.draw(int(hparams["hash_seed"]), (len(self.hash_rows),))
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("b", b, persistent=False)
        starts = [self.hot_rows]
        for m in self.hash_rows[:-1]:
            starts.append(starts[-1] + m)
        self.register_buffer("level_start", torch.tensor(starts), persistent=False)
        self.register_buffer("level_rows", torch.tensor(self.hash_rows), persistent=False)
        self.sketch = HotSketch(int(hparams["buckets"]), SLOTS_PER_BUCKET, seed=int(hparams["hash_seed"]) + 1,
                                replacement=hparams["sketch_replacement"])
        self.register_buffer("medium_threshold", torch.full((1,), float("inf")))
        self.register_buffer("row_owner", torch.full((self.hot_rows,), -1, dtype=torch.int32))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        physical = [PhysicalTable(TABLE, self.hot_rows + sum(self.hash_rows), dim, self.compressed)] if self.compressed else []
        physical += [PhysicalTable(t.name, t.num_embeddings, dim, [t.name]) for t in self.tables if t.name not in compressed]
        self.fused = FusedTables(physical, optimizer)
        self.mean_names = [t.name for t in self.tables if t.pooling == "mean"]
        self.migrations = {"promoted": 0, "demoted": 0}
        self._pending: List[tuple] = []

    # ----- addressing -----
    def hashed_rows(self, keys: torch.Tensor) -> torch.Tensor:
        """(N, L) table rows of every hash level for global ``keys`` (N,)."""
        local = hashing_fns.universal(keys.unsqueeze(1), self.a, self.b, self.level_rows)
        return self.level_start + local

    def levels_of(self, scores: torch.Tensor) -> torch.Tensor:
        """(N,) number of hash levels an id uses: all L when its score reaches the medium threshold."""
        if len(self.hash_rows) == 1:
            return torch.ones_like(scores, dtype=torch.int64)
        medium = scores >= self.medium_fraction * self.medium_threshold
        return torch.where(medium, len(self.hash_rows), 1)

    def table_rows(self, keys: torch.Tensor):
        """Rows of global ``keys`` (N,): (rows (N, L) with -1 for unused levels, hot (N,) bool)."""
        exclusive, scores = self.sketch.lookup(keys)
        hot = exclusive >= 0
        rows = self.hashed_rows(keys)
        used = torch.arange(len(self.hash_rows)).unsqueeze(0) < self.levels_of(scores).unsqueeze(1)
        rows = torch.where(used, rows, torch.full_like(rows, -1))
        rows[hot] = -1
        rows[hot, 0] = exclusive[hot]
        return rows, hot

    def rewrite(self, features: KeyedJaggedTensor):
        fields = value_fields(features, self.field_index)
        ids = features.values().long()
        compressed = self.is_compressed[fields]
        keys = self.key_offset[fields] + ids
        rows, _ = self.table_rows(keys[compressed]) if compressed.any() else (torch.zeros(0, 1, dtype=torch.int64), None)
        per_value = torch.full((ids.numel(), rows.shape[1]), -1, dtype=torch.int64)
        per_value[compressed] = rows
        per_value[~compressed, 0] = ids[~compressed]
        used = per_value >= 0
        counts = used.sum(1)
        lengths = features.lengths().long()
        bags = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)
        new_lengths = torch.zeros_like(lengths).index_add_(0, bags, counts)
        rewritten = KeyedJaggedTensor(keys=features.keys(), values=per_value[used],
                                      lengths=new_lengths.to(features.lengths().dtype), stride=features.stride())
        return rewritten, keys, compressed

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        self.flush()
        rewritten, keys, compressed = self.rewrite(features)
        out = pool_outputs(self.fused(rewritten), features, self.feature_names, self.mean_names)
        if self.training:
            id_gradients.attach(out.values(), features, self.field_index, self.is_mean, keys, compressed, self.dim,
                                self.observe, batch_part.world_size())
        return out

    # ----- the online part -----
    def _weight_slices(self) -> List[torch.Tensor]:
        """This process's column slices of the table (``tables.column_slices``): migrations'
        row copies and write-backs act on each of them."""
        return column_slices(self.fused, TABLE, self.hot_rows + sum(self.hash_rows), "cafe")

    def _cold_rows(self, keys: torch.Tensor):
        """(rows (N, L), used (N, L) bool, levels (N,)) of keys as cold ids."""
        _, scores = self.sketch.lookup(keys)
        levels = self.levels_of(scores)
        rows = self.hashed_rows(keys)
        used = torch.arange(len(self.hash_rows)).unsqueeze(0) < levels.unsqueeze(1)
        return rows, used, levels

    def hashed_vectors(self, keys: torch.Tensor) -> torch.Tensor:
        """(N, D) vectors of ``keys`` as cold ids (this rank's columns when the table is sharded)."""
        rows, used, _ = self._cold_rows(keys)
        return torch.cat([self._hashed_vectors(weight, rows, used) for weight in self._weight_slices()], 1)

    @staticmethod
    def _hashed_vectors(weight: torch.Tensor, rows: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
        """(N, D_i) hashed vectors (sum of the used levels' rows) in the column slice ``weight``."""
        return (weight[rows] * used.unsqueeze(2)).sum(1)

    def observe(self, keys: torch.Tensor, norms: torch.Tensor, counts: torch.Tensor) -> None:
        """Called in the backward: queue the batch's importance (normalised to sum to its number
        of lookups). Applied by ``flush`` before the next forward, once the fused optimizer has
        updated the rows (weights cannot change while FBGEMM's backward still needs them)."""
        total = norms.sum()
        scores = norms * (counts.sum().float() / total) if total > 0 else torch.zeros_like(norms)
        self._pending.append((keys, scores))

    @torch.no_grad()
    def flush(self) -> None:
        """Per queued step: decay, insert into the sketch, and migrate on schedule."""
        pending, self._pending = self._pending, []
        for keys, scores in pending:
            self.sketch.decay(self.decay)
            lost_keys, lost_rows = self.sketch.insert(keys, scores)
            self._demote(lost_keys, lost_rows)
            self.steps += 1
            if int(self.steps) % self.migrate_every == 0:
                self.migrate()

    def to_inference(self) -> nn.Module:
        self.flush()
        return super().to_inference()

    @torch.no_grad()
    def migrate(self) -> Dict[str, int]:
        """Make the sketch's top-H ids hot; returns {"promoted": k, "demoted": k}."""
        promote, demote, threshold = self.sketch.hot_plan(self.hot_rows)
        self.medium_threshold.fill_(threshold)
        keys_flat, rows_flat = self.sketch.keys.view(-1), self.sketch.rows.view(-1)
        self._demote(keys_flat[demote].long(), rows_flat[demote].long())
        rows_flat[demote] = -1
        free = (self.row_owner < 0).nonzero().flatten()[: promote.numel()]
        assert free.numel() == promote.numel(), "the hot set never exceeds the exclusive rows"
        if promote.numel():
            keys = keys_flat[promote].long()
            rows, used, _ = self._cold_rows(keys)
            for weight in self._weight_slices():
                weight[free] = self._hashed_vectors(weight, rows, used)
            # the row keeps the optimizer state its previous owner left (see methods/cafe.md, "Deviations")
            rows_flat[promote] = free.to(torch.int32)
            self.row_owner[free] = keys.to(torch.int32)
        self.migrations["promoted"] += int(promote.numel())
        self.migrations["demoted"] += int(demote.numel())
        return {"promoted": int(promote.numel()), "demoted": int(demote.numel())}

    def _demote(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Ids leaving the hot set: write their exclusive vectors back, free their rows."""
        if not keys.numel():
            return
        if self.write_back:
            levels_rows, used, levels = self._cold_rows(keys)
            for weight in self._weight_slices():
                delta = (weight[rows] - self._hashed_vectors(weight, levels_rows, used)) / levels.unsqueeze(1).float()
                weight.index_add_(0, levels_rows[used], delta.unsqueeze(1).expand(-1, used.shape[1], -1)[used])
        self.row_owner[rows] = -1

    # ----- memory -----
    def memory_report(self) -> MemoryReport:
        weights = self.fused.weight_bytes()
        sketch = self.sketch.nbytes() + self.medium_threshold.numel() * self.medium_threshold.element_size()
        owner = self.row_owner.numel() * self.row_owner.element_size()
        return MemoryReport(
            inference_bytes=weights + sketch,
            training_bytes=weights + sketch + owner + self.fused.optimizer_state_bytes(),
            parameters=sum(p.numel() for p in self.fused.fused_parameters()),
            full_bytes=full_embedding_bytes(self.tables, self.dim),
            breakdown={"weights": weights, "sketch": sketch},
        )


class Cafe(CompressionMethod):
    """Hyperparameters: ``rows`` (auto), ``hot_fraction``, ``sketch_slots_per_hot``, ``hash_levels``,
    ``medium_fraction``, ``decay``, ``migrate_every``, ``write_back``, ``hash_seed``, ``sketch_replacement``."""

    name = "cafe"
    table_backed = True

    def __init__(self, name: Optional[str] = None, rows: Any = "auto", hot_fraction: float = 0.5,
                 sketch_slots_per_hot: float = 2.0, hash_levels: int = 1, medium_fraction: float = 0.1,
                 decay: float = 0.98, migrate_every: int = 1, write_back: bool = True, hash_seed: int = 0,
                 sketch_replacement: str = "decay"):
        super().__init__(name, rows=rows, hot_fraction=hot_fraction, sketch_slots_per_hot=sketch_slots_per_hot,
                         hash_levels=hash_levels, medium_fraction=medium_fraction, decay=decay,
                         migrate_every=migrate_every, write_back=write_back, hash_seed=hash_seed,
                         sketch_replacement=sketch_replacement)
        if sketch_replacement not in HotSketch.REPLACEMENTS:
            raise ValueError(f"cafe: sketch_replacement={sketch_replacement!r}; allowed: {', '.join(HotSketch.REPLACEMENTS)}")
        if rows != "auto" and not (isinstance(rows, int) and rows >= 2):
            raise ValueError(f"cafe: rows must be 'auto' or an integer >= 2, got {rows!r}")
        if not 0.0 < float(hot_fraction) < 1.0:
            raise ValueError(f"cafe: hot_fraction must be in (0, 1), got {hot_fraction}")
        if float(sketch_slots_per_hot) < 1.0:
            raise ValueError(f"cafe: sketch_slots_per_hot must be >= 1 (the sketch holds every hot id), got {sketch_slots_per_hot}")
        if int(hash_levels) not in (1, 2):
            raise ValueError(f"cafe: hash_levels must be 1 (CAFE) or 2 (multi-level hash embedding), got {hash_levels}")
        if not 0.0 < float(decay) <= 1.0:
            raise ValueError(f"cafe: decay must be in (0, 1], got {decay}")
        if int(migrate_every) < 1:
            raise ValueError(f"cafe: migrate_every must be >= 1 (steps), got {migrate_every}")
        if not 0.0 <= float(medium_fraction) <= 1.0:
            raise ValueError(f"cafe: medium_fraction must be in [0, 1], got {medium_fraction}")
        self.rows = rows
        self.settings = {"hot_fraction": float(hot_fraction), "sketch_slots_per_hot": float(sketch_slots_per_hot),
                         "hash_levels": int(hash_levels), "medium_fraction": float(medium_fraction),
                         "decay": float(decay), "migrate_every": int(migrate_every), "write_back": bool(write_back),
                         "hash_seed": int(hash_seed), "sketch_replacement": sketch_replacement}

    def _hparams(self, compressed: Sequence[str], rows: int, hot: Optional[int] = None) -> Dict[str, Any]:
        s = self.settings
        return {"rows": int(rows), "compressed": list(compressed),
                **layout(rows, s["hot_fraction"], s["hash_levels"], s["sketch_slots_per_hot"], hot), **s}

    @staticmethod
    def _parts(tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any], optimizer: EmbeddingOptimizer):
        names = set(hparams["compressed"])
        physical = ([PhysicalTable(TABLE, int(hparams["hot_rows"]) + sum(hparams["hash_rows"]), dim, sorted(names))]
                    if names else [])
        physical += [PhysicalTable(t.name, t.num_embeddings, dim, [t.name]) for t in tables if t.name not in names]
        parts = closed_form_table_bytes(physical, optimizer)
        sketch = SLOT_BYTES * SLOTS_PER_BUCKET * int(hparams["buckets"]) + FP32_BYTES
        return parts, sketch, sum(t.rows for t in physical)

    def solve(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        compressed, _ = split_tables(tables, budget)
        names = [t.name for t in compressed]
        total = sum(t.num_embeddings for t in compressed)
        limit = target_bytes(tables, dim, budget)
        smallest = 1 + self.settings["hash_levels"]

        def bytes_at(rows: int, hot: Optional[int] = None) -> int:
            parts, sketch, _ = self._parts(tables, dim, self._hparams(names, rows, hot), EmbeddingOptimizer())
            return parts["weights"] + sketch

        largest = max(total, smallest)
        if self.rows != "auto":
            rows = int(self.rows)
            if bytes_at(rows) > limit:
                land(self.name, bytes_at(rows), tables, dim, budget, bytes_at(smallest), bytes_at(largest),
                     f"rows={rows} gives ratio {bytes_at(rows) / full_embedding_bytes(tables, dim):.4g}")
        else:
            rows = max(largest_integer_within(bytes_at, smallest, largest, limit), smallest)
            # rows cost 4D bytes and a bucket 48, so at tiny budgets moving a row or two between the
            # exclusive and the hashed part lands closer to the target than the nominal split
            nominal = max(1, int(round(self.settings["hot_fraction"] * rows)))
            candidates = [(r, h) for r in range(rows, rows + 3) for h in range(max(1, nominal - 3), nominal + 4)
                          if r - h >= self.settings["hash_levels"]]
            fitting = [(bytes_at(r, h), -abs(h - self.settings["hot_fraction"] * r), r, h) for r, h in candidates
                       if bytes_at(r, h) <= limit]
            hot = None
            if fitting:
                _, _, rows, hot = max(fitting)
            land(self.name, bytes_at(rows, hot), tables, dim, budget, bytes_at(smallest), bytes_at(largest),
                 "one exclusive row, one hash row per level and one sketch bucket already exceed the budget"
                 if bytes_at(smallest) > limit else "")
            return self._hparams(names, rows, hot)
        return self._hparams(names, rows)

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        parts, sketch, rows = self._parts(tables, dim, hparams, optimizer)
        owner = INT32_BYTES * int(hparams["hot_rows"])
        return MemoryReport(
            inference_bytes=parts["weights"] + sketch,
            training_bytes=parts["weights"] + sketch + owner + parts["optimizer_state"],
            parameters=rows * dim, full_bytes=full_embedding_bytes(tables, dim),
            breakdown={"weights": parts["weights"], "sketch": sketch},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, budget: Budget,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> CafeEmbedding:
        return CafeEmbedding(tables, dim, self.solve(tables, dim, budget), optimizer)
