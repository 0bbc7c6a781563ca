"""TT-Rec against the tensor-train equations (Yin et al., MLSys 2021)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_contract import random_kjt  # tests/methods is on sys.path

from recbench.methods.base import InfeasibleBudget
from recbench.methods.tt_rec import TTCores, TTRec, core_parameters, dim_factors, row_factors
from recbench.types import Budget, EmbeddingOptimizer, TableSpec, full_embedding_bytes
from solve_build import solve_and_build

DIM = 16


def specs():
    return [TableSpec("big", 4000), TableSpec("mid", 900), TableSpec("tiny", 7),
            TableSpec("bag", 600, pooling="mean", multi_hot=True)]


def test_factorisations_cover_rows_and_dim():
    for n in (1, 7, 1000, 4000, 12345):
        n1, n2, n3 = row_factors(n)
        assert n1 * n2 * n3 >= n
    assert dim_factors(16) == (2, 2, 4) and np.prod(dim_factors(64)) == 64


def test_lookup_equals_the_materialised_tt_table():
    torch.manual_seed(0)
    cores = TTCores(300, DIM, 3)
    full = cores.full_table()
    ids = torch.arange(300)
    assert torch.allclose(cores(ids), full[:300], atol=1e-6)
    # entry-wise the TT contraction: W[i, (a,b,c)] = sum_rs G0[i0,a,r] G1[i1,r,b,s] G2[i2,s,c],
    # i = i0 + N0 (i1 + N1 i2) (the first core takes the least significant digit)
    i = 123
    i0, i1, i2 = i % cores.n0, (i // cores.n0) % cores.n1, i // (cores.n0 * cores.n1)
    expected = torch.einsum("ar,rbs,sc->abc", cores.core1[i0], cores.core2[i1], cores.core3[i2]).reshape(-1)
    assert torch.allclose(cores(torch.tensor([i]))[0], expected, atol=1e-6)


def test_variance_matched_init_has_the_plain_tables_variance():
    """The ``variance_matched`` option: reconstructed entries have variance 1 / (3 n)."""
    torch.manual_seed(0)
    full = TTCores(300, DIM, 3, "variance_matched").full_table()
    assert float(full.detach().var()) == pytest.approx(1 / 900, rel=0.5)


def test_config_validation():
    with pytest.raises(ValueError, match="init='gauss'.*hetu, fbtt, variance_matched"):
        TTRec(init="gauss")
    with pytest.raises(ValueError, match="rank=0"):
        TTRec(rank=0)


def test_bags_pool_per_id_rows_and_inference_matches():
    tables = specs()
    torch.manual_seed(0)
    module = solve_and_build(TTRec(), tables, DIM, Budget(compression_ratio=0.2), EmbeddingOptimizer(kind="sgd")).eval()
    assert "tiny" not in module.cores and "big" in module.cores
    features = random_kjt(tables, 16, np.random.default_rng(0), max_bag=5)
    with torch.no_grad():
        out = module(features).to_dict()
        table = module.cores["bag"].full_table()
        ids, lengths = features["bag"].values(), features["bag"].lengths().long()
        bag = torch.repeat_interleave(torch.arange(16), lengths)
        expected = torch.zeros(16, DIM).index_add_(0, bag, table[ids]) / lengths.clamp(min=1).unsqueeze(1)
        assert torch.allclose(out["bag"], expected, atol=1e-6)
        assert torch.equal(module(features).values(), module.to_inference()(features).values())


def test_rank_is_the_largest_that_fits():
    tables = specs()
    full = full_embedding_bytes(tables, DIM)
    for ratio in (0.5, 0.3, 0.2):
        hp = TTRec().solve(tables, DIM, Budget(compression_ratio=ratio)).hparams
        assert TTRec().memory(tables, DIM, hp).inference_bytes / full <= ratio
        bigger = TTRec(rank=hp["rank"] + 1)
        with pytest.raises(InfeasibleBudget):
            bigger.solve(tables, DIM, Budget(compression_ratio=ratio))
    hp = TTRec().solve(tables, DIM, Budget(compression_ratio=0.2)).hparams
    assert core_parameters(4000, DIM, hp["rank"]) < 4000 * DIM
    with pytest.raises(InfeasibleBudget, match="reachable range"):
        TTRec().solve(tables, DIM, Budget(compression_ratio=0.001))


def test_cores_are_dense_adam_parameters_and_memory_matches():
    tables = specs()
    method = TTRec()
    hp = method.solve(tables, DIM, Budget(compression_ratio=0.2)).hparams
    module = solve_and_build(method, tables, DIM, Budget(compression_ratio=0.2), EmbeddingOptimizer())
    assert [g.name for g in module.param_groups()] == ["tt_cores"]
    assert module.memory_report() == method.memory(tables, DIM, hp, EmbeddingOptimizer())


def per_value_rows(cores: TTCores, ids: torch.Tensor) -> torch.Tensor:
    """The plain lookup: every value's core slices gathered and contracted, no deduplication."""
    i0, i1, i2 = cores.digits(ids)
    left = torch.einsum("nar,nrbs->nabs", cores.core1[i0], cores.core2[i1])
    return torch.einsum("nabs,nsc->nabc", left, cores.core3[i2]).reshape(len(ids), cores.dim)


@pytest.mark.parametrize("rank", [1, 5])
def test_deduplicated_lookup_equals_the_per_value_contraction_forward_and_gradients(rank):
    """Rows and core gradients equal up to float summation order (repeated ids, shared prefixes)."""
    torch.manual_seed(0)
    cores = TTCores(5000, DIM, rank)
    rng = np.random.default_rng(1)
    for ids in (torch.from_numpy(rng.zipf(1.3, 3000) % 5000), torch.from_numpy(rng.integers(0, 5000, 700)),
                torch.tensor([17]), torch.tensor([4999, 0, 4999])):
        upstream = torch.randn(len(ids), DIM)
        grads = []
        for lookup in (cores, lambda i: per_value_rows(cores, i)):
            cores.zero_grad()
            rows = lookup(ids)
            (rows * upstream).sum().backward()
            grads.append((rows.detach(), [p.grad.clone() for p in cores.parameters()]))
        (fast, fast_grads), (plain, plain_grads) = grads
        assert torch.allclose(fast, plain, rtol=1e-6, atol=1e-7 * float(plain.abs().max()))
        for a, b in zip(fast_grads, plain_grads):
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))
