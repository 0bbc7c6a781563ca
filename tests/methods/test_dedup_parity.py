"""dedup parity: on a fixed table with planted near-duplicate blocks, recbench's deduplication finds
the same groups, keeps the same representatives and stops at the same point as an independent port
of the reference's criterion.

Reference: Hsword/Hetu ``tools/EmbeddingMemoryCompression/methods/scheduler/deduplication.py``
(``DedupTrainer.deduplicate`` and ``L2LSH``) with the defaults of ``run_compressed.py`` (block_cap =
10000 * dim, lsh_threshold 0, fp 0.01, sim 0.7; L2LSH r = 0.09, num_k = 1, num_l = 90), commit
a1cb1bcaf236c9f1d452733b105997d50c16c9df. The port below follows that code's structure (hash tables
of sets keyed by Python ``hash`` of (table, hash values), a query counting hits per key, the
75th-percentile visit order, the padded last block never inserted); only the LSH's random
coefficients are drawn here and given to both.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.dedup import Dedup, DedupEmbedding
from recbench.methods.blocks.dedup_lsh import L2LSH, criterion_targets, deduplicate_blocks
from recbench.types import Budget, EmbeddingOptimizer, TableSpec

ROWS_PER_BLOCK, DIM, PAD_ROWS = 5, 4, 2
WIDTH = ROWS_PER_BLOCK * DIM


class PortedL2LSH:
    """The reference's L2LSH: hashes ceil((x @ a + b) / r), bands of num_k values per table."""

    def __init__(self, a: np.ndarray, b: np.ndarray, r: float, num_l: int, num_k: int):
        self.a, self.b, self.r, self.num_l, self.num_k = a, b, r, num_l, num_k
        self.table = defaultdict(set)

    def compute(self, x: np.ndarray) -> np.ndarray:
        return np.ceil((np.reshape(x, (-1, self.a.shape[0])) @ self.a + self.b) / self.r)

    def _keys(self, values: np.ndarray):
        return [hash((band, *values[band * self.num_k:(band + 1) * self.num_k].tolist())) for band in range(self.num_l)]

    def insert(self, values: np.ndarray, key: int) -> None:
        for k in self._keys(values):
            self.table[k].add(key)

    def query(self, values: np.ndarray, threshold: int = 0):
        hits = defaultdict(int)
        for k in self._keys(values):
            for member in self.table.get(k, []):
                hits[member] += 1
        return [member for member, count in hits.items() if count >= threshold]


def ported_deduplicate(table: np.ndarray, block_rows: int, dups_wanted: int, lsh: PortedL2LSH,
                       fp: float = 0.01, sim: float = 0.7):
    """The reference's pass over a (rows, D) table; the stop count is given (the reference derives it
    from the compress rate). Returns (dup_map, stored block of every block, stored blocks)."""
    rows, dim = table.shape
    pad = -rows % block_rows
    blocks = np.concatenate([table, np.zeros((pad, dim), table.dtype)]).reshape(-1, block_rows * dim)
    pad_idx = blocks.shape[0] - 1
    orders = np.argsort(np.percentile(blocks, 75, axis=1))
    hashed = lsh.compute(blocks)
    dup_map = {}
    for idx in orders:
        best_sim, best = 0, None
        candidates = lsh.query(hashed[idx], 0)
        if idx != pad_idx:
            lsh.insert(hashed[idx], idx)
        for other in candidates:
            if other == idx:
                continue
            b1, b2 = blocks[idx], blocks[other]
            if pad_idx in (idx, other):
                b1, b2 = b1[:-pad * dim], b2[:-pad * dim]
            score = np.sum(np.abs(b1 - b2) <= fp) / b1.shape[0]
            if score > best_sim and score >= sim:
                best_sim, best = score, other
        if best is not None:
            dup_map[idx] = best
        if len(dup_map) >= dups_wanted:
            break
    stored, new_map = [], np.empty(blocks.shape[0], dtype=np.int64)
    for i in orders:
        if i in dup_map:
            new_map[i] = new_map[dup_map[i]]
        else:
            new_map[i] = len(stored)
            stored.append(blocks[i])
    return dup_map, new_map, np.stack(stored)


