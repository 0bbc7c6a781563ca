"""``dedup``: embedding deduplication — similar blocks of rows stored once, then fine-tuned.

References: Xie, Zhou, Zou, Yang, Zhou, Chen, Cui, "Serving Deep Learning Models with Deduplication
from Relational Databases", VLDB 2022; as benchmarked ("dedup") in Zhang et al., "Experimental
Analysis of Large-scale Learnable Vector Storage Compression", VLDB 2024: Hsword/Hetu
``tools/EmbeddingMemoryCompression/methods/scheduler/deduplication.py``, ``methods/layers/
deduplication.py`` and ``run_compressed.py`` at a1cb1bcaf236c9f1d452733b105997d50c16c9df.

Mechanism (``algorithm: hetu``, the default, as the reference with ``use_multi = 0``): the
compressed fields are one global table of R = sum_f n_f rows (field f's id x is global row
offset_f + x), initialised U(-1/sqrt(max_f n_f), +1/sqrt(max_f n_f)). Stage ``pretrain`` trains it;
at its end the best validation checkpoint is restored and the table, cut into blocks of
``block_rows`` consecutive global rows (the last one zero-padded), is deduplicated by
``recbench.methods.blocks.dedup_lsh.deduplicate_blocks`` (L2 LSH r = ``lsh_r``, ``lsh_l`` tables of
``lsh_k`` hashes; a block merges into an earlier-visited candidate when at least ``sim`` of its
elements differ by at most ``fp``; one representative kept; stop at the budget's block count, the
rest merged nearest first when the criterion runs out). ``rebuild`` then stores only the kept
blocks plus an int32 block index, and stage ``finetune`` trains the stored blocks (fused FBGEMM
table: a stored row's gradient is the sum over every row that reads it). Lookup of global row g:
stored row index[g // r] * r + g % r.
``algorithm: simhash_mean`` (recbench's earlier variant) trains as ``full``, and ``to_inference``
merges per-field blocks by cosine SimHash into group means, without fine-tuning (see
``SimHashDedupEmbedding``).

Budget (both): inference bytes = unique_blocks * block_rows * D * 4 + 4 * (number of blocks)
+ kept fields in full; blocks = ceil(R / r) (hetu: global table) or sum_f ceil(n_f / r)
(simhash_mean: per field). ``unique_blocks`` is the largest count that fits. ``block_rows: auto``:
hetu takes the reference's 10,000 rows when that lands within the budget's tolerance; otherwise
(and always for simhash_mean) the smallest r <= 10,000 (simhash_mean: <= the largest field) whose
index costs at most ``index_share`` of the budget and which lands, else the smallest that lands,
else the r with the most bytes under the budget. Training bytes: pre-training's global table and
optimizer state (the peak).

Shapes: KJT (F keys, B bags) -> ids rewritten to stored rows -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods.base import CompressionMethod, Hook, InfeasibleBudget
from recbench.methods.blocks.budget import kept_bytes, split_tables, target_bytes
from recbench.methods.blocks.dedup_lsh import L2LSH, deduplicate_blocks
from recbench.methods.full import FullEmbedding
from recbench.methods.blocks.per_id import value_fields, with_values
from recbench.methods.blocks.tables import (FusedIdMapEmbedding, FusedTables, PhysicalTable, PooledCollection,
                                     closed_form_table_bytes, physical_tables)
from recbench.types import (FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, Plan, Stage,
                            TableSpec, full_embedding_bytes)

STORED = "dedup_blocks"
GLOBAL = "dedup_table"
INT32_BYTES = 4
ALGORITHMS = ("hetu", "simhash_mean")
#: the reference's block: ``block_cap = 10000 * dim`` elements, i.e. 10,000 rows (run_compressed.py)
REFERENCE_BLOCK_ROWS = 10000


# ----------------------------------------------------------------------------- hetu (default)
class DedupEmbedding(FusedIdMapEmbedding):
    """The global table of the compressed fields (+ kept fields' own tables), fused FBGEMM lookups.

    Pre-training form (``block_index`` None): R rows, global row offset_f + x. Deduplicated form:
    ``unique_blocks * block_rows`` stored rows read through ``block_index`` (blocks,) int32.
    forward: KJT (F keys, B bags) -> KeyedTensor (B, F * D).
    """

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
                 optimizer: EmbeddingOptimizer, block_index: Optional[torch.Tensor] = None,
                 peak_training_bytes: int = 0):
        super().__init__(tables, dim)
        self.hparams, self.optimizer_spec = dict(hparams), optimizer
        compressed = set(self.hparams["compressed"])
        self.field_index = {t.name: i for i, t in enumerate(self.tables)}
        self.compressed_names = [t.name for t in self.tables if t.name in compressed]
        self.kept_tables = [t for t in self.tables if t.name not in compressed]
        rows = torch.tensor([t.num_embeddings if t.name in compressed else 0 for t in self.tables], dtype=torch.int64)
        self.register_buffer("row_offset", torch.cumsum(rows, 0) - rows, persistent=False)
        self.register_buffer("is_compressed", torch.tensor([t.name in compressed for t in self.tables]),
                             persistent=False)
        self.total_rows, self.block_rows = int(rows.sum()), int(self.hparams["block_rows"])
        self.num_blocks = math.ceil(self.total_rows / self.block_rows)
        self.deduplicated = block_index is not None
        self.peak_training_bytes = int(peak_training_bytes)
        if self.deduplicated:
            self.register_buffer("block_index", block_index.to(torch.int32))
        stored_rows = int(self.hparams["unique_blocks"]) * self.block_rows if self.deduplicated else self.total_rows
        physical = ([PhysicalTable(STORED if self.deduplicated else GLOBAL, stored_rows, dim, self.compressed_names)]
                    if self.compressed_names else []) + \
            [PhysicalTable(t.name, t.num_embeddings, dim, [t.name], t.pooling) for t in self.kept_tables]
        self.fused = FusedTables(physical, optimizer, seed_init=False)
        self.fused.mean_features = [t.name for t in self.tables if t.pooling == "mean"]  # the shared table mixes poolings
        if not self.deduplicated:
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's single-table init U(-b, b), b = sqrt(1 / max_f n_f) (scheduler/base.py);
        kept fields: U(-1/sqrt(n), 1/sqrt(n)) as ``full``. Drawn from torch's global RNG."""
        bound = 1.0 / max(max(t.num_embeddings for t in self.tables), 1) ** 0.5
        with torch.no_grad():
            for p in self.fused.physical:
                b = bound if p.name in (GLOBAL, STORED) else 1.0 / max(p.rows, 1) ** 0.5
                w = self.fused.weight(p.name)
                w.copy_(torch.empty_like(w).uniform_(-b, b))

    def rewrite(self, features: KeyedJaggedTensor) -> KeyedJaggedTensor:
        fields = value_fields(features, self.field_index)
        ids = features.values().long()
        compressed = self.is_compressed[fields]
        rows = torch.where(compressed, self.row_offset[fields] + ids, torch.zeros_like(ids))  # kept fields: no block
        if self.deduplicated:
            rows = self.block_index[torch.div(rows, self.block_rows, rounding_mode="floor")].long() * self.block_rows \
                + rows % self.block_rows
        return with_values(features, torch.where(compressed, rows, ids))

    def combine(self, looked_up: KeyedTensor, features: KeyedJaggedTensor) -> KeyedTensor:
        if looked_up.keys() == self.feature_names:
            return looked_up
        blocks = looked_up.to_dict()
        return self.keyed_output(torch.cat([blocks[n] for n in self.feature_names], dim=1))

    # ----- deduplication -----
    def global_weight(self) -> torch.Tensor:
        """(R, D) the pre-trained global table (a copy)."""
        return self.fused.weight(GLOBAL).detach().clone()

    def lsh(self) -> L2LSH:
        h = self.hparams
        return L2LSH(self.block_rows * self.dim, h["lsh_r"], h["lsh_l"], h["lsh_k"], h["lsh_seed"])

    def blocks(self) -> Tuple[np.ndarray, int]:
        """(blocks (n, r * D) float32 of the global table, real elements of the last block)."""
        weight = self.global_weight()
        pad = -self.total_rows % self.block_rows
        padded = torch.cat([weight, weight.new_zeros(pad, self.dim)]) if pad else weight
        return padded.reshape(self.num_blocks, -1).numpy(), (self.block_rows - pad) * self.dim

    def dedup_result(self) -> Dict[str, Any]:
        """Deduplicate the pre-trained table: {"block_index", "representatives", counts}."""
        if self.deduplicated or not self.compressed_names:
            raise RuntimeError("dedup: only the pre-training form of a table with compressed fields is deduplicated")
        blocks, valid_last = self.blocks()
        h = self.hparams
        index, representatives, stats = deduplicate_blocks(blocks, valid_last, int(h["unique_blocks"]), self.lsh(),
                                                           float(h["fp"]), float(h["sim"]), int(h["lsh_threshold"]))
        return {"block_index": torch.from_numpy(index), "representatives": torch.from_numpy(representatives), **stats}

    def deduplicated_copy(self, block_index: torch.Tensor, representatives: torch.Tensor) -> "DedupEmbedding":
        """The fine-tuning form: stored blocks = this table's ``representatives`` blocks."""
        copy_ = DedupEmbedding(self.tables, self.dim, self.hparams, self.optimizer_spec, block_index,
                               self.memory_report().training_bytes)
        blocks, _ = self.blocks()
        with torch.no_grad():
            copy_.fused.weight(STORED).copy_(torch.from_numpy(blocks[representatives.long().numpy()]).reshape(-1, self.dim))
            for t in self.kept_tables:
                copy_.fused.weight(t.name).copy_(self.fused.weight(t.name))
        return copy_

    def inference_error_bound(self, features: KeyedJaggedTensor) -> float:
        """Stated max |to_inference() - this module| over ``features``: 0 once deduplicated; before,
        the largest per-element change of a field's rows by the merge times its largest bag."""
        if self.deduplicated or not self.compressed_names:
            return 0.0
        result = self.dedup_result()
        blocks, _ = self.blocks()
        merged = blocks[result["representatives"].numpy()][result["block_index"].numpy()]
        change = torch.from_numpy(np.abs(merged - blocks).reshape(-1, self.dim)[: self.total_rows]).amax(1)
        bound = 0.0
        for t in self.tables:
            if t.name not in self.compressed_names or not t.num_embeddings:
                continue
            start = int(self.row_offset[self.field_index[t.name]])
            lengths = features[t.name].lengths()
            bag = 1 if t.pooling == "mean" or not len(lengths) else max(int(lengths.max()), 1)
            bound = max(bound, bag * float(change[start:start + t.num_embeddings].max()))
        return bound

    def to_inference(self) -> nn.Module:
        if not self.deduplicated and self.compressed_names:
            result = self.dedup_result()
            return self.deduplicated_copy(result["block_index"], result["representatives"]).to_inference()
        return super().to_inference()

    def memory_report(self) -> MemoryReport:
        weights = self.fused.weight_bytes()
        index = self.block_index.numel() * self.block_index.element_size() if self.deduplicated else 0
        kept = sum(self.fused.weight(t.name).numel() * self.fused.weight(t.name).element_size() for t in self.kept_tables)
        if self.deduplicated or not self.compressed_names:
            inference = weights + index
        else:  # the tensors the deduplicated form will hold
            inference = int(self.hparams["unique_blocks"]) * self.block_rows * self.dim * FP32_BYTES \
                + INT32_BYTES * self.num_blocks + kept
        training = max(weights + self.fused.optimizer_state_bytes() + index, self.peak_training_bytes)
        return MemoryReport(
            inference_bytes=int(inference), training_bytes=int(training),
            parameters=sum(p.numel() for p in self.fused.fused_parameters()),
            full_bytes=full_embedding_bytes(self.tables, self.dim),
            breakdown={"deduplicated": int(inference - kept), "kept": int(kept)},
        )


class PretrainBestHook(Hook):
    """Stage ``pretrain``: keeps the best validation checkpoint (the trainer's rule: val AUC above the
    best + ``min_delta``), restores it at the stage end and deduplicates its table; the result
    ({"block_index", "representatives", counts}) is what ``rebuild`` builds the fine-tuning form from."""

    def __init__(self):
        self.best_auc, self.best_state = -math.inf, None

    def on_stage_start(self, context: Any) -> None:
        if context.stage.name == "pretrain":
            self.best_auc, self.best_state = -math.inf, None

    def on_eval_end(self, context: Any, metrics: Mapping[str, float]) -> Optional[bool]:
        if context.stage.name == "pretrain" and metrics["auc"] > self.best_auc + context.trainer.config.min_delta:
            self.best_auc = metrics["auc"]
            self.best_state = {k: v.detach().clone() for k, v in context.model.state_dict().items()}
        return None

    def on_stage_end(self, context: Any) -> Optional[Mapping[str, Any]]:
        if context.stage.name != "pretrain" or not context.embedding.compressed_names:
            return None
        if self.best_state is not None:  # absent after a resume inside the stage: the last weights are used
            context.model.load_state_dict(self.best_state)
        restored = self.best_state is not None
        self.best_state = None
        return {**context.embedding.dedup_result(), "restored_best": restored}


# ----------------------------------------------------------------------------- simhash_mean (post-training)
def candidate_pairs(unit: torch.Tensor, tables: int, bits: int, window: int, seed: int) -> np.ndarray:
    """(E, 2) int64 candidate block pairs from sorted SimHash signatures of ``unit`` (n, b)."""
    n = unit.shape[0]
    generator = torch.Generator().manual_seed(int(seed))
    pairs = []
    weights = (2 ** torch.arange(bits, dtype=torch.int64))
    for _ in range(tables):
        planes = torch.randn(bits, unit.shape[1], generator=generator, dtype=unit.dtype)
        projections = unit @ planes.T
        code = ((projections > 0).long() * weights).sum(1).numpy()
        order = np.lexsort((projections[:, 0].numpy(), code))  # equal signatures adjacent, ties by projection
        for w in range(1, min(window, n - 1) + 1):
            pairs.append(np.stack([order[:-w], order[w:]], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    pairs = np.sort(np.concatenate(pairs), axis=1)
    return np.unique(pairs, axis=0)


def deduplicate(blocks: torch.Tensor, unique: int, tables: int = 8, bits: int = 16, window: int = 4,
                seed: int = 0) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """Merge blocks (n, b) into ``unique`` groups; returns (group of each block (n,) int64,
    stored blocks (unique, b) = group means, similarity threshold = lowest cosine merged)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

    n = blocks.shape[0]
    unique = int(min(max(unique, 1), n))
    norms = blocks.norm(dim=1, keepdim=True)
    unit = torch.where(norms > 1e-12, blocks / norms.clamp(min=1e-12), torch.zeros_like(blocks))
    unit[norms.squeeze(1) <= 1e-12, 0] = 1.0  # all-zero blocks share one direction (they are identical)
    threshold = 1.0
    if unique < n:
        pairs = candidate_pairs(unit.double(), tables, bits, window, seed)
        cosine = (unit[pairs[:, 0]].double() * unit[pairs[:, 1]].double()).sum(1).clamp(-1, 1).numpy()
        graph = coo_matrix((2.0 - cosine, (pairs[:, 0], pairs[:, 1])), shape=(n, n)).tocsr()
        forest = minimum_spanning_tree(graph).tocoo()  # maximum-similarity spanning forest
        keep = np.argsort(forest.data, kind="stable")[: n - unique]
        merged = coo_matrix((np.ones(keep.size), (forest.row[keep], forest.col[keep])), shape=(n, n))
        count, labels = connected_components(merged, directed=False)
        if count != unique:
            raise RuntimeError(f"dedup: the candidate graph left {count} groups, expected {unique}")
        threshold = float(2.0 - forest.data[keep].max()) if keep.size else 1.0
        groups = torch.from_numpy(labels.astype(np.int64))
    else:
        groups = torch.arange(n)
    sums = torch.zeros(unique, blocks.shape[1], dtype=blocks.dtype).index_add_(0, groups, blocks)
    sizes = torch.bincount(groups, minlength=unique).clamp(min=1).to(blocks.dtype)
    return groups, sums / sizes.unsqueeze(1), threshold


def field_blocks(weights: Mapping[str, torch.Tensor], names: Sequence[str], block_rows: int) -> torch.Tensor:
    """(sum_f ceil(n_f / r), r * D): every compressed field's rows cut into zero-padded blocks."""
    out = []
    for name in names:
        w = weights[name]
        pad = -w.shape[0] % block_rows
        padded = torch.cat([w, w.new_zeros(pad, w.shape[1])]) if pad else w
        out.append(padded.reshape(-1, block_rows * w.shape[1]))
    return torch.cat(out)


class DedupTables(nn.Module):
    """Stored unique blocks + per-field block indices. forward: KJT -> KeyedTensor (B, F * D)."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
                 stored: Optional[torch.Tensor] = None, block_index: Optional[torch.Tensor] = None,
                 kept_weights: Optional[Mapping[str, torch.Tensor]] = None):
        super().__init__()
        self.tables, self.dim = list(tables), int(dim)
        self.names = [t.name for t in self.tables]
        self.field_index = {n: i for i, n in enumerate(self.names)}
        self.block_rows = int(hparams["block_rows"])
        compressed = set(hparams["compressed"])
        comp = [t for t in self.tables if t.name in compressed]
        blocks = torch.tensor([math.ceil(t.num_embeddings / self.block_rows) if t.name in compressed else 0
                               for t in self.tables])
        self.register_buffer("block_offset", torch.cumsum(blocks, 0) - blocks, persistent=False)
        self.register_buffer("is_compressed", blocks > 0, persistent=False)
        self.register_buffer("block_index", block_index.to(torch.int32) if block_index is not None else
                             torch.zeros(int(blocks.sum()), dtype=torch.int32))
        rows = int(hparams["unique_blocks"]) * self.block_rows
        physical = ([PhysicalTable(STORED, rows, dim, [t.name for t in comp])] if comp else []) + \
            [PhysicalTable(t.name, t.num_embeddings, dim, [t.name]) for t in self.tables if t.name not in compressed]
        collection = EmbeddingBagCollection(tables=[p.config() for p in physical], device=torch.device("cpu"))
        with torch.no_grad():
            if stored is not None and comp:
                collection.embedding_bags[STORED].weight.copy_(stored.reshape(rows, dim))
            for name, w in (kept_weights or {}).items():
                collection.embedding_bags[name].weight.copy_(w)
        self.lookup = PooledCollection(collection, [f for p in physical for f in p.features],
                                       [t.name for t in self.tables if t.pooling == "mean"])

    def nbytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self.state_dict().values()))

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        fields = value_fields(features, self.field_index)
        ids = features.values().long()
        compressed = self.is_compressed[fields]
        block = self.block_offset[fields] + torch.div(ids, self.block_rows, rounding_mode="floor")
        block = torch.where(compressed, block, torch.zeros_like(block))
        stored = self.block_index[block].long() * self.block_rows + ids % self.block_rows if self.block_index.numel() \
            else ids
        out = self.lookup(with_values(features, torch.where(compressed, stored, ids)))
        blocks = out.to_dict()
        return KeyedTensor(keys=self.names, length_per_key=[self.dim] * len(self.names),
                           values=torch.cat([blocks[n] for n in self.names], dim=1))


class SimHashDedupEmbedding(FullEmbedding):
    """``algorithm: simhash_mean``: trains as ``full``; ``to_inference`` deduplicates. Memory reports
    the deduplicated bytes."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
                 optimizer: EmbeddingOptimizer):
        super().__init__(tables, dim, optimizer)
        self.hparams = dict(hparams)
        self.last_dedup: Dict[str, Any] = {}

    def _weights(self) -> Dict[str, torch.Tensor]:
        return {t.name: self.fused.weight(t.name).detach().clone() for t in self.tables}

    def deduplicated(self) -> DedupTables:
        h = self.hparams
        weights = self._weights()
        names = [t.name for t in self.tables if t.name in set(h["compressed"])]
        kept = {n: w for n, w in weights.items() if n not in set(names)}
        if not names:
            return DedupTables(self.tables, self.dim, h, kept_weights=kept)
        blocks = field_blocks(weights, names, int(h["block_rows"]))
        groups, stored, threshold = deduplicate(blocks, int(h["unique_blocks"]), h["lsh_tables"], h["lsh_bits"],
                                                h["lsh_window"], h["lsh_seed"])
        self.last_dedup = {"similarity_threshold": threshold, "blocks": int(blocks.shape[0]),
                           "unique_blocks": int(stored.shape[0])}
        return DedupTables(self.tables, self.dim, h, stored, groups, kept)

    def memory_report(self) -> MemoryReport:
        inference = DedupTables(self.tables, self.dim, self.hparams).nbytes()  # storage only, not filled
        weights = self.fused.weight_bytes()
        return MemoryReport(
            inference_bytes=inference, training_bytes=weights + self.fused.optimizer_state_bytes(),
            parameters=sum(p.numel() for p in self.fused.fused_parameters()),
            full_bytes=full_embedding_bytes(self.tables, self.dim), breakdown={"deduplicated": inference},
        )

    def inference_error_bound(self, features: KeyedJaggedTensor) -> float:
        """Stated max |to_inference() - training form| over ``features``: per field, the largest
        per-element change of any of its rows by the merge, times the largest bag (1 for mean)."""
        deployable = self.deduplicated()
        weights = self._weights()
        bound = 0.0
        for t in self.tables:
            one = KeyedJaggedTensor(keys=[x.name for x in self.tables],
                                    values=torch.cat([torch.arange(t.num_embeddings) if x.name == t.name else
                                                      torch.zeros(t.num_embeddings, dtype=torch.long)
                                                      for x in self.tables]),
                                    lengths=torch.ones(t.num_embeddings * len(self.tables), dtype=torch.int32))
            with torch.no_grad():
                rows = deployable(one).to_dict()[t.name]
            lengths = features[t.name].lengths()
            bag = 1 if t.pooling == "mean" or not len(lengths) else max(int(lengths.max()), 1)
            bound = max(bound, bag * float((rows - weights[t.name]).abs().max()))
        return bound

    def to_inference(self) -> nn.Module:
        return self.deduplicated().eval()


@dataclass
class DedupSettings:
    """Hyperparameters of ``dedup`` (defaults: Hetu's ``run_compressed.py`` for ``algorithm: hetu``)."""

    algorithm: str = "hetu"  #: hetu (the reference) | simhash_mean (post-training cosine SimHash, group means, no fine-tune)
    unique_blocks: Any = "auto"  #: stored blocks, solved from the budget
    #: rows per block; auto: the reference's 10000 if it lands, else the smallest r whose index fits
    #: index_share and lands (an integer fixes it)
    block_rows: Any = "auto"
    index_share: float = 0.25  #: at most this share of the budget for the int32 block index (auto block_rows)
    # algorithm: hetu (run_compressed.py defaults)
    fp: float = 0.01  #: an element is "equal" when the two blocks differ by at most this
    sim: float = 0.7  #: a block merges when at least this fraction of its elements is "equal"
    lsh_r: float = 0.09  #: L2 LSH bucket width r: h(x) = ceil((a.x + b) / r)
    lsh_l: int = 90  #: LSH tables
    lsh_k: int = 1  #: hashes per table
    lsh_threshold: int = 0  #: a candidate shares a bucket in at least max(this, 1) tables
    # algorithm: simhash_mean
    lsh_tables: int = 8  #: independent random-hyperplane signature tables
    lsh_bits: int = 16  #: hyperplanes per signature
    lsh_window: int = 4  #: candidates: each block's successors in every table's sorted signature order
    lsh_seed: int = 0  #: seed of the LSH coefficients (both algorithms)


class Dedup(CompressionMethod):
    """Embedding deduplication; hyperparameters: ``DedupSettings`` (see ``methods/dedup.md``)."""

    name = "dedup"
    settings_class = DedupSettings
    #: 2: the reference's algorithm (pre-train, L2 LSH + element-wise criterion over the global
    #: table, one representative, fine-tune) is the default; the earlier one is ``simhash_mean``
    revision = 2

    def check_settings(self) -> None:
        algorithm, unique_blocks, block_rows, index_share = (self.algorithm, self.unique_blocks, self.block_rows,
                                                             self.index_share)
        fp, sim, lsh_r, lsh_l, lsh_k, lsh_threshold = (self.fp, self.sim, self.lsh_r, self.lsh_l, self.lsh_k,
                                                       self.lsh_threshold)
        lsh_tables, lsh_bits, lsh_window, lsh_seed = self.lsh_tables, self.lsh_bits, self.lsh_window, self.lsh_seed
        if algorithm not in ALGORITHMS:
            raise ValueError(f"method 'dedup': algorithm={algorithm!r} is not supported; allowed: {', '.join(ALGORITHMS)}")
        if unique_blocks != "auto":
            raise ValueError(f"method 'dedup': unique_blocks={unique_blocks!r} is not supported; only 'auto' "
                             "(solved from the budget)")
        if block_rows != "auto" and not (isinstance(block_rows, int) and block_rows >= 1):
            raise ValueError(f"method 'dedup': block_rows={block_rows!r}; allowed: 'auto' or a positive integer")
        if not 0.0 < float(index_share) < 1.0:
            raise ValueError(f"method 'dedup': index_share={index_share}; allowed: a value in (0, 1)")
        if not float(fp) >= 0.0:
            raise ValueError(f"method 'dedup': fp={fp}; allowed: a value >= 0")
        if not 0.0 < float(sim) <= 1.0:
            raise ValueError(f"method 'dedup': sim={sim}; allowed: a value in (0, 1]")
        if not float(lsh_r) > 0.0 or int(lsh_l) < 1 or int(lsh_k) < 1 or not 0 <= int(lsh_threshold) <= int(lsh_l):
            raise ValueError(f"method 'dedup': lsh_r={lsh_r}, lsh_l={lsh_l}, lsh_k={lsh_k}, lsh_threshold={lsh_threshold}; "
                             "allowed: lsh_r > 0, lsh_l >= 1, lsh_k >= 1, 0 <= lsh_threshold <= lsh_l")
        if not (1 <= int(lsh_bits) <= 62) or int(lsh_tables) < 1 or int(lsh_window) < 1:
            raise ValueError(f"method 'dedup': lsh_bits={lsh_bits}, lsh_tables={lsh_tables}, lsh_window={lsh_window}; "
                             "allowed: lsh_bits in [1, 62], lsh_tables >= 1, lsh_window >= 1")
        self.index_share = float(index_share)
        if algorithm == "hetu":
            self.search = {"fp": float(fp), "sim": float(sim), "lsh_r": float(lsh_r), "lsh_l": int(lsh_l),
                           "lsh_k": int(lsh_k), "lsh_threshold": int(lsh_threshold), "lsh_seed": int(lsh_seed)}
        else:
            self.search = {"lsh_tables": int(lsh_tables), "lsh_bits": int(lsh_bits), "lsh_window": int(lsh_window),
                           "lsh_seed": int(lsh_seed)}

    @staticmethod
    def _blocks(compressed: Sequence[TableSpec], block_rows, algorithm: str):
        """Number of blocks (int or int64 array over ``block_rows``): ceil(R / r) of the global
        table (hetu) or sum_f ceil(n_f / r) (simhash_mean)."""
        sizes = [int(t.num_embeddings) for t in compressed]
        if algorithm == "hetu":
            return -(-sum(sizes) // block_rows)
        blocks = 0 * block_rows
        for rows in sizes:  # one field at a time (R-long arrays, not F x R)
            blocks = blocks + -(-rows // block_rows)
        return blocks

    @classmethod
    def _bytes(cls, tables: Sequence[TableSpec], dim: int, names: Sequence[str], block_rows: int, unique: int,
               algorithm: str = "hetu") -> int:
        comp = [t for t in tables if t.name in set(names)]
        index = INT32_BYTES * cls._blocks(comp, int(block_rows), algorithm) if comp else 0
        stored = unique * block_rows * dim * FP32_BYTES if comp else 0
        return int(index + stored + kept_bytes([t for t in tables if t.name not in set(names)], dim))

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        compressed, kept = split_tables(tables, budget)
        names = [t.name for t in compressed]
        limit = target_bytes(tables, dim, budget)
        hetu = self.algorithm == "hetu"
        if self.block_rows != "auto":
            r = np.array([int(self.block_rows)])
        elif hetu:  # the reference's block, and every smaller one up to the table's size
            r = np.unique(np.r_[np.arange(1, min(sum(t.num_embeddings for t in compressed), REFERENCE_BLOCK_ROWS) + 1),
                                REFERENCE_BLOCK_ROWS])
        else:
            r = np.arange(1, max((t.num_embeddings for t in compressed), default=1) + 1)
        r = r.astype(np.int64)
        # every candidate block size at once (int64 arrays over r); each quantity is ``_bytes``'s, exactly
        blocks = self._blocks(compressed, r, self.algorithm) if compressed else np.zeros_like(r)
        block_bytes = r * dim * FP32_BYTES if compressed else np.zeros_like(r)  # one stored block
        without_blocks = INT32_BYTES * blocks + kept_bytes(kept, dim)  # index + uncompressed fields
        room = limit - without_blocks
        unique = np.where(room > 0, np.clip(room // np.maximum(block_bytes, 1), 0, blocks), 0)
        achieved = without_blocks + unique * block_bytes
        fits = (unique >= 1) & (achieved <= limit)
        lands = fits & ((1 - budget.tolerance) * limit <= achieved)
        small_index = INT32_BYTES * blocks <= self.index_share * limit
        reference = np.flatnonzero(lands & (r == REFERENCE_BLOCK_ROWS)) if hetu and self.block_rows == "auto" else []
        # the reference's block if it lands; else the smallest whose index fits its share and lands,
        # else any that lands, else the most bytes under the budget (flagged under_budget by the job)
        for picks in (reference, np.flatnonzero(lands & small_index), np.flatnonzero(lands)):
            if len(picks):
                pick = int(picks[0])
                break
        else:
            if not fits.any():
                full = full_embedding_bytes(tables, dim)
                raise InfeasibleBudget(self.name, budget.compression_ratio,
                                       float((without_blocks + block_bytes).min()) / full,
                                       float(without_blocks[0] + blocks[0] * block_bytes[0]) / full,
                                       "one stored block plus the block-index table already exceed the budget")
            pick = int(np.flatnonzero(fits)[np.argmax(achieved[fits])])
        return {"algorithm": self.algorithm, "block_rows": int(r[pick]), "unique_blocks": int(unique[pick]),
                "compressed": names, **self.search}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        algorithm = hparams.get("algorithm", "hetu")
        names = hparams["compressed"]
        inference = self._bytes(tables, dim, names, int(hparams["block_rows"]), int(hparams["unique_blocks"]), algorithm)
        if algorithm == "hetu":  # pre-training: one global table + the kept fields' tables (the peak)
            comp = sum(t.num_embeddings for t in tables if t.name in set(names))
            physical = ([PhysicalTable(GLOBAL, comp, dim, names)] if names else []) + \
                [PhysicalTable(t.name, t.num_embeddings, dim, [t.name]) for t in tables if t.name not in set(names)]
        else:
            physical = physical_tables(tables, dim, {})
        parts = closed_form_table_bytes(physical, optimizer)
        return MemoryReport(
            inference_bytes=inference, training_bytes=parts["weights"] + parts["optimizer_state"],
            parameters=sum(t.num_embeddings for t in tables) * dim,
            full_bytes=full_embedding_bytes(tables, dim), breakdown={"deduplicated": inference},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> nn.Module:
        hparams = plan.hparams
        if self.algorithm == "hetu":
            return DedupEmbedding(tables, dim, hparams, optimizer)
        return SimHashDedupEmbedding(tables, dim, hparams, optimizer)

    # ----- schedule (hetu): pre-train, deduplicate, fine-tune -----
    def stages(self) -> List[Stage]:
        if self.algorithm != "hetu":
            return [Stage("train")]
        return [Stage("pretrain"), Stage("finetune", reset_optimizer=True)]

    def hooks(self) -> List[Hook]:
        return [PretrainBestHook()] if self.algorithm == "hetu" else []

    def rebuild(self, module: nn.Module, stage_result: Mapping[str, Any]) -> nn.Module:
        if "block_index" not in stage_result or not isinstance(module, DedupEmbedding) or module.deduplicated:
            return module
        return module.deduplicated_copy(torch.as_tensor(stage_result["block_index"]),
                                        torch.as_tensor(stage_result["representatives"]))
