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
