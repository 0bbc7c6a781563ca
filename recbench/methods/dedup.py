"""``dedup``: post-training embedding deduplication — similar blocks of trained rows stored once.

References: Xie, Zhou, Zou, Yang, Zhou, Chen, Cui, "Serving Deep Learning Models with Deduplication
from Relational Databases", VLDB 2022 (block deduplication with LSH); as benchmarked in Zhang et
al., "Experimental Analysis of Large-scale Learnable Vector Storage Compression", VLDB 2024
("dedup"; Hetu ``methods/scheduler/deduplication.py``).

Mechanism: trains exactly as ``full`` (fp32 FBGEMM tables, fused optimizer). The deployable form
(``to_inference``) splits every compressed field's table into blocks of ``block_rows`` consecutive
rows (the last one zero-padded), i.e. vectors of block_rows * D values, and merges similar blocks
across all compressed fields: blocks are L2-normalised, random-hyperplane LSH (SimHash, Charikar
2002) gives each block ``lsh_bits``-bit signatures in ``lsh_tables`` independent tables, blocks are
sorted by signature in every table and each is paired with its ``lsh_window`` successors (the
sorted-signature nearest-neighbour search of Charikar's paper; blocks with equal signatures are
adjacent, so identical blocks always become candidates, and the candidate graph is connected).
Candidate pairs are scored by cosine similarity and merged greedily from the most similar pair
down (single linkage: a maximum spanning forest of the candidate graph, Kruskal's order) until
exactly ``unique_blocks`` groups remain: the similarity threshold is the lowest similarity merged
and is chosen by the budget. Each group stores the mean of its blocks; a per-field int32 block
index maps every block to its stored block. Lookup of id x of field f: stored row
index_f[x // r] * r + x % r of one plain table (EmbeddingBagCollection), pooled per bag.

Budget: inference bytes = unique_blocks * block_rows * D * 4 + 4 * sum_f ceil(n_f / block_rows)
(the block-index tables) + kept fields in full. ``block_rows: auto`` takes the smallest r whose
index costs at most ``index_share`` of the budget and whose block is at most ``tolerance`` of it
(so the budget can be landed), else the smallest r that can land; ``unique_blocks`` is then the
largest count that fits. Training bytes are those of ``full``.

Shapes: KJT (F keys, B bags) -> ids rewritten to stored rows -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods.base import CompressionMethod
from recbench.methods.budget import kept_bytes, land, split_tables, target_bytes
from recbench.methods.full import FullEmbedding
from recbench.methods.per_id import value_fields, with_values
from recbench.methods.tables import PhysicalTable, PooledCollection, closed_form_table_bytes, physical_tables
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, TableSpec, full_embedding_bytes

STORED = "dedup_blocks"
INT32_BYTES = 4


# ----------------------------------------------------------------------------- the algorithm
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


# ----------------------------------------------------------------------------- deployable form
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


class DedupEmbedding(FullEmbedding):
    """Trains as ``full``; ``to_inference`` deduplicates. Memory reports the deduplicated bytes."""

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


class Dedup(CompressionMethod):
    """Hyperparameters: ``unique_blocks`` (auto), ``block_rows`` (auto | int), ``index_share``,
    ``lsh_tables``, ``lsh_bits``, ``lsh_window``, ``lsh_seed``."""

    name = "dedup"

    def __init__(self, name: Optional[str] = None, unique_blocks: Any = "auto", block_rows: Any = "auto",
                 index_share: float = 0.25, lsh_tables: int = 8, lsh_bits: int = 16, lsh_window: int = 4,
                 lsh_seed: int = 0):
        super().__init__(name, unique_blocks=unique_blocks, block_rows=block_rows, index_share=index_share,
                         lsh_tables=lsh_tables, lsh_bits=lsh_bits, lsh_window=lsh_window, lsh_seed=lsh_seed)
        if unique_blocks != "auto":
            raise ValueError(f"dedup: unique_blocks={unique_blocks!r} is not supported; only 'auto' (solved from the budget)")
        if block_rows != "auto" and not (isinstance(block_rows, int) and block_rows >= 1):
            raise ValueError(f"dedup: block_rows must be 'auto' or a positive integer, got {block_rows!r}")
        if not 0.0 < float(index_share) < 1.0:
            raise ValueError(f"dedup: index_share must be in (0, 1), got {index_share}")
        if not (1 <= int(lsh_bits) <= 62) or int(lsh_tables) < 1 or int(lsh_window) < 1:
            raise ValueError("dedup: lsh_bits must be in [1, 62], lsh_tables and lsh_window >= 1")
        self.block_rows, self.index_share = block_rows, float(index_share)
        self.lsh = {"lsh_tables": int(lsh_tables), "lsh_bits": int(lsh_bits), "lsh_window": int(lsh_window),
                    "lsh_seed": int(lsh_seed)}

    @staticmethod
    def _bytes(tables: Sequence[TableSpec], dim: int, names: Sequence[str], block_rows: int, unique: int) -> int:
        comp = [t for t in tables if t.name in set(names)]
        index = INT32_BYTES * sum(math.ceil(t.num_embeddings / block_rows) for t in comp)
        stored = unique * block_rows * dim * FP32_BYTES if comp else 0
        return int(index + stored + kept_bytes([t for t in tables if t.name not in set(names)], dim))

    def solve(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        compressed, kept = split_tables(tables, budget)
        names = [t.name for t in compressed]
        limit = target_bytes(tables, dim, budget)
        largest_field = max((t.num_embeddings for t in compressed), default=1)
        # every candidate block size at once (int64 arrays over r): the auto search tries r = 1 .. the
        # largest field, which is ~10^5 sizes on synthetic; each quantity is ``_bytes``'s, exactly
        r = (np.array([int(self.block_rows)]) if self.block_rows != "auto" else np.arange(1, largest_field + 1)).astype(np.int64)
        sizes = np.array([t.num_embeddings for t in compressed], dtype=np.int64)
        blocks = np.zeros_like(r)
        for rows in sizes:  # sum over fields of ceil(n / r), one field at a time (R-long arrays, not F x R)
            blocks += -(-rows // r)
        block_bytes = r * dim * FP32_BYTES if compressed else np.zeros_like(r)  # one stored block
        without_blocks = INT32_BYTES * blocks + kept_bytes(kept, dim)  # index tables + uncompressed fields
        room = limit - without_blocks
        unique = np.where(room > 0, np.clip(room // np.maximum(block_bytes, 1), 0, blocks), 0)
        achieved = without_blocks + unique * block_bytes
        lands = (unique >= 1) & ((1 - budget.tolerance) * limit <= achieved) & (achieved <= limit)
        small_index = INT32_BYTES * blocks <= self.index_share * limit
        # the smallest block whose index fits its share and that lands the budget, else any that lands
        picks = np.flatnonzero(lands & small_index)
        picks = picks if len(picks) else np.flatnonzero(lands)
        if not len(picks):
            land(self.name, int(without_blocks[0] + max(int(unique[0]), 1) * block_bytes[0]), tables, dim, budget,
                 int((without_blocks + block_bytes).min()), int(without_blocks[0] + blocks[0] * block_bytes[0]),
                 "one stored block plus the block-index tables already exceed the budget"
                 if (without_blocks + block_bytes).min() > limit
                 else "no block size gives a deduplicated size within the tolerance of the budget")
        return {"block_rows": int(r[picks[0]]), "unique_blocks": int(unique[picks[0]]), "compressed": names, **self.lsh}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        inference = self._bytes(tables, dim, hparams["compressed"], int(hparams["block_rows"]),
                                int(hparams["unique_blocks"]))
        parts = closed_form_table_bytes(physical_tables(tables, dim, {}), optimizer)
        return MemoryReport(
            inference_bytes=inference, training_bytes=parts["weights"] + parts["optimizer_state"],
            parameters=sum(t.num_embeddings for t in tables) * dim,
            full_bytes=full_embedding_bytes(tables, dim), breakdown={"deduplicated": inference},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, budget: Budget,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> DedupEmbedding:
        return DedupEmbedding(tables, dim, self.solve(tables, dim, budget), optimizer)
