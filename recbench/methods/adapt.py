"""``adapt``: DeepRec's Adaptive Embedding as in the VLDB 2024 artifact — frequent ids own rows of an
exclusive table, every other id shares a table through ``rank mod rows``.

References: Hsword/Hetu ``tools/EmbeddingMemoryCompression`` at a1cb1bcaf236c9f1d452733b105997d50c16c9df:
``methods/layers/adapt.py`` (``AdaptiveEmbedding``), ``methods/scheduler/adapt.py``
(``AdaptEmbTrainer._split_freq_rare``, ``get_embed_layer``), ``models/load_data.py``
(``get_frequency_counter``, ``_binary_search_frequency``, ``get_single_frequency_split``,
``remap_split_frequency``), ``methods/scheduler/base.py`` (initializer), ``run_compressed.py``
(``top_percent: 0.1``, ``exact_split: 0``, ``threshold: 0``, ``use_multi = 1`` for adapt);
``src/ops/CompressedEmbedding.cu`` (``mod_hash_negative_kernel``), ``src/ops/EmbeddingLookup.cu``
(a negative index reads zeros). Not AdaEmbed (Lai et al., OSDI 2023; recbench's ``adaembed``).

Mechanism (per field, ``use_multi = 1``): counts c_i of every id on the training split
(``TableSpec.counts``); nhigh = n * top_percent (a float); k* = the artifact's binary search over
thresholds in [min c, max c + 1) (the largest k with #{c_i >= k} >= nhigh, or one with exactly nhigh);
frequent ids: c_i >= k* (all ties kept; ``exact_split: true`` keeps exactly round(nhigh), dropping
random ids of count k*). The remap numbers frequent ids 0..F-1 and the others -1, -2, ... in id
order; a frequent id reads its exclusive row, a rare id of rare rank j (0-based, id order) reads
shared row j mod R (Hetu's ``mod_hash_negative``; the other lookup reads zeros, so the sum is the one
row). Here both tables are one FBGEMM table [F exclusive | R shared rows] and the remap is the
equivalent rank query on a frequent-id bitmap: row = rank1(id) for frequent ids, else
F + ((id - rank1(id)) mod R) — identical rows, vectorised.

Split from the budget (``_split_freq_rare``): with rate c, F = #frequent and R = ceil(n c) - F; a
field keeps its full (n, D) table unless R > 0 and F + R < n. c is the largest rate whose bytes
fit the budget (the artifact uses c = ratio and does not count the remap). ``top_percent: auto`` is
min(0.1, ratio / 2): the artifact's 0.1 where it runs (it asserts top_percent < compress_rate; its
README varies top_percent by budget without listing the values).

Budget: inference bytes = sum_f rows_f D 4 (F + R per compressed field, n otherwise) + the remap:
one bit per id of the compressed fields + one int32 rank per 64 ids. Training bytes add the fused
optimizer state. Initialisation (``scheduler/base.py``): every table U(+-sqrt(1 / max_f n_f)).

Shapes: KJT (F keys, B bags) -> ids rewritten to table rows -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.base import CompressionMethod, QuantizeSettings
from recbench.methods.blocks.budget import bisect_continuous, land, split_tables, target_bytes
from recbench.methods.blocks.per_id import value_fields, with_values
from recbench.methods.blocks.tables import FusedIdMapEmbedding, FusedTables, PhysicalTable, table_memory
from recbench.methods.families.product_quantization import HeadIndex, group_map_bytes
from recbench.types import Budget, EmbeddingOptimizer, MemoryReport, Plan, TableSpec

#: the artifact's ``top_percent`` (run_compressed.py) and the cap of ``top_percent: auto``
ARTIFACT_TOP_PERCENT = 0.1
#: margin inside each segment of the rate c where the set of compressed fields is constant
_EDGE = 1e-9


# ----------------------------------------------------------------------------- the artifact's split
def training_counts(table: TableSpec) -> np.ndarray:
    """(n,) int64 training-split counts of ``table``; a clear error when the protocol gave none."""
    if table.counts is None:
        raise ValueError(f"method 'adapt' picks frequent ids by training frequency, but field {table.name!r} has no "
                         "counts (TableSpec.counts); allowed: a protocol that records training-split counts")
    return np.asarray(table.counts, dtype=np.int64)


def frequency_threshold(counts: np.ndarray, nhigh: float) -> int:
    """k*: the artifact's ``_binary_search_frequency`` over [min c, max c + 1), iteratively."""
    left, right = int(counts.min()), int(counts.max()) + 1
    while left < right - 1:
        middle = (left + right) // 2
        above = int((counts >= middle).sum())
        if above > nhigh:
            left = middle
        elif above < nhigh:
            right = middle
        else:
            return middle
    return left