def planted_table(seed: int = 0):
    """(rows, D) float32: 12 unrelated base blocks (elements U(-0.05, 0.05): ~19% within 0.01 of
    another base) and 28 blocks derived from them in shuffled positions: 10 near-copies (every element
    within 0.002), 8 partial copies (80% of elements copied within 0.002, 20% moved by 0.03-0.05:
    similarity 0.8 >= 0.7), 10 decoys (55% copied, similarity 0.55 < 0.7). The last block is padded."""
    rng = np.random.default_rng(seed)
    base = rng.uniform(-0.05, 0.05, (12, WIDTH))
    derived, kinds = [], []
    for kind, count, copied in (("near", 10, WIDTH), ("partial", 8, int(0.8 * WIDTH)), ("decoy", 10, int(0.55 * WIDTH))):
        for _ in range(count):
            source = int(rng.integers(12))
            block = base[source] + rng.uniform(-0.002, 0.002, WIDTH)
            moved = rng.permutation(WIDTH)[copied:]
            block[moved] = base[source][moved] + rng.choice([-1, 1], moved.size) * rng.uniform(0.03, 0.05, moved.size)
            derived.append(block)
            kinds.append((kind, source))
    blocks = np.concatenate([base, np.stack(derived)])
    position = rng.permutation(len(blocks))
    table = np.empty_like(blocks)
    table[position] = blocks
    labels = [("base", i) for i in range(12)] + kinds
    labels = [labels[j] for j in np.argsort(position)]
    table = table.reshape(-1, DIM)[:-PAD_ROWS]  # 198 rows: the 40th block has 3 real rows
    return table.astype(np.float32), labels


def coefficients(seed: int = 1, num_l: int = 90, r: float = 0.09):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(WIDTH, num_l)), rng.uniform(0.0, r, num_l)


def partition(assignment: np.ndarray):
    groups = defaultdict(set)
    for block, slot in enumerate(assignment.tolist()):
        groups[slot].add(block)
    return sorted(sorted(g) for g in groups.values())


def blocks_of(table: np.ndarray) -> np.ndarray:
    return np.concatenate([table, np.zeros((PAD_ROWS, DIM), table.dtype)]).reshape(-1, WIDTH)


def test_same_groups_and_representatives_as_the_ported_criterion():
    table, labels = planted_table()
    a, b = coefficients()
    dup_map, ported_index, ported_stored = ported_deduplicate(table, ROWS_PER_BLOCK, 10 ** 9, PortedL2LSH(a, b, 0.09, 90, 1))
    # the planted structure is what the criterion finds: every near copy is grouped with its base block,
    # no decoy is grouped with anything, and no two bases share a group
    groups = {block: slot for block, slot in enumerate(ported_index.tolist())}
    base_slot = {labels[i][1]: groups[i] for i in range(len(labels)) if labels[i][0] == "base"}
    sizes = np.bincount(ported_index)
    assert len(set(base_slot.values())) == 12
    for i, (kind, source) in enumerate(labels):
        if kind == "near":
            assert groups[i] == base_slot[source]
        if kind == "decoy":
            assert sizes[groups[i]] == 1
    assert len(dup_map) >= 10
    blocks = blocks_of(table)
    lsh = L2LSH(WIDTH, 0.09, 90, 1, projections=a, offsets=b)
    index, stored, stats = deduplicate_blocks(blocks, WIDTH - PAD_ROWS * DIM, len(blocks) - len(dup_map), lsh)
    assert stats["criterion_merges"] == len(dup_map) and stats["fill_merges"] == 0
    assert partition(index) == partition(ported_index)
    np.testing.assert_array_equal(blocks[stored], ported_stored)  # one representative each, same order
    np.testing.assert_array_equal(index, ported_index)


