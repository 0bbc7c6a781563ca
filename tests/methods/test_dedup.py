"""dedup: the default (reference) schedule — the pre-training hook keeps the best checkpoint, the
stage result rebuilds the deduplicated form, which looks rows up through the block index and is
fine-tuned — the solver's block choice, the fill down to the budget's block count; and the
``simhash_mean`` option: identical blocks are merged, dissimilar ones are not, the budget sets the
number of stored blocks. Parity with the reference's criterion: test_dedup_parity.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recbench.methods.base import InfeasibleBudget
from types import SimpleNamespace

from recbench.methods.dedup import REFERENCE_BLOCK_ROWS, Dedup, DedupEmbedding, candidate_pairs, deduplicate, field_blocks
from recbench.methods.blocks.dedup_lsh import L2LSH, deduplicate_blocks
from recbench.types import Budget, EmbeddingOptimizer, TableSpec
from test_contract import random_kjt
from solve_build import solve_and_build


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
    method = Dedup(algorithm="simhash_mean", block_rows=2)
    module = solve_and_build(method, tables, 8, Budget(0.6), EmbeddingOptimizer())
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
    """The solver's rule written plainly, one block size at a time: hetu with ``block_rows: auto``
    takes 10,000 rows if that lands within the tolerance; else the smallest block size r whose index
    (4 bytes per block) is within ``index_share`` of the budget and whose largest number of stored
    blocks lands; else the smallest r that lands; else the r with the most bytes under the budget;
    else None. Blocks: ceil(R / r) of the global table (hetu) or sum_f ceil(n_f / r) (simhash_mean)."""
    from recbench.methods.blocks.budget import split_tables, target_bytes

    compressed = [t for t in split_tables(tables, budget)[0]]
    names = [t.name for t in compressed]
    limit = target_bytes(tables, dim, budget)
    hetu = method.algorithm == "hetu"
    total = sum(t.num_embeddings for t in compressed)
    if method.block_rows != "auto":
        sizes = [int(method.block_rows)]
    elif hetu:
        sizes = sorted(set(range(1, min(total, REFERENCE_BLOCK_ROWS) + 1)) | {REFERENCE_BLOCK_ROWS})
    else:
        sizes = range(1, max((t.num_embeddings for t in compressed), default=1) + 1)
    landing, fitting = [], []
    for r in sizes:
        blocks = -(-total // r) if hetu else sum(-(-t.num_embeddings // r) for t in compressed)
        room = limit - Dedup._bytes(tables, dim, names, r, 0, method.algorithm)
        unique = max(0, min(blocks, room // (r * dim * 4))) if room > 0 else 0
        achieved = Dedup._bytes(tables, dim, names, r, unique, method.algorithm)
        if unique >= 1 and achieved <= limit:
            fitting.append((-achieved, r, unique))
            if (1 - budget.tolerance) * limit <= achieved:
                if hetu and method.block_rows == "auto" and r == REFERENCE_BLOCK_ROWS:
                    return r, unique
                landing.append((4 * blocks > method.index_share * limit, r, unique))
    return min(landing)[1:] if landing else (min(fitting)[1:] if fitting else None)


def test_solver_over_every_block_size_at_once_equals_trying_them_one_by_one():
    """``solve`` scores every block size as one int64 array (the auto search tries up to ~10^5 sizes:
    seconds one by one, milliseconds at once); on random tables it picks what the plain rule picks,
    and is infeasible exactly when the plain rule finds nothing."""
    rng = np.random.default_rng(0)
    outcomes = {"feasible": 0, "infeasible": 0}
    for trial in range(100):
        tables = [TableSpec(f"f{i}", int(rng.choice([1, 3, 10, 50, 100, 999, 3000])))
                  for i in range(int(rng.integers(1, 6)))]
        method = Dedup(algorithm=("hetu", "simhash_mean")[trial % 2], block_rows=["auto", "auto", 1, 4][int(rng.integers(4))],
                       index_share=float(rng.choice([0.1, 0.25, 0.5])))
        dim, budget = int(rng.choice([4, 8, 16])), Budget(float(rng.choice([0.5, 0.2, 0.05, 0.01, 0.001])))
        expected = _solve_one_size_at_a_time(method, tables, dim, budget)
        try:
            solved = method.solve(tables, dim, budget).hparams
        except InfeasibleBudget:
            assert expected is None
            outcomes["infeasible"] += 1
            continue
        assert (solved["block_rows"], solved["unique_blocks"]) == expected
        outcomes["feasible"] += 1
    assert min(outcomes.values()) > 20, outcomes  # both outcomes exercised


def test_reference_block_of_10000_rows_when_it_lands_else_smaller_blocks():
    large = [TableSpec("a", 200_000), TableSpec("b", 137_000)]
    solved = Dedup().solve(large, 16, Budget(0.5)).hparams
    assert solved["block_rows"] == REFERENCE_BLOCK_ROWS and solved["unique_blocks"] == 16  # of 34 blocks
    small = [TableSpec("user", 944), TableSpec("item", 1653)]  # one 10,000-row block is larger than the table
    solved = Dedup().solve(small, 16, Budget(0.5)).hparams
    assert solved["block_rows"] < REFERENCE_BLOCK_ROWS
    assert Dedup().memory(small, 16, solved).compression_ratio <= 0.5


def test_bad_hyperparameters_name_the_key_and_the_allowed_values():
    for kwargs, key in (({"algorithm": "mean"}, "algorithm"), ({"sim": 1.5}, "sim"), ({"fp": -1.0}, "fp"),
                        ({"lsh_threshold": 91}, "lsh_threshold"), ({"block_rows": 0}, "block_rows")):
        with pytest.raises(ValueError, match=key) as info:
            Dedup(**kwargs)
        assert "dedup" in str(info.value) and "allowed" in str(info.value)


def test_fill_merges_nearest_roots_down_to_exactly_the_budget_count():
    """Nothing meets the criterion (unrelated blocks): the fill alone reaches the block count, and
    pairs planted at a small distance are merged before unrelated blocks."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(30, 12)).astype(np.float32)
    near = base[:10] + np.float32(0.05) * rng.normal(size=(10, 12)).astype(np.float32)  # > fp: no criterion merge
    blocks = np.concatenate([base, near])
    lsh = L2LSH(12, seed=0)
    index, stored, stats = deduplicate_blocks(blocks, 12, 30, lsh)
    assert stats["criterion_merges"] == 0 and stats["fill_merges"] == 10
    assert len(stored) == 30 and np.array_equal(np.unique(index), np.arange(30))
    assert np.array_equal(index[:10], index[30:]), "each block merges with its planted neighbour"
    for unique in (17, 5, 1):
        index, stored, _ = deduplicate_blocks(blocks, 12, unique, lsh)
        assert len(stored) == unique and len(np.unique(index)) == unique
        assert np.array_equal(index[stored], np.arange(unique)), "a representative reads its own slot"


