"""Mixed-dimension embeddings against the paper's power-law rule (Ginart et al., ISIT 2021)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_contract import random_kjt, zipf_counts  # tests/methods is on sys.path

from recbench.methods.base import InfeasibleBudget
from recbench.methods.mixed_dim import MixedDim, block_popularity, raw_dims, round_dims
from recbench.types import Budget, EmbeddingOptimizer, TableSpec, full_embedding_bytes

DIM = 16


def specs(seed=0):
    rng = np.random.default_rng(seed)
    sizes = [4000, 2500, 1500, 900, 600, 300, 120]
    out = [TableSpec(f"f{i}", n, zipf_counts(n, rng)) for i, n in enumerate(sizes)]
    out.append(TableSpec("bag", 700, zipf_counts(700, rng), pooling="mean", multi_hot=True))
    return out


def test_power_law_ratio_and_monotone_in_popularity():
    p = np.array([1.0, 0.5, 0.1, 0.01, 0.001])
    for alpha in (0.0, 0.3, 0.7):
        raw = raw_dims(p, alpha, DIM)
        assert raw[0] == DIM  # the most popular block keeps D
        for i in range(len(p)):
            for j in range(len(p)):
                assert raw[i] / raw[j] == pytest.approx((p[i] / p[j]) ** alpha)
        rounded = round_dims(raw, DIM, 4)
        assert all(rounded % 4 == 0) and rounded.min() >= 4 and rounded.max() <= DIM
        assert all(np.diff(rounded) <= 0)  # less popular -> never wider


def test_solved_dims_follow_field_popularity():
    tables = specs()
    hp = MixedDim().solve(tables, DIM, Budget(compression_ratio=0.45))
    pop = {t.name: block_popularity(t, 1, "counts")[0] for t in tables}
    names = sorted(pop, key=pop.get, reverse=True)
    dims = [hp["dims"][n][0] for n in names]
    assert dims == sorted(dims, reverse=True)
    raw = raw_dims([pop[n] for n in names], hp["alpha"], DIM)
    kept_wide = [d == DIM for d in dims]
    assert all(abs(d - r) <= 2 + 1e-9 or w or d == 4 for d, r, w in zip(dims, raw, kept_wide))


def test_alpha_lands_the_budget():
    tables = specs()
    full = full_embedding_bytes(tables, DIM)
    for blocks, ratios in ((1, (0.6, 0.4)), (4, (0.6, 0.5))):
        method = MixedDim(blocks_per_field=blocks)
        for ratio in ratios:
            hp = method.solve(tables, DIM, Budget(compression_ratio=ratio))
            assert 0.9 * ratio <= method.memory(tables, DIM, hp).inference_bytes / full <= ratio
            assert hp["alpha"] > 0
    with pytest.raises(InfeasibleBudget, match="reachable range"):
        MixedDim().solve(tables, DIM, Budget(compression_ratio=0.1))  # min width 4 of 16: ratio >= 0.25


def test_blocks_split_by_frequency_and_compose_per_id():
    tables = specs()
    method = MixedDim(blocks_per_field=4)
    torch.manual_seed(0)
    module = method.build(tables, DIM, Budget(compression_ratio=0.5), EmbeddingOptimizer(kind="sgd")).eval()
    t = tables[0]
    dims = module.hparams["dims"][t.name]
    assert len(dims) == 4 and dims == sorted(dims, reverse=True)
    # the most frequent ids sit in block 0 (the widest)
    top = int(np.argmax(t.counts))
    rank = module.core.rank_f0
    assert int(rank[top]) == 0
    features = random_kjt(tables, 20, np.random.default_rng(0), max_bag=4)
    with torch.no_grad():
        out = module(features).to_dict()
        ids = features[t.name].values()
        r = rank[ids].long()
        size = module.hparams["block_rows"][t.name][0]
        expected = torch.stack([
            module.projections(f"{t.name}/b{int(b)}", module.fused.weight(f"{t.name}/b{int(b)}")[int(x)][None])[0]
            for b, x in zip(r // size, r % size)])
        assert torch.allclose(out[t.name], expected, atol=1e-6)
        assert torch.equal(out[t.name], module.to_inference()(features).to_dict()[t.name])


def test_memory_counts_projections_remap_and_adam_state():
    tables = specs()
    method = MixedDim(blocks_per_field=4)
    hp = method.solve(tables, DIM, Budget(compression_ratio=0.5))
    module = method.build(tables, DIM, Budget(compression_ratio=0.5), EmbeddingOptimizer())
    report, closed = module.memory_report(), method.memory(tables, DIM, hp, EmbeddingOptimizer())
    assert report == closed
    assert report.breakdown["projections"] > 0 and report.breakdown["remap"] == sum(
        t.num_embeddings * 4 for t in tables if len(hp["block_rows"][t.name]) > 1)
    assert [g.name for g in module.param_groups()] == ["projections"]


def test_counts_required_for_counts_popularity():
    with pytest.raises(ValueError, match="counts"):
        MixedDim().solve([TableSpec("x", 100)], DIM, Budget(compression_ratio=0.5))
    hp = MixedDim(popularity="rows", alpha=0.5).solve([TableSpec("x", 1000), TableSpec("y", 50)], DIM, Budget())
    assert hp["dims"] == {"x": [4], "y": [DIM]}  # 16 * (50 / 1000) ** 0.5 = 3.6 -> 4
