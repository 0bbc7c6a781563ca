"""Parity of ``mixed_dim`` with its references, against independent ports written here.

- widths: facebookresearch/dlrm ``tricks/md_embedding_bag.py`` (``md_solver``, ``alpha_power_rule``,
  ``pow_2_round``) @ 090956ee2319ddd349a42232958aefccfe3f7b0a;
- alpha bisection: Hsword/Hetu ``tools/EmbeddingMemoryCompression/methods/scheduler/md.py``
  (``MDETrainer._md_solver``, ``get_dims_from_compress_rate``) and ``methods/scheduler/base.py``
  (``binary_search``) @ a1cb1bcaf236c9f1d452733b105997d50c16c9df;
- forward: DLRM ``PrEmbeddingBag`` / Hetu ``methods/layers/mde.py`` ``MDEmbedding`` (lookup at width
  d, then projection to D) at the same commits.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recbench.methods.mixed_dim import MixedDim
from recbench.types import Budget, EmbeddingOptimizer, TableSpec
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from solve_build import solve_and_build

DIM = 16


# ---------------------------------------------------------------- ports of the references
def dlrm_md_solver(n, alpha, d0):
    """md_solver(n, alpha, d0=d0, B=None, round_dim=True, k=None), in torch as DLRM computes it."""
    n = torch.as_tensor(n)
    n_sorted, order = torch.sort(n)
    n_f = n_sorted.to(torch.float)
    lamb = d0 * n_f[0] ** alpha
    d = lamb * n_f ** (-alpha)
    d[0] = d0
    d = torch.round(torch.clamp(d, min=1.0))
    d = 2 ** torch.round(torch.log2(d))
    out = torch.empty_like(d)
    out[order] = d
    return out.to(torch.long).tolist()


def hetu_dims(n, alpha, dim):
    """MDETrainer._md_solver(alpha, round_dim=True, freq=None)."""
    n = np.asarray(n, dtype=np.float64)
    lamb = dim * n.min() ** alpha
    d = np.round(np.maximum(lamb * n ** (-alpha), 1))
    return (2 ** np.round(np.log2(d))).astype(int)


def hetu_search(n, dim, rate):
    """get_dims_from_compress_rate: binary_search(0, 1, evaluate, 1e-3), then Hetu's choice."""
    n = np.asarray(n)
    target = n.sum() * dim * rate

    def memory(alpha):
        d = hetu_dims(n, alpha, dim)
        return float(np.sum(n * d + d * dim * (d != dim)))

    left, right = 0.0, 1.0
    assert target - memory(left) < 0 < target - memory(right)
    while right - left > 1e-3:
        middle = (left + right) / 2
        score = target - memory(middle)
        if score < 0:
            left = middle
        elif score > 0:
            right = middle
    real = float(np.sum(n * hetu_dims(n, left, dim))) / n.sum() / dim  # Hetu's check leaves out projections
    chosen = left if real < rate * (1 + 1e-3) else right
    return left, right, chosen, memory


# ---------------------------------------------------------------- tests
SIZES = [
    [3, 22, 62, 383, 944, 1653],
    [1_000_000, 50, 7, 10_000, 3],
    [101_312, 22_026, 3, 2, 125, 6, 931, 57, 83_516, 1426],
]


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("alpha", [0.0, 0.1, 0.25, 0.5, 0.77, 1.0])
def test_widths_equal_dlrm_md_solver(sizes, alpha):
    tables = [TableSpec(f"f{i}", n) for i, n in enumerate(sizes)]
    m = MixedDim()
    hp = m.hparams_at(tables, DIM, m.popularities(tables, Budget()), alpha)
    ours = [hp["dims"][t.name][0] for t in tables]
    assert ours == dlrm_md_solver(sizes, alpha, DIM)
    assert ours == hetu_dims(sizes, alpha, DIM).tolist()


@pytest.mark.parametrize("sizes", SIZES)
@pytest.mark.parametrize("rate", [0.5, 0.2, 0.1])
def test_alpha_bisection_equals_hetu(sizes, rate):
    tables = [TableSpec(f"f{i}", n) for i, n in enumerate(sizes)]
    left, right, chosen, memory = hetu_search(sizes, DIM, rate)
    hp = MixedDim().solve(tables, DIM, Budget(compression_ratio=rate)).hparams
    assert hp["alpha"] == right  # the feasible end of Hetu's final bracket
    assert [hp["dims"][t.name][0] for t in tables] == hetu_dims(sizes, right, DIM).tolist()
    if chosen == left:  # Hetu keeps `left` when its table bytes alone fit; with projections it exceeds the budget
        assert memory(left) > rate * sum(sizes) * DIM


def test_forward_equals_lookup_then_projection():
    tables = [TableSpec("a", 3), TableSpec("b", 40), TableSpec("c", 900), TableSpec("d", 5000),
              TableSpec("bag", 300, pooling="mean", multi_hot=True)]
    module = solve_and_build(MixedDim(), tables, DIM, Budget(compression_ratio=0.12), EmbeddingOptimizer(kind="sgd")).eval()
    dims = {t.name: module.hparams["dims"][t.name][0] for t in tables}
    assert min(dims.values()) < 4 and max(dims.values()) == DIM  # both lookup paths are exercised
    gen = torch.Generator().manual_seed(0)
    weights = {t.name: torch.randn(t.num_embeddings, dims[t.name], generator=gen) for t in tables}
    projections = {n: torch.randn(d, DIM, generator=gen) for n, d in dims.items() if d < DIM}
    with torch.no_grad():
        for t in tables:
            module.table_weight(f"{t.name}/b0").copy_(weights[t.name])
            if t.name in projections:
                module.projections.weights[f"{t.name}/b0"].copy_(projections[t.name])
    rng = np.random.default_rng(1)
    lengths = {t.name: (rng.integers(0, 4, 8) if t.multi_hot else np.ones(8, dtype=np.int64)) for t in tables}
    values = {t.name: rng.integers(0, t.num_embeddings, int(lengths[t.name].sum())) for t in tables}
    kjt = KeyedJaggedTensor(keys=[t.name for t in tables],
                            values=torch.from_numpy(np.concatenate([values[t.name] for t in tables])),
                            lengths=torch.from_numpy(np.concatenate([lengths[t.name] for t in tables]).astype(np.int32)))
    with torch.no_grad():
        out = module(kjt).to_dict()
    for t in tables:
        start = 0
        for b, size in enumerate(lengths[t.name]):
            ids = values[t.name][start:start + size]
            start += size
            pooled = weights[t.name][torch.from_numpy(ids)].sum(0) if size else torch.zeros(dims[t.name])
            expected = pooled @ projections[t.name] if t.name in projections else pooled
            if t.pooling == "mean" and size:
                expected = expected / size
            assert torch.allclose(out[t.name][b], expected, atol=1e-5), (t.name, b)
