"""Block deduplication of a trained embedding table: Euclidean LSH candidates, the element-wise
similarity criterion, one kept representative per group (the ``dedup`` method's default algorithm).

References: Xie, Zhou, Zou, Yang, Zhou, Chen, Cui, "Serving Deep Learning Models with Deduplication
from Relational Databases", VLDB 2022; Hsword/Hetu ``tools/EmbeddingMemoryCompression/methods/
scheduler/deduplication.py`` (``DedupTrainer.deduplicate``, ``L2LSH``) at a1cb1bca; Datar, Immorlica,
Indyk, Mirrokni, "Locality-Sensitive Hashing Scheme Based on p-Stable Distributions", SoCG 2004.

Input: ``blocks`` (n, w) — the table's rows cut into n blocks of ``block_rows`` consecutive rows
(w = block_rows * D), the last block zero-padded, ``valid_last`` of its w elements real.

1. Euclidean LSH (Datar et al.): ``num_l`` tables of ``num_k`` hashes h(x) = ceil((x . a + b) / r),
   a ~ N(0, I_w), b ~ U[0, r); a block's key in table t is its k hashes of band t.
2. Blocks are visited in ascending order of their 75th percentile. Each block queries the blocks
   inserted before it (those sharing a key in at least ``max(lsh_threshold, 1)`` tables), then is
   inserted (the padded last block never is: nothing is mapped onto it). Its similarity to a
   candidate is the fraction of elements (the padded block: its real elements) that differ by at
   most ``fp``; the most similar candidate with similarity >= ``sim`` (ties: the lowest block index)
   becomes its target. The visit stops once ``n - unique`` blocks have a target.
3. (``fill``, a recbench extension) When the criterion leaves more than ``unique`` groups, the
   remaining group roots are merged nearest first (L2 distance over candidate pairs from
   ``FILL_PROJECTIONS`` of the LSH projections, each root paired with its ``FILL_WINDOW`` successors
   in every projection's sorted order, so the candidate graph is connected; single linkage,
   Kruskal's order) until exactly ``unique`` groups remain.
4. Every block reads one stored block: the root of its target chain (step 2) or of its merged
   component (step 3; the member visited first that is not the padded block). Stored blocks are
   kept in visit order.

Shapes: blocks (n, w) -> (block_index (n,) int64 stored slot of every block, representatives
(unique,) int64 block stored in every slot, stats).
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

FILL_PROJECTIONS = 8
FILL_WINDOW = 4
#: up to this many blocks, a query compares all keys at once (same candidates as the bucket lists)
DENSE_QUERY_BLOCKS = 8192


class L2LSH:
    """``num_l`` x ``num_k`` Euclidean hashes ceil((x . a + b) / r) of w-long vectors.

    ``projections`` (w, l * k) and ``offsets`` (l * k,) may be given (parity tests); else drawn
    from ``numpy.random.default_rng(seed)``: a ~ N(0, 1), b ~ U[0, r).
    """

    def __init__(self, width: int, r: float = 0.09, num_l: int = 90, num_k: int = 1, seed: int = 0,
                 projections: Optional[np.ndarray] = None, offsets: Optional[np.ndarray] = None):
        self.r, self.num_l, self.num_k = float(r), int(num_l), int(num_k)
        rng = np.random.default_rng(seed)
        self.a = np.asarray(projections, dtype=np.float64) if projections is not None else \
            rng.standard_normal((width, self.num_l * self.num_k))
        self.b = np.asarray(offsets, dtype=np.float64) if offsets is not None else \
            rng.uniform(0.0, self.r, self.num_l * self.num_k)

    def project(self, x: np.ndarray) -> np.ndarray:
        """(n, l * k) float64: x . a."""
        return np.asarray(x, dtype=np.float64) @ self.a

    def keys(self, projected: np.ndarray) -> np.ndarray:
        """(n, l) int64: every vector's bucket in each table (equal k-tuples of hashes, same bucket)."""
        hashes = np.ceil((projected + self.b) / self.r)
        if self.num_k == 1:
            return hashes.astype(np.int64)
        keys = np.empty((hashes.shape[0], self.num_l), dtype=np.int64)
        for t in range(self.num_l):
            keys[:, t] = np.unique(hashes[:, t * self.num_k:(t + 1) * self.num_k], axis=0, return_inverse=True)[1].ravel()
        return keys


def visit_order(blocks: np.ndarray) -> np.ndarray:
    """Blocks in ascending order of their 75th percentile (numpy's default argsort, as the reference)."""
    return np.argsort(np.percentile(blocks, 75, axis=1))


def criterion_targets(blocks: np.ndarray, valid_last: int, merges: int, lsh: L2LSH, fp: float, sim: float,
                      lsh_threshold: int = 0, order: Optional[np.ndarray] = None) -> Dict[int, int]:
    """Step 2: {block: target block} for at most ``merges`` blocks, in visit order."""
    n, width = blocks.shape
    padded = n - 1 if valid_last < width else -1
    order = visit_order(blocks) if order is None else order
    keys = lsh.keys(lsh.project(blocks))
    dense = n <= DENSE_QUERY_BLOCKS  # small tables: compare every key at once instead of bucket lists
    buckets = [dict() for _ in range(lsh.num_l)]
    inserted = np.zeros(n, dtype=bool)
    need = max(int(lsh_threshold), 1)
    targets: Dict[int, int] = {}
    if merges <= 0:
        return targets
    for i in order.tolist():
        if dense:
            candidates = np.flatnonzero(inserted & ((keys == keys[i]).sum(1) >= need))
        else:
            found = [np.asarray(f, dtype=np.int64) for f in (buckets[t].get(k) for t, k in enumerate(keys[i].tolist())) if f]
            candidates = np.zeros(0, dtype=np.int64)
            if found:
                candidates, hits = np.unique(np.concatenate(found), return_counts=True)
                candidates = candidates[hits >= need]
        if candidates.size:
            part = slice(0, valid_last) if i == padded else slice(None)
            close = np.abs(blocks[candidates, part] - blocks[i, part]) <= fp
            score = close.sum(1) / close.shape[1]
            best = int(np.argmax(score))  # ties: the lowest block index
            if score[best] >= sim and score[best] > 0:
                targets[i] = int(candidates[best])
        if i != padded:
            inserted[i] = True
            for t, k in enumerate(keys[i].tolist() if not dense else ()):
                buckets[t].setdefault(k, []).append(i)
        if len(targets) >= merges:
            break
    return targets