class _Model(torch.nn.Module):
    def __init__(self, embedding):
        super().__init__()
        self.embedding = embedding


def test_pretrain_best_checkpoint_is_deduplicated_and_rebuilt_for_fine_tuning():
    tables = [TableSpec("a", 300), TableSpec("b", 120), TableSpec("tags", 30, pooling="mean", multi_hot=True),
              TableSpec("tiny", 3)]
    method = Dedup()
    budget = Budget(0.3, min_rows_to_compress=10)  # "tiny" is kept in full
    torch.manual_seed(0)
    module = solve_and_build(method, tables, 8, budget, EmbeddingOptimizer())
    assert isinstance(module, DedupEmbedding) and [s.name for s in method.stages()] == ["pretrain", "finetune"]
    model, hook = _Model(module), method.hooks()[0]
    context = SimpleNamespace(stage=SimpleNamespace(name="pretrain"), model=model, embedding=module,
                              trainer=SimpleNamespace(config=SimpleNamespace(min_delta=0.0)))
    hook.on_stage_start(context)
    hook.on_eval_end(context, {"auc": 0.7})
    best = module.global_weight()
    with torch.no_grad():
        module.fused.weight("dedup_table").add_(1.0)  # a later, worse checkpoint
    hook.on_eval_end(context, {"auc": 0.6})
    result = hook.on_stage_end(context)
    assert result["restored_best"] and torch.equal(module.global_weight(), best)
    finetune = method.rebuild(module, result)
    assert finetune.deduplicated and finetune.block_index.numel() == -(-450 // module.block_rows)
    # the deduplicated form reads global row g at stored row index[g // r] * r + g % r
    kjt = random_kjt(tables, 64, np.random.default_rng(0))
    finetune.eval()
    stored = finetune.fused.weight("dedup_blocks").detach()
    r = finetune.block_rows
    with torch.no_grad():
        out = finetune(kjt).to_dict()
        ids = kjt["a"].values()
        expected = stored[finetune.block_index[(ids + 0) // r].long() * r + (ids + 0) % r]
        assert torch.equal(out["a"], expected)
        ids = kjt["b"].values()
        expected = stored[finetune.block_index[(ids + 300) // r].long() * r + (ids + 300) % r]
        assert torch.equal(out["b"], expected)
        assert torch.equal(out["tiny"], finetune.fused.weight("tiny")[kjt["tiny"].values()])
    # memory: the deployable bytes are the closed form; training bytes stay the pre-training peak
    closed = method.memory(tables, 8, module.hparams)
    assert finetune.memory_report().inference_bytes == closed.inference_bytes == module.memory_report().inference_bytes
    assert finetune.memory_report().training_bytes == module.memory_report().training_bytes
    with torch.no_grad():
        assert torch.equal(finetune.to_inference()(kjt).values(), finetune(kjt).values())
    # fine-tuning trains the stored blocks (fused table)
    finetune.train()
    before = stored.clone()
    (finetune(kjt).values() ** 2).sum().backward()
    assert not torch.equal(before, finetune.fused.weight("dedup_blocks").detach())