def test_stops_at_the_budget_at_the_same_block_as_the_port():
    table, _ = planted_table(seed=3)
    a, b = coefficients(seed=4)
    blocks = blocks_of(table)
    lsh = L2LSH(WIDTH, 0.09, 90, 1, projections=a, offsets=b)
    for wanted in (1, 5, 11):
        dup_map, ported_index, _ = ported_deduplicate(table, ROWS_PER_BLOCK, wanted, PortedL2LSH(a, b, 0.09, 90, 1))
        ours = criterion_targets(blocks, WIDTH - PAD_ROWS * DIM, wanted, lsh, 0.01, 0.7)
        assert sorted(ours) == sorted(dup_map) and len(ours) == wanted
        index, _, stats = deduplicate_blocks(blocks, WIDTH - PAD_ROWS * DIM, len(blocks) - wanted, lsh)
        assert stats["fill_merges"] == 0 and partition(index) == partition(ported_index)


def test_padded_last_block_is_compared_on_its_real_rows_and_never_a_target():
    table, _ = planted_table(seed=5)
    blocks = blocks_of(table)
    table = table.copy()
    table[-(ROWS_PER_BLOCK - PAD_ROWS):] = blocks[0, : (ROWS_PER_BLOCK - PAD_ROWS) * DIM].reshape(-1, DIM)  # pad block's rows = block 0's first rows
    blocks = blocks_of(table)
    a, b = coefficients(seed=6)
    dup_map, ported_index, _ = ported_deduplicate(table, ROWS_PER_BLOCK, 10 ** 9, PortedL2LSH(a, b, 0.09, 90, 1))
    last = len(blocks) - 1
    assert last in dup_map and last not in dup_map.values()
    lsh = L2LSH(WIDTH, 0.09, 90, 1, projections=a, offsets=b)
    index, _, _ = deduplicate_blocks(blocks, WIDTH - PAD_ROWS * DIM, len(blocks) - len(dup_map), lsh)
    assert partition(index) == partition(ported_index)


def test_the_module_deduplicates_the_global_table_of_all_fields_as_one():
    """``use_multi = 0``: the fields are one table (field f's id x is row offset_f + x), so a block can
    span two fields; the module's stage result reproduces the port run on that concatenated table."""
    table, _ = planted_table(seed=7)
    tables = [TableSpec("a", 123), TableSpec("b", 75)]  # 198 rows: the block of rows 120-124 spans both fields
    hparams = {**Dedup().solve(tables, DIM, Budget(0.5)).hparams, "block_rows": ROWS_PER_BLOCK}
    lsh = DedupEmbedding(tables, DIM, hparams, EmbeddingOptimizer()).lsh()  # the module's own coefficients
    dup_map, ported_index, ported_stored = ported_deduplicate(table, ROWS_PER_BLOCK, 10 ** 9,
                                                              PortedL2LSH(lsh.a, lsh.b, 0.09, 90, 1))
    assert len(dup_map) >= 10
    module = DedupEmbedding(tables, DIM, {**hparams, "unique_blocks": 40 - len(dup_map)}, EmbeddingOptimizer())
    with torch.no_grad():
        module.fused.weight("dedup_table").copy_(torch.from_numpy(table))
    result = module.dedup_result()
    assert result["criterion_merges"] == len(dup_map) and result["fill_merges"] == 0
    assert partition(result["block_index"].numpy()) == partition(ported_index)
    deduplicated = module.deduplicated_copy(result["block_index"], result["representatives"])
    stored_rows = ported_stored.reshape(-1, DIM)
    ids_a, ids_b = torch.arange(123), torch.arange(123) % 75
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=torch.cat([ids_a, ids_b]), lengths=torch.ones(246, dtype=torch.int32))
    with torch.no_grad():
        out = deduplicated(kjt).to_dict()
    for name, ids, offset in (("a", ids_a, 0), ("b", ids_b, 123)):
        g = ids.numpy() + offset  # the reference's lookup: remap[g // r] * r + g % r
        expected = stored_rows[ported_index[g // ROWS_PER_BLOCK] * ROWS_PER_BLOCK + g % ROWS_PER_BLOCK]
        np.testing.assert_array_equal(out[name].numpy(), expected)
