"""``freq_prune``: frequency-based row pruning — the most frequent ids keep their rows, the rest share the OOV row.

References: reczoo/FuxiCTR ``fuxictr/preprocess/feature_processor.py`` (``fit_categorical_col``,
``min_categr_count``) and ``fuxictr/preprocess/tokenizer.py`` (``Tokenizer.build_vocab``: a token
enters the vocabulary iff its training count >= ``min_freq``; every other value encodes to
``__OOV__``) at 0245987fdc1d43c36164ea496a02324885a8557a; BARS's rare-feature filtering
(``min_categr_count``, reczoo/BARS ``docs/CTR/leaderboard/criteo_x4.md``: 10 on Criteo_x4_001);
pytorch/torchrec ``torchrec/modules/embedding_configs.py`` (``num_embeddings_post_pruning``) and
``torchrec/quant/embedding_modules.py`` at a48cef79ebc333da92af1311c04b041ee21a8e75; FBGEMM
``IntNBitTableBatchedEmbeddingBagsCodegen`` index remapping (``torch.ops.fbgemm.pruned_array_lookup``).

Mechanism: one frequency threshold t for every compressed field (FuxiCTR's single
``min_categr_count``). In field f, id i != 0 keeps a row iff its training count
(``TableSpec.counts``, training split only) is >= t; the k_f kept ids get rows 1..k_f in id order,
and row 0 — the OOV row — is shared by the protocol's OOV id 0 and every pruned id. The table has
1 + k_f rows (TorchRec's ``num_embeddings_post_pruning``); it is trained from the start on the
pruned vocabulary, as FuxiCTR trains on the vocabulary its tokenizer kept.
The id -> row map is FBGEMM's array remap: one int32 entry per id of the field, applied to the
KJT's values by ``torch.ops.fbgemm.pruned_array_lookup`` (measured to run on fbgemm-gpu-cpu 1.8.0)
in training and in the deployable form. A field that keeps every id (k_f = n_f - 1) is the identity
and holds no remap; a field that keeps none (k_f = 0) maps every id to row 0 and holds no remap either.

Budget: inference bytes = sum_f (1 + k_f) D 4 + 4 sum_{f remapped} n_f (+ fields below
``budget.min_rows_to_compress`` in full). ``threshold: auto`` is the smallest t (the most ids kept)
whose bytes fit; bytes are not monotone in t (a field that becomes fully kept drops its remap), so
every distinct count is tried. ``allocation: per_field`` (recbench's variant) keeps the same fraction r
of every field instead (its floor(r (n_f - 1)) most frequent ids), r bisected in [0, 1) unless the full
tables fit. Infeasible only when even one OOV row per compressed field exceeds the target.

Shapes: KJT (F keys, B bags) -> ids rewritten to rows (FBGEMM remap) -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # (its import loads fbgemm_gpu: torch.ops.fbgemm)

from recbench.methods.base import CompressionMethod, QuantizeSettings
from recbench.methods.blocks.budget import bisect_continuous, kept_bytes, land, split_tables, target_bytes
from recbench.methods.blocks.per_id import with_values
from recbench.methods.blocks.tables import (FusedIdMapEmbedding, FusedTables, PhysicalTable, table_memory)
from recbench.methods.mixed_dim import frequency_order
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, Plan, TableSpec, full_embedding_bytes

REMAP_BYTES = 4  # FBGEMM's index_remappings_array entry (int32) per id of a remapped field


# ----------------------------------------------------------------------------- pure helpers
def training_counts(table: TableSpec) -> np.ndarray:
    """(n,) int64 training-split counts of ``table``; a clear error when the protocol gave none."""
    if table.counts is None:
        raise ValueError(f"method 'freq_prune' keeps ids by training frequency, but field {table.name!r} has no "
                         "counts (TableSpec.counts); allowed: a protocol that records training-split counts")
    return np.asarray(table.counts, dtype=np.int64)


def fraction_kept(num_embeddings: int, fraction: float) -> int:
    """k_f = floor(r (n_f - 1)) ids kept of a field under ``allocation: per_field``."""
    return int(np.floor(float(fraction) * (num_embeddings - 1) + 1e-9))


def kept_ids(table: TableSpec, rule: Mapping[str, Any]) -> np.ndarray:
    """Ascending kept ids (never id 0, the OOV row itself) of ``table`` under ``rule``:
    ``{"threshold": t}``: training count >= t (FuxiCTR's min_freq); ``{"fraction": r}``: the
    floor(r (n - 1)) most frequent ids (ties by id, ``mixed_dim.frequency_order``)."""
    counts = training_counts(table)
    if "fraction" in rule:
        order = frequency_order(table)
        return np.sort(order[order != 0][: fraction_kept(table.num_embeddings, rule["fraction"])])
    keep = counts >= int(rule["threshold"])
    keep[0] = False
    return np.flatnonzero(keep)


def field_layout(num_embeddings: int, kept: int) -> str:
    """``full`` (every id kept: identity, no remap), ``oov_only`` (none kept: all ids -> row 0, no
    remap) or ``remapped`` (an int32 remap of n entries)."""
    if kept == num_embeddings - 1:
        return "full"
    return "oov_only" if kept == 0 else "remapped"


def row_map(table: TableSpec, rule: Mapping[str, Any]) -> np.ndarray:
    """(n,) int32: the row of every id — 1..k for kept ids in id order, 0 for id 0 and pruned ids."""
    rows = np.zeros(table.num_embeddings, dtype=np.int32)
    ids = kept_ids(table, rule)
    rows[ids] = np.arange(1, ids.size + 1, dtype=np.int32)
    return rows


def plan_fields(tables: Sequence[TableSpec], compressed: Sequence[str], rule: Mapping[str, Any]) -> Dict[str, Dict[str, Any]]:
    """{field: {"rows", "layout"}} of the compressed fields under ``rule`` (see ``kept_ids``)."""
    names = set(compressed)
    out = {}
    for t in tables:
        if t.name in names:
            k = int(kept_ids(t, rule).size)
            out[t.name] = {"rows": 1 + k, "layout": field_layout(t.num_embeddings, k)}
    return out


def physical(tables: Sequence[TableSpec], dim: int, fields: Mapping[str, Mapping[str, Any]]) -> List[PhysicalTable]:
    """One table per field: 1 + k_f rows when compressed, n_f otherwise."""
    return [PhysicalTable(t.name, int(fields[t.name]["rows"]) if t.name in fields else t.num_embeddings, dim,
                          [t.name], t.pooling) for t in tables]


def remap_entries(tables: Sequence[TableSpec], fields: Mapping[str, Mapping[str, Any]]) -> int:
    return sum(t.num_embeddings for t in tables if t.name in fields and fields[t.name]["layout"] == "remapped")


def threshold_bytes(tables: Sequence[TableSpec], compressed: Sequence[TableSpec], dim: int,
                    candidates: np.ndarray) -> np.ndarray:
    """Inference bytes at every threshold of ``candidates`` (vectorised over thresholds)."""
    names = {t.name for t in compressed}
    kept = [t for t in tables if t.name not in names]
    total = np.full(candidates.shape, kept_bytes(kept, dim), dtype=np.int64)
    for t in compressed:
        counts = training_counts(t)[1:]
        k = counts.size - np.searchsorted(np.sort(counts), candidates, side="left")
        remapped = (k > 0) & (k < t.num_embeddings - 1)
        total += (1 + k) * dim * FP32_BYTES + remapped * REMAP_BYTES * t.num_embeddings
    return total


# ----------------------------------------------------------------------------- module
class FreqPruneEmbedding(FusedIdMapEmbedding):
    """Pruned per-field tables + FBGEMM's index remap. forward: KJT (F keys, B bags) -> KeyedTensor (B, F * D).

    Args:
        rule: ``{"threshold": t}`` (ids with training count >= t keep a row) or ``{"fraction": r}``.
        compressed: fields pruned by the rule (others keep one row per id).
    """

    def __init__(self, tables: Sequence[TableSpec], dim: int, rule: Mapping[str, Any], compressed: Sequence[str],
                 optimizer: EmbeddingOptimizer):
        super().__init__(tables, dim)
        self.rule = dict(rule)
        self.fields = plan_fields(self.tables, compressed, self.rule)
        segments, offsets, oov_only = [], [0], []
        for t in self.tables:
            layout = self.fields.get(t.name, {"layout": "full"})["layout"]
            if layout == "remapped":
                segments.append(torch.from_numpy(row_map(t, self.rule)))
            offsets.append(offsets[-1] + (t.num_embeddings if layout == "remapped" else 0))  # empty: identity
            oov_only.append(layout == "oov_only")
        # persistent: the deployable form's remap (FBGEMM's index_remappings_array, int32)
        self.register_buffer("remap", torch.cat(segments) if segments else torch.zeros(0, dtype=torch.int32))
        self.register_buffer("remap_offsets", torch.tensor(offsets, dtype=torch.int64), persistent=False)
        self.register_buffer("oov_only", torch.tensor(oov_only, dtype=torch.bool), persistent=False)
        self.any_oov_only = any(oov_only)
        self.fused = FusedTables(physical(self.tables, dim, self.fields), optimizer)

    def rewrite(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        if features.keys() != self.feature_names:  # FBGEMM's remap reads segments in table order
            features = features.permute([features.keys().index(name) for name in self.feature_names])
        if features.variable_stride_per_key():
            raise ValueError("freq_prune: a KJT with a variable batch size per key is not supported "
                             "(FBGEMM's pruned_array_lookup needs one stride B for every key)")
        values = features.values()
        if self.remap.numel():
            values = torch.ops.fbgemm.pruned_array_lookup(values, features.offsets().to(values.dtype), self.remap,
                                                          self.remap_offsets)
        if self.any_oov_only:
            keep = torch.repeat_interleave(~self.oov_only, torch.tensor(features.length_per_key()))
            values = values * keep.to(values.dtype)
        return with_values(features, values)

    def memory_report(self) -> MemoryReport:
        return self.tables_report(remap=self.remap.numel() * self.remap.element_size())


# ----------------------------------------------------------------------------- method
@dataclass
class FreqPruneSettings(QuantizeSettings):
    """Hyperparameters of ``freq_prune`` (default: FuxiCTR's one min_categr_count, solved from the budget)."""

    #: auto: the smallest count threshold t whose bytes fit the budget | an integer >= 1: a fixed
    #: FuxiCTR min_categr_count (BARS Criteo_x4_001: 10), refused when it exceeds the budget
    threshold: Any = "auto"
    #: global_threshold: one count threshold for every field (FuxiCTR/BARS) | per_field: the same
    #: fraction r of each field's ids (its floor(r (n_f - 1)) most frequent), r solved (recbench's variant)
    allocation: str = "global_threshold"


class FreqPrune(CompressionMethod):
    """Frequency-based row pruning; hyperparameters: ``FreqPruneSettings``."""

    name = "freq_prune"
    settings_class = FreqPruneSettings
    table_backed = True

    ALLOCATIONS = ("global_threshold", "per_field")

    def check_settings(self) -> None:
        if self.allocation not in self.ALLOCATIONS:
            raise ValueError(f"method 'freq_prune': allocation={self.allocation!r}; allowed: {', '.join(self.ALLOCATIONS)}")
        t = self.threshold
        if t != "auto" and self.allocation == "per_field":
            raise ValueError(f"method 'freq_prune': threshold={t!r} needs allocation=global_threshold; allowed "
                             "with per_field: threshold=auto")
        if t != "auto" and (isinstance(t, bool) or not isinstance(t, int) or t < 1):
            raise ValueError(f"method 'freq_prune': threshold={t!r}; allowed: 'auto' or an integer >= 1 "
                             "(the minimum training count of a kept id)")

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        if self.allocation == "per_field":
            return self.solve_fraction(tables, dim, budget)
        compressed, _ = split_tables(tables, budget)
        limit = target_bytes(tables, dim, budget)
        counts = [training_counts(t)[1:] for t in compressed]
        top = max((int(c.max()) for c in counts if c.size), default=0) + 1  # keeps no id
        candidates = np.unique(np.concatenate([np.maximum(c, 1) for c in counts] + [np.array([1, top])]))
        candidates = candidates[candidates <= top]
        if self.threshold != "auto":
            candidates = np.union1d(candidates, [int(self.threshold)])
        bytes_at = threshold_bytes(tables, compressed, dim, candidates)
        lowest, highest = int(bytes_at.min()), int(bytes_at.max())
        if self.threshold != "auto":
            threshold = int(self.threshold)
            achieved = int(bytes_at[np.searchsorted(candidates, threshold)])
            reason = f"threshold={threshold} needs ratio {achieved / full_embedding_bytes(tables, dim):.4g}"
        else:
            fits = np.flatnonzero(bytes_at <= limit)
            pick = int(fits[0]) if fits.size else int(np.argmin(bytes_at))
            threshold, achieved = int(candidates[pick]), int(bytes_at[pick])
            reason = "one OOV row per compressed field already exceeds the budget"
        land(self.name, achieved, tables, dim, budget, lowest, highest, reason)
        return self._hparams(tables, [t.name for t in compressed], {"threshold": threshold})

    def solve_fraction(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        """``allocation: per_field``: r = 1 (every id kept, no remap) when it fits, else the largest r in
        [0, 1) whose bytes fit — below 1 the bytes are non-decreasing in r, so r is bisected."""
        compressed, _ = split_tables(tables, budget)
        names = [t.name for t in compressed]
        limit = target_bytes(tables, dim, budget)

        def bytes_at(fraction: float) -> int:
            return self.memory(tables, dim, {"compressed": names, "fraction": fraction}).inference_bytes

        below_one = np.nextafter(1.0, 0.0)
        fraction = 1.0 if bytes_at(1.0) <= limit else bisect_continuous(bytes_at, 0.0, below_one, limit)
        land(self.name, bytes_at(fraction), tables, dim, budget, bytes_at(0.0), max(bytes_at(1.0), bytes_at(below_one)),
             "one OOV row per compressed field already exceeds the budget")
        return {"allocation": "per_field", **self._hparams(tables, names, {"fraction": float(fraction)})}

    @staticmethod
    def _hparams(tables: Sequence[TableSpec], names: List[str], rule: Mapping[str, Any]) -> Dict[str, Any]:
        fields = plan_fields(tables, names, rule)
        return {**rule, "compressed": names, "kept_rows": {name: f["rows"] for name, f in fields.items()},
                "remapped": [name for name, f in fields.items() if f["layout"] == "remapped"]}

    @staticmethod
    def rule(hparams: Mapping[str, Any]) -> Dict[str, Any]:
        """The kept-id rule of solved hparams: {"fraction": r} or {"threshold": t}."""
        return {"fraction": float(hparams["fraction"])} if "fraction" in hparams else {"threshold": int(hparams["threshold"])}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        fields = plan_fields(tables, hparams["compressed"], self.rule(hparams))
        layout = self.physical_tables(tables, dim, hparams)
        return table_memory(layout, tables, dim, optimizer, remap=REMAP_BYTES * remap_entries(tables, fields))

    def physical_tables(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any]) -> List[PhysicalTable]:
        return physical(tables, dim, plan_fields(tables, hparams["compressed"], self.rule(hparams)))

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> FreqPruneEmbedding:
        return FreqPruneEmbedding(tables, dim, self.rule(plan.hparams), plan.hparams["compressed"], optimizer)