def _roots(order: np.ndarray, targets: Dict[int, int]) -> np.ndarray:
    """(n,) the root block of every block's target chain (targets are visited before their sources)."""
    root = np.arange(order.size)
    for i in order.tolist():
        if i in targets:
            root[i] = root[targets[i]]
    return root


def fill_merges(blocks: np.ndarray, valid_last: int, roots: np.ndarray, unique: int, lsh: L2LSH,
                rank: np.ndarray) -> Tuple[np.ndarray, float]:
    """Step 3: merge the group roots ``roots`` (m,) nearest first down to ``unique`` groups; returns
    the component representative of every root (m,) and the largest merged L2 distance."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components, minimum_spanning_tree

    m = roots.size
    width = blocks.shape[1]
    padded = blocks.shape[0] - 1 if valid_last < width else -1
    sketch = lsh.project(blocks[roots])[:, :FILL_PROJECTIONS]
    pairs = []
    for column in range(sketch.shape[1]):
        by_value = np.argsort(sketch[:, column], kind="stable")
        for w in range(1, min(FILL_WINDOW, m - 1) + 1):
            pairs.append(np.stack([by_value[:-w], by_value[w:]], axis=1))
    pairs = np.unique(np.sort(np.concatenate(pairs), axis=1), axis=0)
    first, second = roots[pairs[:, 0]], roots[pairs[:, 1]]
    distance = np.empty(len(pairs))
    for start in range(0, len(pairs), 4096):  # (chunk, w) differences at a time
        a, b = first[start:start + 4096], second[start:start + 4096]
        diff = blocks[a].astype(np.float64) - blocks[b].astype(np.float64)
        touches_pad = (a == padded) | (b == padded)
        diff[touches_pad, valid_last:] = 0.0  # the padded block is compared on its real elements
        distance[start:start + 4096] = np.sqrt((diff ** 2).sum(1))
    # Kruskal: a minimum spanning forest of the candidate graph, its m - unique shortest edges merged
    weights = distance + 1.0  # strictly positive (scipy drops zero-weight edges)
    forest = minimum_spanning_tree(coo_matrix((weights, (pairs[:, 0], pairs[:, 1])), shape=(m, m)).tocsr()).tocoo()
    keep = np.argsort(forest.data, kind="stable")[: m - unique]
    merged = coo_matrix((np.ones(keep.size), (forest.row[keep], forest.col[keep])), shape=(m, m))
    count, labels = connected_components(merged, directed=False)
    if count != unique:
        raise RuntimeError(f"dedup: the fill's candidate graph left {count} groups, expected {unique}")
    # representative: the member visited first, the padded block only when it is alone
    preference = rank[roots] + np.where(roots == padded, roots.size + blocks.shape[0], 0)
    best = np.full(count, np.iinfo(np.int64).max)
    np.minimum.at(best, labels, preference)
    representative_of_label = np.empty(count, dtype=np.int64)
    winners = preference == best[labels]
    representative_of_label[labels[winners]] = roots[winners]
    largest = float(forest.data[keep].max() - 1.0) if keep.size else 0.0
    return representative_of_label[labels], largest


def deduplicate_blocks(blocks: np.ndarray, valid_last: int, unique: int, lsh: L2LSH, fp: float = 0.01,
                       sim: float = 0.7, lsh_threshold: int = 0) -> Tuple[np.ndarray, np.ndarray, Dict[str, Any]]:
    """Steps 1-4: (block_index (n,), representatives (unique,), stats) for ``unique`` stored blocks."""
    n = blocks.shape[0]
    unique = int(min(max(unique, 1), n))
    order = visit_order(blocks)
    rank = np.empty(n, dtype=np.int64)
    rank[order] = np.arange(n)
    targets = criterion_targets(blocks, valid_last, n - unique, lsh, fp, sim, lsh_threshold, order)
    root = _roots(order, targets)
    roots = np.unique(root)
    stats: Dict[str, Any] = {"blocks": n, "unique_blocks": unique, "criterion_merges": len(targets),
                             "fill_merges": int(roots.size - unique), "fill_max_distance": 0.0}
    if roots.size > unique:
        representative, stats["fill_max_distance"] = fill_merges(blocks, valid_last, roots, unique, lsh, rank)
        lookup = np.arange(n)
        lookup[roots] = representative
        root = lookup[root]
    stored = np.unique(root)
    stored = stored[np.argsort(rank[stored], kind="stable")]  # visit order, as the reference stores them
    slot = np.empty(n, dtype=np.int64)
    slot[stored] = np.arange(stored.size)
    return slot[root], stored, stats
