"""Mixed-dimension embeddings: power-law widths, budget, frequency blocks, narrow plain tables, memory."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_contract import random_kjt, zipf_counts  # tests/methods is on sys.path

from recbench.methods.base import InfeasibleBudget
from recbench.methods.mixed_dim import MixedDim, block_popularity, raw_dims, round_dims
from recbench.types import Budget, EmbeddingOptimizer, TableSpec, full_embedding_bytes
from solve_build import solve_and_build

DIM = 16


def specs(seed=0):
    rng = np.random.default_rng(seed)
    sizes = [4000, 2500, 1500, 900, 600, 300, 120, 5]
    out = [TableSpec(f"f{i}", n, zipf_counts(n, rng)) for i, n in enumerate(sizes)]
    out.append(TableSpec("bag", 700, zipf_counts(700, rng), pooling="mean", multi_hot=True))
    return out


def test_power_law_and_roundings():
    p = np.array([1.0, 0.5, 0.1, 0.01, 0.001])
    for alpha in (0.0, 0.3, 0.7, 1.0):
        raw = raw_dims(p, alpha, DIM)
        assert raw[0] == DIM  # the most popular block keeps D
        assert raw[1:] / raw[0] == pytest.approx((p[1:] / p[0]) ** alpha)
        pow2 = round_dims(raw, DIM, 1, "pow2")
        assert all(d & (d - 1) == 0 for d in pow2) and pow2.min() >= 1 and pow2.max() <= DIM
        assert all(np.diff(pow2) <= 0)  # less popular -> never wider
        assert all(round_dims(raw, DIM, 4, "multiple_of_4") % 4 == 0)
    assert round_dims(np.array([16, 12, 5.9, 2.9, 1.4, 0.2]), DIM, 1).tolist() == [16, 16, 8, 4, 1, 1]
    assert round_dims(np.array([16, 12, 5.9, 0.2]), DIM, 1, "nearest").tolist() == [16, 12, 6, 1]


def test_lands_under_the_budget_and_floor_is_width_one():
    tables = specs()
    full = full_embedding_bytes(tables, DIM)
    method = MixedDim()
    floor = method.memory(tables, DIM, method.hparams_at(tables, DIM, method.popularities(tables, Budget()), 1.0))
    for ratio in (0.8, 0.5, 0.2, 0.1):
        hp = method.solve(tables, DIM, Budget(compression_ratio=ratio)).hparams
        achieved = method.memory(tables, DIM, hp).inference_bytes / full
        assert floor.compression_ratio <= achieved <= ratio and 0 < hp["alpha"] <= 1
        sizes = {t.name: t.num_embeddings for t in tables}
        ordered = sorted(sizes, key=sizes.get)  # fewer rows -> never narrower (popularity 1/n)
        assert [hp["dims"][n][0] for n in ordered] == sorted((hp["dims"][n][0] for n in ordered), reverse=True)
        assert hp["dims"]["f7"] == [DIM]  # the smallest field anchors the power law
    at_floor = method.hparams_at(tables, DIM, method.popularities(tables, Budget()), 1.0)
    assert at_floor["dims"]["f0"] == [1]
    with pytest.raises(InfeasibleBudget, match="reachable range") as exc:
        method.solve(tables, DIM, Budget(compression_ratio=0.01))
    assert exc.value.min_ratio == pytest.approx(floor.compression_ratio)
    assert method.solve(tables, DIM, Budget(compression_ratio=1.0)).hparams["dims"]["f0"] == [DIM]


def test_previous_behaviour_option_multiple_of_4():
    tables = specs()
    method = MixedDim(rounding="multiple_of_4", min_dim=4, popularity="counts")
    hp = method.solve(tables, DIM, Budget(compression_ratio=0.5)).hparams
    assert all(d % 4 == 0 and 4 <= d <= DIM for ds in hp["dims"].values() for d in ds)
    with pytest.raises(InfeasibleBudget):
        method.solve(tables, DIM, Budget(compression_ratio=0.2))  # widths >= 4 of 16: ratio >= 0.25


def test_frequency_blocks_follow_counts_not_ids():
    tables = specs()
    method = MixedDim(blocks_per_field=4, popularity="counts")
    torch.manual_seed(0)
    module = solve_and_build(method, tables, DIM, Budget(compression_ratio=0.3), EmbeddingOptimizer(kind="sgd")).eval()
    t = tables[0]
    dims = module.hparams["dims"][t.name]
    assert len(dims) == 4 and dims == sorted(dims, reverse=True) and dims[0] > dims[-1]
    rank = module.core.rank_f0
    assert int(rank[int(np.argmax(t.counts))]) == 0
    assert np.all(np.diff(np.asarray(t.counts)[np.argsort(rank.numpy())]) <= 0)  # rank order = descending count
    features = random_kjt(tables, 20, np.random.default_rng(0), max_bag=4)
    with torch.no_grad():
        out = module(features).to_dict()
        ids = features[t.name].values()
        r = rank[ids].long()
        size = module.hparams["block_rows"][t.name][0]
        expected = torch.stack([
            module.projections(f"{t.name}/b{int(b)}", module.table_weight(f"{t.name}/b{int(b)}")[int(x)][None])[0]
            for b, x in zip(r // size, r % size)])
        assert torch.allclose(out[t.name], expected, atol=1e-6)
        assert torch.equal(out[t.name], module.to_inference()(features).to_dict()[t.name])


@pytest.mark.parametrize("kind", ["rowwise_adagrad", "sgd"])
def test_narrow_widths_use_plain_tables_and_memory_is_measured(kind):
    tables = specs()
    method = MixedDim()
    budget = Budget(compression_ratio=0.1)
    hp = method.solve(tables, DIM, budget).hparams
    module = solve_and_build(method, tables, DIM, budget, EmbeddingOptimizer(kind=kind))
    narrow = [f"{n}/b0" for n, ds in hp["dims"].items() if ds[0] % 4]
    assert narrow and sorted(p.name for p in module.plain.physical) == sorted(narrow)
    assert all(p.dim % 4 == 0 for p in module.fused.physical)
    report, closed = module.memory_report(), method.memory(tables, DIM, hp, EmbeddingOptimizer(kind=kind))
    assert report == closed
    assert report.breakdown["remap"] == 0 and report.breakdown["projections"] > 0
    assert [(g.name, g.kind) for g in module.param_groups()] == [("narrow_tables", "sparse"), ("projections", "dense")]
    module.train()
    (module(random_kjt(tables, 64, np.random.default_rng(1))).values() ** 2).sum().backward()
    assert all(p.grad is not None and p.grad.is_sparse for p in module.plain.parameters())


def test_bad_values_name_key_and_allowed_values():
    for kwargs, key in (({"rounding": "pow3"}, "rounding"), ({"popularity": "x"}, "popularity"),
                        ({"init": "xavier"}, "init"), ({"alpha": -1}, "alpha"), ({"min_dim": 0}, "min_dim"),
                        ({"blocks_per_field": 0}, "blocks_per_field"),
                        ({"blocks_per_field": 4, "popularity": "rows"}, "blocks_per_field")):
        with pytest.raises(ValueError, match=f"mixed_dim: {key}=.*allowed"):
            MixedDim(**kwargs)
    with pytest.raises(ValueError, match="counts"):
        MixedDim(popularity="counts").solve([TableSpec("x", 100)], DIM, Budget(compression_ratio=0.5))


def test_fixed_alpha():
    hp = MixedDim(alpha=0.5).solve([TableSpec("x", 1000), TableSpec("y", 50)], DIM, Budget()).hparams
    assert hp["dims"] == {"x": [4], "y": [DIM]}  # 16 * (50 / 1000) ** 0.5 = 3.58 -> 4 -> 4
    with pytest.raises(InfeasibleBudget, match="alpha=0.5"):
        MixedDim(alpha=0.5).solve([TableSpec("x", 1000), TableSpec("y", 50)], DIM, Budget(compression_ratio=0.1))
