"""TT-Rec parity with the reference artifacts.

Reference: Hsword/Hetu, commit a1cb1bcaf236c9f1d452733b105997d50c16c9df,
tools/EmbeddingMemoryCompression/methods/layers/tensortrain.py (``TensorTrainEmbedding.__call__``:
the lookup and its digit order; the core initialiser ``GenReversedTruncatedNormal`` with
stddev 1 / sqrt(prod(N) / 3)^(1/3), whose sampler python/hetu dnnl ``cpu_ReversedTruncatedNormalInit``
keeps only |z| >= 2 stddev) and methods/scheduler/tensortrain.py (``_get_decomp_emb``,
``_get_decomp_dim``, ``_get_single_memory``, ``_get_rank``); facebookresearch/FBTT-Embedding,
commit b95947ccd32cf9ab851242cc606562f2a74d9efa, tt_embeddings_ops.py
(``reset_parameters("approx-normal")``: |z| >= 2 tails times (1 / sqrt(3 n))^(1/3)).

The reference computations are re-implemented here in numpy, independently of recbench's code.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recbench.methods.tt_rec import TTCores, TTRec, core_parameters, dim_factors, row_factors
from recbench.types import Budget, TableSpec, full_embedding_bytes


def hetu_decomp_emb(nemb):
    n1 = math.ceil(nemb ** (1 / 3))
    n2 = math.ceil((nemb / n1) ** (1 / 2))
    n3 = math.ceil(nemb / n1 / n2)
    return [n3, n2, n1]


def hetu_decomp_dim(dim):
    if dim & (dim - 1) == 0:
        out, idx, dim = [2, 2, 2], 2, dim // 8
        while dim != 1:
            out[idx] *= 2
            dim //= 2
            idx = (idx - 1) % 3
        return out
    n1 = math.ceil(dim ** (1 / 3))
    while dim % n1:
        n1 -= 1
    rest = dim // n1
    n2 = math.ceil(rest ** 0.5)
    while rest % n2:
        n2 -= 1
    return sorted([n1, n2, rest // n2])


def hetu_lookup(flat_cores, nembs, ndims, rank, ids):
    """Hetu's TensorTrainEmbedding lookup: cores (N_i, r_{i-1} d_i r_i), ids (N,) -> (N, D)."""
    ranks = [1, rank, rank, 1]
    indices, accum, accum_dim = ids.copy(), None, 1
    for i in range(3):
        if i == 2:
            cur = indices
        else:
            cur, indices = indices % nembs[i], indices // nembs[i]
        part = flat_cores[i][cur]
        if i == 0:
            accum = part
        else:
            accum = accum.reshape(-1, accum_dim, ranks[i])
            part = part.reshape(-1, ranks[i], ndims[i] * ranks[i + 1])
            accum = np.matmul(accum, part)
        accum_dim *= ndims[i]
    return accum.reshape(-1, accum_dim)


def tail_second_moment():
    """E[z^2 | |z| >= 2] for z ~ N(0, 1), by numerical integration of the tail."""
    z = np.linspace(2.0, 40.0, 400_001)
    density = np.exp(-z * z / 2) / np.sqrt(2 * np.pi)
    return np.trapezoid(z * z * density, z) / np.trapezoid(density, z)


@pytest.mark.parametrize("n", [1, 7, 27, 943, 1682, 4000, 101_313, 33_762_577])
def test_row_factors_are_hetus(n):
    assert list(row_factors(n)) == hetu_decomp_emb(n)


@pytest.mark.parametrize("dim", [8, 12, 16, 20, 24, 32, 64, 128])
def test_dim_factors_are_hetus(dim):
    assert list(dim_factors(dim)) == hetu_decomp_dim(dim)


def test_core_bytes_are_hetus_single_memory():
    for n, dim, rank in [(4000, 16, 3), (101_313, 16, 17), (943, 32, 5)]:
        nemb, ndim = hetu_decomp_emb(n), hetu_decomp_dim(dim)
        hetu = (nemb[0] * ndim[0] + nemb[1] * ndim[1] * rank + nemb[2] * ndim[2]) * rank
        assert core_parameters(n, dim, rank) == hetu


