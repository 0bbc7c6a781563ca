"""dedup: identical blocks are merged, dissimilar ones are not, the budget sets the number of
stored blocks, and the deployable form looks rows up through the block index."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recbench.methods.base import InfeasibleBudget
from recbench.methods.dedup import Dedup, candidate_pairs, deduplicate, field_blocks
from recbench.types import Budget, EmbeddingOptimizer, TableSpec
from test_contract import random_kjt


def test_merges_identical_blocks_and_not_dissimilar_ones():
    generator = torch.Generator().manual_seed(0)
    distinct = torch.randn(20, 32, generator=generator)  # pairwise cosine ~ 0 (dissimilar)
    copies = torch.randint(0, 20, (80,), generator=generator)
    blocks = torch.cat([distinct, distinct[copies]])[torch.randperm(100, generator=generator)]
    groups, stored, threshold = deduplicate(blocks, unique=20)
    assert stored.shape == (20, 32)
    for i in range(100):
        for j in range(100):
            same = bool(torch.equal(blocks[i], blocks[j]))
            assert (groups[i] == groups[j]) == same, f"blocks {i}, {j}: identical={same}"
    assert torch.allclose(stored[groups], blocks)  # identical groups store the block itself
    assert threshold == pytest.approx(1.0)


def test_near_duplicates_merge_before_unrelated_blocks():
    generator = torch.Generator().manual_seed(1)
    base = torch.randn(10, 16, generator=generator)
    near = base + 0.01 * torch.randn(10, 16, generator=generator)
    groups, _, threshold = deduplicate(torch.cat([base, near]), unique=10)
    assert torch.equal(groups[:10], groups[10:]), "each block merges with its near-copy"
    assert groups[:10].unique().numel() == 10
    assert threshold > 0.99


def test_budget_sets_the_number_of_stored_blocks_and_the_threshold_falls():
    blocks = torch.randn(200, 16, generator=torch.Generator().manual_seed(2))
    thresholds = []
    for unique in (150, 100, 50, 1):
        groups, stored, threshold = deduplicate(blocks, unique=unique)
        assert stored.shape[0] == unique and groups.unique().numel() == unique
        thresholds.append(threshold)
    assert thresholds == sorted(thresholds, reverse=True)


def test_candidate_graph_is_connected_and_pairs_are_unique():
    unit = torch.nn.functional.normalize(torch.randn(64, 8, generator=torch.Generator().manual_seed(3)), dim=1)
    pairs = candidate_pairs(unit.double(), tables=2, bits=6, window=1, seed=0)
    assert np.all(pairs[:, 0] < pairs[:, 1]) and len(np.unique(pairs, axis=0)) == len(pairs)
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(64, 64))
    assert connected_components(graph, directed=False)[0] == 1


def test_deployable_form_reads_rows_through_the_block_index():
    tables = [TableSpec("a", 50), TableSpec("b", 33), TableSpec("tags", 10, pooling="mean", multi_hot=True)]
    method = Dedup(block_rows=2)
    module = method.build(tables, 8, Budget(0.6), EmbeddingOptimizer())
    with torch.no_grad():  # make field b's blocks copies of field a's first blocks
        wa, wb = module.fused.weight("a"), module.fused.weight("b")
        wb[:32] = wa[:32]
    deployable = module.to_inference()
    weights = {t.name: module.fused.weight(t.name).detach() for t in tables}
    blocks = field_blocks(weights, ["a", "b", "tags"], 2)
    rows = deployable.block_index.long()
    assert rows[25:41].tolist() == rows[:16].tolist(), "b's copied blocks share a's stored blocks"
    kjt = random_kjt(tables, 16, np.random.default_rng(0))
    module.eval()
    with torch.no_grad():
        diff = (deployable(kjt).values() - module(kjt).values()).abs().max()
    assert float(diff) <= module.inference_error_bound(kjt) + 1e-6
    assert module.memory_report().inference_bytes == method.memory(tables, 8, module.hparams).inference_bytes
    assert blocks.shape[0] == rows.numel()


def test_infeasible_budget_reports_the_range():
    tables = [TableSpec("a", 300), TableSpec("b", 100)]
    with pytest.raises(InfeasibleBudget) as info:
        Dedup().solve(tables, 8, Budget(0.001))
    assert 0.001 < info.value.min_ratio <= info.value.max_ratio


def _solve_one_size_at_a_time(method: Dedup, tables, dim: int, budget: Budget):
    """The solver's rule written plainly, one block size at a time: the smallest block size r whose
    index (4 bytes per block) is within ``index_share`` of the budget and whose largest number of
    stored blocks lands within the tolerance; else the smallest r that lands; else None."""
    from recbench.methods.budget import split_tables, target_bytes

    compressed = [t for t in split_tables(tables, budget)[0]]
    names = [t.name for t in compressed]
    limit = target_bytes(tables, dim, budget)
    sizes = [int(method.block_rows)] if method.block_rows != "auto" else \
        range(1, max((t.num_embeddings for t in compressed), default=1) + 1)
    landing = []
    for r in sizes:
        blocks = sum(-(-t.num_embeddings // r) for t in compressed)
        room = limit - Dedup._bytes(tables, dim, names, r, 0)
        unique = max(0, min(blocks, room // (r * dim * 4))) if room > 0 else 0
        achieved = Dedup._bytes(tables, dim, names, r, unique)
        if unique >= 1 and (1 - budget.tolerance) * limit <= achieved <= limit:
            landing.append((4 * blocks > method.index_share * limit, r, unique))
    return min(landing)[1:] if landing else None


def test_solver_over_every_block_size_at_once_equals_trying_them_one_by_one():
    """``solve`` scores every block size as one int64 array (the auto search tries ~10^5 sizes on
    synthetic: 9 s one by one, 0.01 s at once); on random tables it picks what the plain rule picks,
    and is infeasible exactly when the plain rule finds nothing."""
    rng = np.random.default_rng(0)
    outcomes = {"feasible": 0, "infeasible": 0}
    for _ in range(150):
        tables = [TableSpec(f"f{i}", int(rng.choice([1, 3, 10, 50, 100, 999, 3000])))
                  for i in range(int(rng.integers(1, 6)))]
        method = Dedup(block_rows=["auto", "auto", 1, 4][int(rng.integers(4))], index_share=float(rng.choice([0.1, 0.25, 0.5])))
        dim, budget = int(rng.choice([4, 8, 16])), Budget(float(rng.choice([0.5, 0.2, 0.05, 0.01, 0.001])))
        expected = _solve_one_size_at_a_time(method, tables, dim, budget)
        try:
            solved = method.solve(tables, dim, budget)
        except InfeasibleBudget:
            assert expected is None
            outcomes["infeasible"] += 1
            continue
        assert (solved["block_rows"], solved["unique_blocks"]) == expected
        outcomes["feasible"] += 1
    assert min(outcomes.values()) > 20  # both outcomes exercised