def frequent_mask(counts: np.ndarray, top_percent: float, exact_split: bool = False, split_seed: int = 0) -> np.ndarray:
    """(n,) bool: the frequent ids of one field (``get_single_frequency_split``)."""
    nhigh = len(counts) * float(top_percent)
    kth = frequency_threshold(counts, nhigh)
    mask = counts >= kth
    if exact_split:
        target, current = round(nhigh), int(mask.sum())
        rng = np.random.default_rng(int(split_seed))
        if current < target:
            extra = rng.choice(np.flatnonzero(counts == kth - 1), size=target - current, replace=False)
            mask[extra] = True
        elif current > target:
            drop = rng.choice(np.flatnonzero(counts == kth), size=current - target, replace=False)
            mask[drop] = False
    return mask


def split_rows(num_embeddings: int, frequent: int, rate: float) -> Tuple[int, int, bool]:
    """(F, R, compressed) of ``_split_freq_rare`` + ``get_embed_layer``: R = ceil(n c) - F; the field
    is compressed iff R > 0 and F + R < n (else it keeps its n rows)."""
    rare = math.ceil(num_embeddings * rate) - frequent
    return frequent, rare, rare > 0 and frequent + rare < num_embeddings


def row_map(mask: np.ndarray, frequent: int, rare: int) -> np.ndarray:
    """(n,) int64 reference rows of one compressed field (the remap as a plain array; tests and docs)."""
    ranks = np.cumsum(mask) - mask  # frequent ids before each id
    return np.where(mask, ranks, frequent + (np.arange(mask.size) - ranks) % rare)


def top_percent_for(setting: Any, ratio: float) -> float:
    """``auto``: min(0.1, ratio / 2); otherwise the given fraction."""
    return min(ARTIFACT_TOP_PERCENT, float(ratio) / 2) if setting == "auto" else float(setting)


