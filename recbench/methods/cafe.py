"""``cafe``: CAFE — hot ids (found online by a HotSketch) own exclusive rows, the rest share hash rows.

References: Zhang, Liu, Jiang, Miao, Cui, "CAFE: Towards Compact, Adaptive, and Fast Embedding for
Large-scale Recommendation Models", SIGMOD 2024 (arXiv:2312.03256); the authors' artifact
HugoZHL/CAFE, ArtifactEvaluation/ (``embeddings/init_embed.py``, ``embeddings/sk_embedding_bag.py``,
``embeddings/sketch.cpp``, ``main.py``, ``tasks/criteo.json``), commit
c757c39e9a497202939904ae5b358eff426ccfda.

Mechanism (defaults = the artifact): every id of a compressed field has a global key
(id + the sizes of all earlier fields). One FBGEMM table holds [H exclusive rows | hash rows].
``hash_layout: per_field``: field f owns ceil(c * hash_rate * n_f) hash rows, a cold id reads row
``key % rows_f`` of its field's block; ``shared``: one pool of ceil(c * hash_rate * N) rows over
all fields, universal hashing, ``hash_levels`` 1 or 2 (multi-level: medium ids add a row of a
second pool). ``promotion: threshold``: the artifact's HotSketch (``hot_sketch.ThresholdSketch``:
W = H buckets of 4 slots, promotion at count >= ``threshold``, last-slot replacement, decay by
``decay`` once the total inserted exceeds ``decay_volume`` * W * threshold, demotion at the decay);
``top_h``: ``hot_sketch.HotSketch``, the (at most) H highest scores are hot every
``migrate_every`` steps, scores x ``decay`` per step. A newly hot id copies its hashed vector into
its exclusive row; a demoted id's exclusive vector is dropped (``write_back: true``: spread over
its hash rows so its hashed vector equals it). Lookup: hot ids read their exclusive row, the
others their hash row(s); bags pool the per-id vectors (sum; mean divides by the bag size).

Importance (``importance: per_field``, the artifact's ``insert_grad``): after each backward, every
lookup of a compressed field scores the L2 norm of the gradient its row receives from that bag
(the bag's output gradient; / bag size for mean), normalised per field so the field's scores in
the batch sum to its number of lookups (``g * N_f / sum g``); the fields' lookups are inserted
field by field, in batch order. ``batch``: one score per unique id (norm of its summed
gradient), normalised over the whole batch, inserted once per step.

Sizing (``init_embed.py``): with c the layout ratio, hot rows H = int(N * c * (1 - hash_rate) *
4D / (4D + 12 * sketch_slots_per_hot)) (one 4-slot bucket per hot row by default) and
W = ceil(sketch_slots_per_hot * H / 4) buckets; N is the compressed fields' total. ``threshold``
and ``hash_rate`` ``auto`` take the artifact's ladder for the budget's ratio (``LADDER``). c is
the largest value whose bytes fit the budget (bisected; the reference uses c = ratio and does not
check the per-field ceilings).

Budget: inference bytes = (H + hash rows) * D * 4 + 48 * W (key, count, row per slot) + 4 (the
hot threshold) + kept fields in full. Training bytes add the optimizer state, the exclusive rows'
owner keys (4 H) and, for ``threshold``, the free-row queue (4 H + 24).

Distributed runs: the table is sharded by TorchRec (whole rows per shard); the id gradients of the
whole global batch reach every rank in the backward (per lookup, in global sample order, or per
unique id), so every rank keeps the same sketch and hot set, and row copies act on each rank's
column shards (``_weight_slices``).

Shapes: KJT (F keys, B bags) -> ids rewritten to table rows (hot: 1, cold: 1..L per id)
-> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods.blocks import batch_part, hashing_fns, id_gradients
from recbench.methods.base import CompressionMethod
from recbench.methods.blocks.budget import bisect_continuous, land, split_tables, target_bytes
from recbench.methods.blocks.hot_sketch import SLOT_BYTES, HotSketch, ThresholdSketch
from recbench.methods.blocks.per_id import value_fields
from recbench.methods.blocks.tables import (FusedIdMapEmbedding, FusedTables, PhysicalTable, closed_form_table_bytes,
                                     column_slices, pool_outputs)
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, Plan, TableSpec, full_embedding_bytes

TABLE = "cafe"
SLOTS_PER_BUCKET = 4
INT32_BYTES = 4
#: (compress_rate, cafe_sketch_threshold, cafe_hash_rate) of HugoZHL/CAFE ArtifactEvaluation/tasks/criteo.json
LADDER = ((0.5, 10, 0.7), (0.2, 10, 0.5), (0.1, 20, 0.5), (0.05, 30, 0.5), (0.02, 50, 0.3), (0.01, 100, 0.3),
          (0.005, 200, 0.2), (0.002, 500, 0.2), (0.001, 500, 0.2), (0.0005, 500, 0.1), (0.0002, 500, 0.1),
          (0.0001, 500, 0.1))
CHOICES = {"promotion": ("threshold", "top_h"), "hash_layout": ("per_field", "shared"),
           "importance": ("per_field", "batch")}


def ladder(ratio: float) -> Tuple[float, float]:
    """(threshold, hash_rate) of the ladder entry nearest to ``ratio`` on a log scale (ties: the larger ratio)."""
    _, threshold, hash_rate = min(LADDER, key=lambda e: (abs(math.log(e[0] / ratio)), -e[0]))
    return float(threshold), float(hash_rate)


def layout(sizes: Sequence[int], ratio: float, dim: int, settings: Mapping[str, Any]) -> Dict[str, Any]:
    """Hot rows H, hash rows (per compressed field, or per level for ``shared``) and sketch buckets W
    of compressed fields of ``sizes`` rows at layout ratio ``ratio`` (``init_embed.py``'s formulas)."""
    rate, slots = settings["hash_rate"], settings["sketch_slots_per_hot"]
    total = int(sum(sizes))
    hot = max(1, int(total * ratio * (1 - rate) * (4 * dim / (4 * dim + SLOT_BYTES * slots))))
    if settings["hash_layout"] == "per_field":
        hash_rows = [max(1, math.ceil(ratio * rate * n)) for n in sizes]
    else:
        levels = settings["hash_levels"]
        hashed = max(levels, math.ceil(ratio * rate * total))
        hash_rows = [hashed - (levels - 1) * (hashed // levels)] + [hashed // levels] * (levels - 1)
    return {"hot_rows": hot, "hash_rows": hash_rows, "buckets": max(1, math.ceil(slots * hot / SLOTS_PER_BUCKET))}


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
        self.promotion, self.layout, self.importance = hparams["promotion"], hparams["hash_layout"], hparams["importance"]
        self.decay, self.migrate_every = float(hparams["decay"]), int(hparams["migrate_every"])
        self.medium_fraction, self.write_back = float(hparams["medium_fraction"]), bool(hparams["write_back"])
        self.levels = len(self.hash_rows) if self.layout == "shared" else 1
        sizes = torch.tensor([t.num_embeddings for t in self.tables])
        hashing_fns.check_hashable("cafe", [("all fields", int(sizes.sum()))], max(self.hash_rows))
        self.register_buffer("key_offset", torch.cumsum(sizes, 0) - sizes, persistent=False)
        self.register_buffer("key_end", torch.cumsum(sizes, 0), persistent=False)
        self.register_buffer("is_compressed", torch.tensor([t.name in compressed for t in self.tables]),
                             persistent=False)
        self.register_buffer("is_mean", torch.tensor([t.pooling == "mean" for t in self.tables]), persistent=False)
        if self.layout == "per_field":  # field f's hash rows: [start_f, start_f + rows_f)
            rows_of = dict(zip(self.compressed, self.hash_rows))
            field_rows = torch.tensor([rows_of.get(t.name, 1) for t in self.tables])
            starts = self.hot_rows + torch.cumsum(field_rows, 0) - field_rows
            self.register_buffer("field_start", starts, persistent=False)
            self.register_buffer("field_rows", field_rows, persistent=False)
        else:
            a, b = hashing_fns.draw(int(hparams["hash_seed"]), (self.levels,))
            self.register_buffer("a", a, persistent=False)
            self.register_buffer("b", b, persistent=False)
            starts = [self.hot_rows]
            for m in self.hash_rows[:-1]:
                starts.append(starts[-1] + m)
            self.register_buffer("level_start", torch.tensor(starts), persistent=False)
            self.register_buffer("level_rows", torch.tensor(self.hash_rows), persistent=False)
        if self.promotion == "threshold":
            self.sketch = ThresholdSketch(int(hparams["buckets"]), self.hot_rows, float(hparams["threshold"]),
                                          self.decay, float(hparams["decay_volume"]))
            initial = float(hparams["threshold"])
        else:
            self.sketch = HotSketch(int(hparams["buckets"]), SLOTS_PER_BUCKET, seed=int(hparams["hash_seed"]) + 1,
                                    replacement=hparams["sketch_replacement"])
            initial = float("inf")
        self.register_buffer("medium_threshold", torch.full((1,), initial))
        self.register_buffer("row_owner", torch.full((self.hot_rows,), -1, dtype=torch.int32))
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))
        self.table_rows_total = self.hot_rows + sum(self.hash_rows)
        physical = [PhysicalTable(TABLE, self.table_rows_total, dim, self.compressed)] if self.compressed else []
        physical += [PhysicalTable(t.name, t.num_embeddings, dim, [t.name]) for t in self.tables if t.name not in compressed]
        self.fused = FusedTables(physical, optimizer)
        if self.compressed and self.layout == "per_field":
            self._reference_init()
        self.mean_names = [t.name for t in self.tables if t.pooling == "mean"]
        self.migrations = {"promoted": 0, "demoted": 0}
        self._pending: List[tuple] = []

    @torch.no_grad()
    def _reference_init(self) -> None:
        """``init_embed.py``: hot rows U(+-sqrt(1 / max_f n_f)), field f's hash rows U(+-sqrt(1 / n_f))."""
        weight = self.fused.weight(TABLE)
        bound = (1.0 / max(t.num_embeddings for t in self.tables)) ** 0.5
        weight[: self.hot_rows] = torch.empty(self.hot_rows, self.dim).uniform_(-bound, bound)
        for i, t in enumerate(self.tables):
            if t.name in self.compressed:
                start, rows = int(self.field_start[i]), int(self.field_rows[i])
                bound = (1.0 / t.num_embeddings) ** 0.5
                weight[start:start + rows] = torch.empty(rows, self.dim).uniform_(-bound, bound)

    # ----- addressing -----
    def hashed_rows(self, keys: torch.Tensor) -> torch.Tensor:
        """(N, L) table rows of every hash level for global ``keys`` (N,) (L = 1 for ``per_field``)."""
        if self.layout == "per_field":
            field = torch.searchsorted(self.key_end, keys, right=True)
            return (self.field_start[field] + keys % self.field_rows[field]).unsqueeze(1)
        local = hashing_fns.universal(keys.unsqueeze(1), self.a, self.b, self.level_rows)
        return self.level_start + local

    def levels_of(self, scores: torch.Tensor) -> torch.Tensor:
        """(N,) number of hash levels an id uses: all L when its score reaches the medium threshold."""
        if self.levels == 1:
            return torch.ones_like(scores, dtype=torch.int64)
        medium = scores >= self.medium_fraction * self.medium_threshold
        return torch.where(medium, self.levels, 1)

    def _cold_rows(self, keys: torch.Tensor, scores: Optional[torch.Tensor] = None):
        """(rows (N, L), used (N, L) bool, levels (N,)) of keys as cold ids."""
        if scores is None:
            _, scores = self.sketch.lookup(keys)
        levels = self.levels_of(scores)
        used = torch.arange(self.levels, device=levels.device).unsqueeze(0) < levels.unsqueeze(1)
        return self.hashed_rows(keys), used, levels

    def table_rows(self, keys: torch.Tensor):
        """Rows of global ``keys`` (N,): (rows (N, L) with -1 for unused levels, hot (N,) bool)."""
        exclusive, scores = self.sketch.lookup(keys)
        hot = exclusive >= 0
        rows, used, _ = self._cold_rows(keys, scores)
        rows = torch.where(used, rows, torch.full_like(rows, -1))
        rows[hot] = -1
        rows[hot, 0] = exclusive[hot]
        return rows, hot

    def rewrite(self, features: KeyedJaggedTensor):
        fields = value_fields(features, self.field_index)
        ids = features.values().long()
        compressed = self.is_compressed[fields]
        keys = self.key_offset[fields] + ids
        rows, _ = (self.table_rows(keys[compressed]) if compressed.any()
                   else (torch.zeros(0, self.levels, dtype=torch.int64, device=ids.device), None))
        per_value = torch.full((ids.numel(), rows.shape[1]), -1, dtype=torch.int64, device=ids.device)
        per_value[compressed] = rows
        per_value[~compressed, 0] = ids[~compressed]
        used = per_value >= 0
        lengths = features.lengths().long()
        bags = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
        new_lengths = torch.zeros_like(lengths).index_add_(0, bags, used.sum(1))
        rewritten = KeyedJaggedTensor(keys=features.keys(), values=per_value[used],
                                      lengths=new_lengths.to(features.lengths().dtype), stride=features.stride())
        return rewritten, keys, compressed, fields

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        self.flush()
        rewritten, keys, compressed, fields = self.rewrite(features)
        out = pool_outputs(self.fused(rewritten), features, self.feature_names, self.mean_names)
        if self.training:
            world = batch_part.world_size()
            if self.importance == "batch":
                id_gradients.attach(out.values(), features, self.field_index, self.is_mean, keys, compressed,
                                    self.dim, self.observe, world)
            else:
                self._attach_lookups(out.values(), features, keys, compressed, world)
        return out

    # ----- the online part -----
    def _attach_lookups(self, values: torch.Tensor, features: KeyedJaggedTensor, keys: torch.Tensor,
                        compressed: torch.Tensor, world: int) -> None:
        """Queue, during the backward of ``values`` (B, F * D), every compressed lookup's (field, key,
        gradient norm), fields in module order and lookups in global batch order."""
        if not (values.requires_grad and torch.is_grad_enabled()):
            return
        fields, samples, scale = id_gradients.value_layout(features, self.field_index, self.is_mean)
        chosen = compressed.nonzero().flatten()
        if not chosen.numel() and world == 1:  # distributed: every rank joins the collective, even with no value
            return
        fields, samples, scale, keys = fields[chosen], samples[chosen], scale[chosen], keys[chosen]
        num_fields = len(self.field_index)

        def hook(grad: torch.Tensor) -> None:
            with torch.no_grad():
                per_value = grad.detach().view(grad.shape[0], num_fields, self.dim)[samples, fields]
                norms = (per_value * scale.unsqueeze(1)).norm(dim=1)
                every_field, every_key, every_norm = batch_part.concat_over_ranks([fields, keys, norms], world)
                order = torch.argsort(every_field, stable=True)  # ranks hold consecutive samples
                self._pending.append(("lookups", every_field[order], every_key[order], every_norm[order] / world))

        values.register_hook(hook)

    def observe(self, keys: torch.Tensor, norms: torch.Tensor, counts: torch.Tensor) -> None:
        """``importance: batch``, called in the backward: queue the batch's unique ids with their
        importance normalised to sum to the batch's number of lookups."""
        total = norms.sum()
        scores = norms * (counts.sum().float() / total) if total > 0 else torch.zeros_like(norms)
        self._pending.append(("unique", None, keys, scores))

    @staticmethod
    def field_scores(fields: torch.Tensor, norms: torch.Tensor):
        """[(field's lookups (index tensor), scores g * N_f / sum g)] per field present, in field order."""
        out = []
        for f in torch.unique(fields).tolist():
            where = (fields == f).nonzero().flatten()
            g = norms[where].float()
            total = g.sum()
            out.append((where, g * where.numel() / total if total > 0 else torch.zeros_like(g)))
        return out

    @torch.no_grad()
    def flush(self) -> None:
        """Apply the queued steps' importance (after the fused optimizer has updated the rows:
        weights cannot change while FBGEMM's backward still needs them)."""
        pending, self._pending = self._pending, []
        for kind, fields, keys, norms in pending:
            if kind == "lookups":
                parts = [(keys[where], scores) for where, scores in self.field_scores(fields, norms)]
            else:
                parts = [(keys, norms)]
            if self.promotion == "threshold":
                for part_keys, scores in parts:
                    promoted_keys, promoted_rows, demoted_keys, demoted_rows = self.sketch.insert(part_keys, scores)
                    self._demote(demoted_keys, demoted_rows)
                    self._promote(promoted_keys, promoted_rows)
            else:
                self.sketch.decay(self.decay)
                if parts:
                    lost_keys, lost_rows = self.sketch.insert(torch.cat([k for k, _ in parts]),
                                                              torch.cat([s for _, s in parts]))
                    self._demote(lost_keys, lost_rows)
                if int(self.steps + 1) % self.migrate_every == 0:
                    self.migrate()
            self.steps += 1

    def to_inference(self) -> nn.Module:
        self.flush()
        return super().to_inference()

    def _weight_slices(self) -> List[torch.Tensor]:
        """This process's column slices of the table (``tables.column_slices``): row copies and
        write-backs act on each of them."""
        return column_slices(self.fused, TABLE, self.table_rows_total, "cafe")

    def hashed_vectors(self, keys: torch.Tensor) -> torch.Tensor:
        """(N, D) vectors of ``keys`` as cold ids (this rank's columns when the table is sharded)."""
        rows, used, _ = self._cold_rows(keys)
        return torch.cat([self._hashed_vectors(weight, rows, used) for weight in self._weight_slices()], 1)

    @staticmethod
    def _hashed_vectors(weight: torch.Tensor, rows: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
        """(N, D_i) hashed vectors (sum of the used levels' rows) in the column slice ``weight``."""
        return (weight[rows] * used.unsqueeze(2)).sum(1)

    def _promote(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Ids that became hot: their hashed vector is copied into their exclusive row."""
        if not keys.numel():
            return
        cold, used, _ = self._cold_rows(keys)
        for weight in self._weight_slices():
            weight[rows] = self._hashed_vectors(weight, cold, used)
        # the row keeps the optimizer state its previous owner left (see methods/cafe.md, "Deviations")
        self.row_owner[rows] = keys.to(torch.int32)
        self.migrations["promoted"] += int(keys.numel())

    @torch.no_grad()
    def migrate(self) -> Dict[str, int]:
        """``promotion: top_h``: make the sketch's top-H ids hot; returns {"promoted": k, "demoted": k}."""
        promote, demote, threshold = self.sketch.hot_plan(self.hot_rows)
        self.medium_threshold.fill_(threshold)
        keys_flat, rows_flat = self.sketch.keys.view(-1), self.sketch.rows.view(-1)
        self._demote(keys_flat[demote].long(), rows_flat[demote].long())
        rows_flat[demote] = -1
        free = (self.row_owner < 0).nonzero().flatten()[: promote.numel()]
        assert free.numel() == promote.numel(), "the hot set never exceeds the exclusive rows"
        rows_flat[promote] = free.to(torch.int32)
        self._promote(keys_flat[promote].long(), free)
        return {"promoted": int(promote.numel()), "demoted": int(demote.numel())}

    def _demote(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        """Ids leaving the hot set free their rows (``write_back``: after writing their exclusive
        vectors into their hash rows)."""
        if not keys.numel():
            return
        if self.write_back:
            levels_rows, used, levels = self._cold_rows(keys)
            for weight in self._weight_slices():
                delta = (weight[rows] - self._hashed_vectors(weight, levels_rows, used)) / levels.unsqueeze(1).float()
                weight.index_add_(0, levels_rows[used], delta.unsqueeze(1).expand(-1, used.shape[1], -1)[used])
        self.row_owner[rows] = -1
        self.migrations["demoted"] += int(keys.numel())

    # ----- memory -----
    def memory_report(self) -> MemoryReport:
        weights = self.fused.weight_bytes()
        sketch = self.sketch.nbytes() + self.medium_threshold.numel() * self.medium_threshold.element_size()
        owner = self.row_owner.numel() * self.row_owner.element_size()
        queue = self.sketch.training_nbytes() if self.promotion == "threshold" else 0
        return MemoryReport(
            inference_bytes=weights + sketch,
            training_bytes=weights + sketch + owner + queue + self.fused.optimizer_state_bytes(),
            parameters=sum(p.numel() for p in self.fused.fused_parameters()),
            full_bytes=full_embedding_bytes(self.tables, self.dim),
            breakdown={"weights": weights, "sketch": sketch},
        )


@dataclass
class CafeSettings:
    """Hyperparameters of ``cafe`` (defaults: the authors' artifact, HugoZHL/CAFE ArtifactEvaluation
    at commit c757c39)."""

    #: threshold: hot once the sketch count reaches `threshold` (artifact) | top_h: the H highest scores, every migrate_every steps
    promotion: str = "threshold"
    threshold: Any = "auto"  #: auto: tasks/criteo.json ladder for the budget's ratio | a number > 0
    hash_rate: Any = "auto"  #: share of the budget for hash rows; auto: the ladder | a number in (0, 1)
    #: threshold: counts x decay once the total inserted exceeds decay_volume * W * threshold | top_h: per step
    decay: float = 0.99
    decay_volume: float = 10.0  #: threshold promotion: decay once the inserted total exceeds decay_volume * W * threshold (artifact: 10)
    #: per_field: ceil(c * hash_rate * n_f) rows per field, row (id + offset) % rows (artifact) | shared: one pool, universal hash
    hash_layout: str = "per_field"
    #: per_field: per lookup, normalised per field, inserted field by field (artifact) | batch: per unique id, normalised over the batch
    importance: str = "per_field"
    write_back: bool = False  #: true: a demoted id writes its exclusive vector into its hash rows
    sketch_slots_per_hot: float = 4.0  #: sketch slots per exclusive row (4 = one bucket per hot row, artifact)
    hash_levels: int = 1  #: 2 (hash_layout shared only): multi-level hash embedding
    #: hash_levels 2: tracked ids with score >= this x the hot threshold add a second hash row
    medium_fraction: float = 0.1
    migrate_every: int = 1  #: top_h: steps between hot-set migrations
    sketch_replacement: str = "decay"  #: top_h: decay (HeavyKeeper, base 1.08) | space_saving
    hash_seed: int = 0  #: shared layout's hash and top_h's bucket hash


class Cafe(CompressionMethod):
    """CAFE; hyperparameters: ``CafeSettings`` (methods/cafe.md)."""

    name = "cafe"
    settings_class = CafeSettings
    table_backed = True

    def check_settings(self) -> None:
        given = {"promotion": self.promotion, "hash_layout": self.hash_layout, "importance": self.importance}
        for key, allowed in CHOICES.items():
            if given[key] not in allowed:
                raise ValueError(f"cafe: {key}={given[key]!r}; allowed: {', '.join(allowed)}")
        sketch_replacement, threshold, hash_rate = self.sketch_replacement, self.threshold, self.hash_rate
        sketch_slots_per_hot, hash_levels, decay = self.sketch_slots_per_hot, self.hash_levels, self.decay
        decay_volume, migrate_every, medium_fraction = self.decay_volume, self.migrate_every, self.medium_fraction
        if sketch_replacement not in HotSketch.REPLACEMENTS:
            raise ValueError(f"cafe: sketch_replacement={sketch_replacement!r}; allowed: {', '.join(HotSketch.REPLACEMENTS)}")
        if threshold != "auto" and not (isinstance(threshold, (int, float)) and threshold > 0):
            raise ValueError(f"cafe: threshold={threshold!r}; allowed: 'auto' (tasks/criteo.json ladder) or a number > 0")
        if hash_rate != "auto" and not (isinstance(hash_rate, (int, float)) and 0.0 < hash_rate < 1.0):
            raise ValueError(f"cafe: hash_rate={hash_rate!r}; allowed: 'auto' (tasks/criteo.json ladder) or a number in (0, 1)")
        if float(sketch_slots_per_hot) < 1.0:
            raise ValueError(f"cafe: sketch_slots_per_hot={sketch_slots_per_hot}; allowed: >= 1 (the sketch holds every hot id)")
        if int(hash_levels) not in (1, 2) or (int(hash_levels) == 2 and self.hash_layout != "shared"):
            raise ValueError(f"cafe: hash_levels={hash_levels}; allowed: 1, or 2 (multi-level hash embedding) "
                             "with hash_layout=shared")
        if not 0.0 < float(decay) <= 1.0:
            raise ValueError(f"cafe: decay={decay}; allowed: (0, 1]")
        if not float(decay_volume) > 0.0:
            raise ValueError(f"cafe: decay_volume={decay_volume}; allowed: > 0")
        if int(migrate_every) < 1:
            raise ValueError(f"cafe: migrate_every={migrate_every}; allowed: an integer >= 1 (steps)")
        if not 0.0 <= float(medium_fraction) <= 1.0:
            raise ValueError(f"cafe: medium_fraction={medium_fraction}; allowed: [0, 1]")
        self.decay, self.decay_volume, self.write_back = float(decay), float(decay_volume), bool(self.write_back)
        self.sketch_slots_per_hot, self.hash_levels = float(sketch_slots_per_hot), int(hash_levels)
        self.medium_fraction, self.migrate_every = float(medium_fraction), int(migrate_every)
        self.hash_seed = int(self.hash_seed)
        #: the settings every plan carries (all but threshold/hash_rate, which ``resolved`` fills in);
        #: named apart from ``self.settings`` (the CafeSettings instance as given)
        self.plan_settings = {key: getattr(self, key) for key in (
            "promotion", "hash_layout", "importance", "decay", "decay_volume", "write_back", "sketch_slots_per_hot",
            "hash_levels", "medium_fraction", "migrate_every", "sketch_replacement", "hash_seed")}

    def resolved(self, ratio: float) -> Dict[str, float]:
        """{"threshold", "hash_rate"}: the given values, ``auto`` ones from the ladder at ``ratio``."""
        threshold, hash_rate = ladder(ratio)
        return {"threshold": float(threshold if self.threshold == "auto" else self.threshold),
                "hash_rate": float(hash_rate if self.hash_rate == "auto" else self.hash_rate)}

    @staticmethod
    def _parts(tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any], optimizer: EmbeddingOptimizer):
        names = set(hparams["compressed"])
        physical = ([PhysicalTable(TABLE, int(hparams["hot_rows"]) + sum(hparams["hash_rows"]), dim, sorted(names))]
                    if names else [])
        physical += [PhysicalTable(t.name, t.num_embeddings, dim, [t.name]) for t in tables if t.name not in names]
        parts = closed_form_table_bytes(physical, optimizer)
        sketch = SLOT_BYTES * SLOTS_PER_BUCKET * int(hparams["buckets"]) + FP32_BYTES
        return parts, sketch, sum(t.rows for t in physical)

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        compressed, _ = split_tables(tables, budget)
        sizes = [t.num_embeddings for t in compressed]
        base = {"compressed": [t.name for t in compressed], **self.plan_settings, **self.resolved(budget.compression_ratio)}
        limit = target_bytes(tables, dim, budget)

        def hparams_at(ratio: float) -> Dict[str, Any]:
            return {**base, "layout_ratio": ratio, **layout(sizes, ratio, dim, base)}

        def bytes_at(ratio: float) -> int:
            parts, sketch, _ = self._parts(tables, dim, hparams_at(ratio), EmbeddingOptimizer())
            return parts["weights"] + sketch

        ceiling = max(limit / (FP32_BYTES * dim * max(sum(sizes), 1)), 1.0)
        ratio = bisect_continuous(bytes_at, 0.0, ceiling, limit)
        land(self.name, bytes_at(ratio), tables, dim, budget, bytes_at(0.0), bytes_at(1.0),
             "one exclusive row, one sketch bucket and one hash row per field already exceed the budget"
             if bytes_at(0.0) > limit else "")
        return hparams_at(ratio)

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        parts, sketch, rows = self._parts(tables, dim, hparams, optimizer)
        hot = int(hparams["hot_rows"])
        owner = INT32_BYTES * hot + (ThresholdSketch.training_bytes_of(hot) if hparams["promotion"] == "threshold" else 0)
        return MemoryReport(
            inference_bytes=parts["weights"] + sketch,
            training_bytes=parts["weights"] + sketch + owner + parts["optimizer_state"],
            parameters=rows * dim, full_bytes=full_embedding_bytes(tables, dim),
            breakdown={"weights": parts["weights"], "sketch": sketch},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> CafeEmbedding:
        return CafeEmbedding(tables, dim, plan.hparams, optimizer)