@pytest.mark.parametrize("n,rank", [(943, 3), (1682, 4), (4000, 2)])
def test_reconstructed_table_equals_hetus_tt_lookup_of_the_same_cores(n, rank):
    torch.manual_seed(0)
    cores = TTCores(n, 16, rank)
    flat = [c.detach().numpy().astype(np.float64).reshape(c.shape[0], -1)
            for c in (cores.core1, cores.core2, cores.core3)]
    ids = np.arange(n)
    expected = hetu_lookup(flat, hetu_decomp_emb(n), hetu_decomp_dim(16), rank, ids)
    with torch.no_grad():
        ours = cores(torch.from_numpy(ids)).double().numpy()
        assert np.allclose(ours, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
        assert np.allclose(cores.full_table()[:n].double().numpy(), expected, rtol=1e-5,
                           atol=1e-6 * np.abs(expected).max())
    # the digit order matters: id 1 moves the first core's row (least significant digit)
    one = hetu_lookup([f.copy() for f in flat], hetu_decomp_emb(n), hetu_decomp_dim(16), rank, np.array([1]))
    flat[0][1] += 1.0
    assert not np.allclose(hetu_lookup(flat, hetu_decomp_emb(n), hetu_decomp_dim(16), rank, np.array([1])), one)


def test_rank_is_hetus_largest_rank_within_the_target():
    """Hetu's ``_get_rank`` with use_multi = 1 and threshold 0: sum over fields of min(plain, cores)."""
    tables = [TableSpec("a", 20_000), TableSpec("b", 3_000), TableSpec("c", 40)]
    dim, budget = 16, Budget(compression_ratio=0.1, min_rows_to_compress=0)
    target = 0.1 * sum(t.num_embeddings for t in tables) * dim

    def hetu_memory(rank):
        ndim = hetu_decomp_dim(dim)
        total = 0
        for t in tables:
            nemb = hetu_decomp_emb(t.num_embeddings)
            new = (nemb[0] * ndim[0] + nemb[1] * ndim[1] * rank + nemb[2] * ndim[2]) * rank
            total += min(t.num_embeddings * dim, new)
        return total

    expected = max(r for r in range(1, 1000) if hetu_memory(r) <= target)
    hp = TTRec().solve(tables, dim, budget).hparams
    assert hp["rank"] == expected and hp["init"] == "hetu"
    assert TTRec().memory(tables, dim, hp).inference_bytes == 4 * hetu_memory(expected)
    assert TTRec().memory(tables, dim, hp).inference_bytes <= 0.1 * full_embedding_bytes(tables, dim)


@pytest.mark.parametrize("init", ["hetu", "fbtt"])
@pytest.mark.parametrize("rank", [4, 16])
def test_init_std_of_reconstructed_entries_matches_the_reference_formula(init, rank):
    n = 20_000
    nemb = hetu_decomp_emb(n)
    if init == "hetu":  # GenReversedTruncatedNormal(stddev=1 / ((sqrt(1/3 * prod(nemb))) ** (1/3)))
        scale = 1 / (np.sqrt(1 / 3 * np.prod(nemb)) ** (1 / 3))
    else:  # FBTT approx-normal: scale = (1 / sqrt(3 n)) ** (1/3)
        scale = np.power(1 / np.sqrt(3 * n), 1 / 3)
    core_var = tail_second_moment() * scale ** 2
    expected = np.sqrt(rank * rank * core_var ** 3)  # r^2 independent products of three entries
    torch.manual_seed(1)
    cores = TTCores(n, 16, rank, init)
    for core in (cores.core1, cores.core2, cores.core3):
        assert float(core.detach().abs().min()) >= 2 * scale * (1 - 1e-6)  # only the tails |z| >= 2
    with torch.no_grad():
        measured = float(cores.full_table()[:n].double().std())
    assert measured == pytest.approx(expected, rel=0.10)


def test_reference_inits_are_far_larger_than_the_variance_matched_one():
    """At n = N, FBTT's entries are r * v^(3/2) = 55x, 220x, 882x the old std at r = 4, 16, 64."""
    from recbench.methods.tt_rec import entry_std

    n = 64_000  # 40^3: no padding, so Hetu's N equals n
    v = tail_second_moment()
    for rank, ratio in [(4, 55.1), (16, 220.4), (64, 881.6)]:
        old = entry_std("variance_matched", n, rank)
        assert old == pytest.approx(1 / math.sqrt(3 * n))
        assert entry_std("fbtt", n, rank) / old == pytest.approx(ratio, rel=1e-3)
        assert entry_std("fbtt", n, rank) / old == pytest.approx(rank * v ** 1.5, rel=1e-6)
        assert entry_std("hetu", n, rank) / entry_std("fbtt", n, rank) == pytest.approx(3.0, rel=1e-6)