# ----------------------------------------------------------------------------- module
class AdaptEmbedding(FusedIdMapEmbedding):
    """Per-field [exclusive | shared] FBGEMM tables and the frequent-id bitmap remap.
    forward: KJT (F keys, B bags) -> KeyedTensor (B, F * D).

    Args:
        fields: {name: (F, R)} of the compressed fields (others keep n rows, looked up by id).
        masks: {name: (n,) bool frequent ids} of the compressed fields.
    """

    def __init__(self, tables: Sequence[TableSpec], dim: int, fields: Mapping[str, Tuple[int, int]],
                 masks: Mapping[str, np.ndarray], optimizer: EmbeddingOptimizer):
        super().__init__(tables, dim)
        self.fields = {k: (int(v[0]), int(v[1])) for k, v in fields.items()}
        self.field_index = {t.name: i for i, t in enumerate(self.tables)}
        start, head_start, freq, rare, compressed, bits = [], [], [], [], [], []
        offset = heads = 0
        for t in self.tables:
            f, r = self.fields.get(t.name, (0, 1))
            start.append(offset)
            head_start.append(heads)
            freq.append(f)
            rare.append(r)
            compressed.append(t.name in self.fields)
            if t.name in self.fields:
                mask = np.asarray(masks[t.name], dtype=bool)
                if int(mask.sum()) != f or mask.size != t.num_embeddings:
                    raise ValueError(f"adapt: field {t.name!r} has {int(mask.sum())} frequent ids, the plan says {f}")
                bits.append(torch.from_numpy(mask))
                offset += t.num_embeddings
                heads += f
        # table metadata (derived from the shapes): 0 bytes, rebuilt from the plan
        for name, values in (("start", start), ("head_start", head_start), ("freq", freq), ("rare", rare)):
            self.register_buffer(name, torch.tensor(values, dtype=torch.int64), persistent=False)
        self.register_buffer("compressed", torch.tensor(compressed, dtype=torch.bool), persistent=False)
        self.any_compressed = bool(bits)
        # the remap (deployable): bitmap of frequent ids + one int32 rank per 64 ids
        self.remap = HeadIndex(torch.cat(bits)) if bits else None
        layout = [PhysicalTable(t.name, sum(self.fields[t.name]) if t.name in self.fields else t.num_embeddings,
                                dim, [t.name], t.pooling) for t in self.tables]
        self.fused = FusedTables(layout, optimizer)
        self._reference_init()

    @torch.no_grad()
    def _reference_init(self) -> None:
        """``scheduler/base.py``: every table U(+-sqrt(1 / max_f n_f)) (torch's seeded RNG)."""
        bound = (1.0 / max(t.num_embeddings for t in self.tables)) ** 0.5
        for table in self.fused.physical:
            weight = self.fused.weight(table.name)
            weight.copy_(torch.empty_like(weight).uniform_(-bound, bound))

    def rows_of(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """(N,) table row of every value: exclusive rank or F + (rare rank mod R); the id for full fields."""
        ids = features.values().long()
        if not self.any_compressed:
            return ids
        fields = value_fields(features, self.field_index)
        use = self.compressed[fields]
        f = fields[use]
        is_freq, slot = self.remap.slots(ids[use] + self.start[f])
        freq_rank = slot - self.head_start[f]
        rare_rank = slot - (self.start[f] - self.head_start[f])
        rows = ids.clone()
        rows[use] = torch.where(is_freq, freq_rank, self.freq[f] + torch.remainder(rare_rank, self.rare[f]))
        return rows

    def rewrite(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        return with_values(features, self.rows_of(features))

    def remap_bytes(self) -> int:
        if self.remap is None:
            return 0
        return sum(b.numel() * b.element_size() for b in (self.remap.bitmap, self.remap.ranks))

    def memory_report(self) -> MemoryReport:
        return self.tables_report(remap=self.remap_bytes())


# ----------------------------------------------------------------------------- method
@dataclass
class AdaptSettings(QuantizeSettings):
    """Hyperparameters of ``adapt`` (defaults: the VLDB 2024 artifact's ``adapt``)."""

    #: share of each field's ids that are frequent (nhigh = n * top_percent): auto = min(0.1, ratio / 2)
    #: (the artifact's 0.1, below the ratio it asserts) | a fraction in (0, 1)
    top_percent: Any = "auto"
    #: false (artifact default): every id tied at the threshold count is frequent | true: exactly
    #: round(n * top_percent), ties dropped at random (seeded by split_seed)
    exact_split: bool = False
    split_seed: int = 0  #: seed of exact_split's tie-breaking


class Adapt(CompressionMethod):
    """DeepRec's Adaptive Embedding (Hetu's ``adapt``); hyperparameters: ``AdaptSettings``."""

    name = "adapt"
    settings_class = AdaptSettings
    table_backed = True

    def check_settings(self) -> None:
        t = self.top_percent
        if t != "auto":
            try:
                ok = not isinstance(t, bool) and 0 < float(t) < 1
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"method 'adapt': top_percent={t!r}; allowed: 'auto' or a fraction in (0, 1)")
        if not isinstance(self.exact_split, bool):
            raise ValueError(f"method 'adapt': exact_split={self.exact_split!r}; allowed: true, false")
        if isinstance(self.split_seed, bool) or not isinstance(self.split_seed, int):
            raise ValueError(f"method 'adapt': split_seed={self.split_seed!r}; allowed: an integer")

    def masks(self, tables: Sequence[TableSpec], names: Sequence[str], top_percent: float) -> Dict[str, np.ndarray]:
        """{name: (n,) bool frequent ids} of the named fields (seeded per field for exact_split)."""
        named = set(names)
        return {t.name: frequent_mask(training_counts(t), top_percent, self.exact_split, self.split_seed + i)
                for i, t in enumerate(tables) if t.name in named}

    @staticmethod
    def fields_at(candidates: Sequence[TableSpec], frequent: Mapping[str, int], rate: float) -> Dict[str, List[int]]:
        """{name: [F, R]} of the fields compressed at rate c."""
        out = {}
        for t in candidates:
            f, r, ok = split_rows(t.num_embeddings, frequent[t.name], rate)
            if ok:
                out[t.name] = [f, r]
        return out

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        candidates, _ = split_tables(tables, budget)
        top_percent = top_percent_for(self.top_percent, budget.compression_ratio)
        frequent = {k: int(v.sum()) for k, v in self.masks(tables, [t.name for t in candidates], top_percent).items()}
        limit = target_bytes(tables, dim, budget)

        def bytes_at(rate: float) -> int:
            return self.memory(tables, dim, {"fields": self.fields_at(candidates, frequent, rate)}).inference_bytes

        # the set of compressed fields changes only at F/n and (n-1)/n; bytes grow with c in between
        edges = sorted({0.0, 1.0} | {frequent[t.name] / t.num_embeddings for t in candidates}
                       | {(t.num_embeddings - 1) / t.num_embeddings for t in candidates})
        best, reachable = None, []
        for low, high in zip(edges[:-1], edges[1:]):
            if high - low <= 2 * _EDGE:
                continue
            low, high = low + _EDGE, high - _EDGE
            reachable += [bytes_at(low), bytes_at(high)]
            rate = bisect_continuous(bytes_at, low, high, limit)
            if bytes_at(rate) <= limit and (best is None or rate > best):
                best = rate
        reachable.append(bytes_at(1.0))
        rate = 1.0 if bytes_at(1.0) <= limit else best
        achieved = bytes_at(rate) if rate is not None else min(reachable)
        land(self.name, achieved, tables, dim, budget, min(reachable), max(reachable),
             "the frequent rows, one shared row and the remap already exceed the budget")
        return {"top_percent": top_percent, "rate": float(rate), "exact_split": self.exact_split,
                "split_seed": self.split_seed, "fields": self.fields_at(candidates, frequent, rate)}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        fields = hparams["fields"]
        layout = self.physical_tables(tables, dim, hparams)
        ids = sum(t.num_embeddings for t in tables if t.name in fields)
        return table_memory(layout, tables, dim, optimizer, remap=group_map_bytes(ids) if ids else 0)

    def physical_tables(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any]) -> List[PhysicalTable]:
        fields = hparams["fields"]
        return [PhysicalTable(t.name, sum(fields[t.name]) if t.name in fields else t.num_embeddings, dim, [t.name])
                for t in tables]

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> AdaptEmbedding:
        hparams = plan.hparams
        fields = {k: tuple(v) for k, v in hparams["fields"].items()}
        masks = self.masks(tables, list(fields), float(hparams["top_percent"]))
        return AdaptEmbedding(tables, dim, fields, masks, optimizer)
