"""adapt: DeepRec's Adaptive Embedding as the VLDB 2024 artifact's ``adapt``.

Parity test against an independent small port of the reference's defining computation
(Hsword/Hetu tools/EmbeddingMemoryCompression at a1cb1bcaf236c9f1d452733b105997d50c16c9df):
``models/load_data.py`` (``_binary_search_frequency`` recursive, ``get_single_frequency_split``,
``remap_split_frequency`` as its per-id loop), ``methods/scheduler/adapt.py`` (``_split_freq_rare``,
the compressed-or-full rule of ``get_embed_layer``) and ``methods/layers/adapt.py`` (remap lookup,
``mod_hash_negative`` = src/ops/CompressedEmbedding.cu, two lookups where a negative index reads
zeros (src/ops/EmbeddingLookup.cu), summed). For given frequency lists and budgets: which ids are
frequent, each table's sizes, and every id's vector equal the port's. Also: the rate is the largest
whose bytes fit, memory equals the closed form, exact_split keeps round(n * top_percent) ids.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.adapt import Adapt
from recbench.methods.base import InfeasibleBudget
from recbench.types import Budget, EmbeddingOptimizer, TableSpec, full_embedding_bytes

DIM = 8
OPT = EmbeddingOptimizer(kind="sgd", learning_rate=0.1)


@pytest.fixture(scope="module")
def tables():
    rng = np.random.default_rng(3)

    def counts(n, exponent):
        return rng.permutation(np.floor(2000 / np.arange(1, n + 1) ** exponent).astype(np.int64))  # tied tail

    return [TableSpec("a", 700, counts(700, 1.1)), TableSpec("b", 130, counts(130, 0.8)),
            TableSpec("c", 5, np.array([0, 40, 3, 40, 9])),
            TableSpec("bag", 90, counts(90, 1.0), pooling="mean", multi_hot=True)]


# ----------------------------------------------------------------------------- the independent port
def port_search(left, right, counter, target):
    if left >= right - 1:
        return left
    middle = (left + right) // 2
    high = np.sum(counter >= middle)
    if high > target:
        return port_search(middle, right, counter, target)
    if high < target:
        return port_search(left, middle, counter, target)
    return middle


def port_remap(counter, top_percent):
    nhigh = len(counter) * top_percent
    kth = port_search(np.min(counter), np.max(counter) + 1, counter, nhigh)
    frequency = (counter >= kth).astype(np.int32)
    remap = np.zeros(frequency.shape, dtype=np.int32)
    hidx, lidx = 0, 1
    for i, ind in enumerate(frequency):
        if ind:
            remap[i] = hidx
            hidx += 1
        else:
            remap[i] = -lidx
            lidx += 1
    return remap


def port_split(nemb, remap, compress_rate):
    nfreq = remap.max() + 1
    nrare = math.ceil(nemb * compress_rate) - nfreq
    return nfreq, nrare, nrare > 0 and nfreq + nrare < nemb


def port_lookup(ids, remap, freq_emb, rare_emb):
    """AdaptiveEmbedding.__call__ for a (N,) id array -> (N, D)."""
    def lookup(table, index):
        out = np.zeros((index.size, table.shape[1]), dtype=table.dtype)
        ok = (index >= 0) & (index < table.shape[0])
        out[ok] = table[index[ok]]
        return out

    r = remap[ids]
    prev = -(r + 1)
    low_inds = np.where(prev >= 0, prev % max(rare_emb.shape[0], 1), prev)
    return lookup(freq_emb, r) + lookup(rare_emb, low_inds)


def port_bytes(tables, dim, rate, top_percent):
    """Inference bytes at rate c: the artifact's tables + one bit per compressed id + an int32 per 64."""
    total, ids = 0, 0
    for t in tables:
        f, r, ok = port_split(t.num_embeddings, port_remap(np.asarray(t.counts), top_percent), rate)
        total += ((f + r) if ok else t.num_embeddings) * dim * 4
        ids += t.num_embeddings if ok else 0
    return total + (math.ceil(ids / 8) + 4 * math.ceil(ids / 64) if ids else 0)


def one_hot_kjt(tables, name, ids):
    keys = [t.name for t in tables]
    values, lengths = [], []
    for t in tables:
        n = ids.size if t.name == name else 0
        values.append(torch.from_numpy(ids) if t.name == name else torch.zeros(0, dtype=torch.int64))
        lengths.append(torch.ones(ids.size, dtype=torch.int32) if t.name == name else torch.zeros(ids.size, dtype=torch.int32))
    return KeyedJaggedTensor(keys=keys, values=torch.cat(values), lengths=torch.cat(lengths))


# ----------------------------------------------------------------------------- parity
@pytest.mark.parametrize("ratio", [0.5, 0.1, 0.05])
def test_rows_and_vectors_match_the_artifact(tables, ratio):
    m = Adapt()
    plan = m.solve(tables, DIM, Budget(compression_ratio=ratio), OPT)
    hp = plan.hparams
    assert hp["top_percent"] == pytest.approx(min(0.1, ratio / 2))
    torch.manual_seed(0)
    module = m.build(tables, DIM, plan, OPT)
    compressed = 0
    for t in tables:
        remap = port_remap(np.asarray(t.counts), hp["top_percent"])
        nfreq, nrare, ok = port_split(t.num_embeddings, remap, hp["rate"])
        assert (t.name in hp["fields"]) == ok
        weight = module.fused.weight(t.name).detach().numpy()
        ids = np.arange(t.num_embeddings)
        got = module(one_hot_kjt(tables, t.name, ids))[t.name].detach().numpy()
        if not ok:
            assert weight.shape[0] == t.num_embeddings
            np.testing.assert_array_equal(got, weight)
            continue
        compressed += 1
        assert hp["fields"][t.name] == [nfreq, nrare]
        expected = port_lookup(ids, remap, weight[:nfreq], weight[nfreq:nfreq + nrare])
        np.testing.assert_array_equal(got, expected)
    assert compressed >= 2


def test_rate_is_the_largest_that_fits(tables):
    ratio = 0.1
    plan = Adapt().solve(tables, DIM, Budget(compression_ratio=ratio), OPT)
    limit = int(ratio * full_embedding_bytes(tables, DIM))
    rate, tp = plan.hparams["rate"], plan.hparams["top_percent"]
    assert plan.memory.inference_bytes == port_bytes(tables, DIM, rate, tp) <= limit
    # every breakpoint k/n_f of any field above the solved rate exceeds the budget (brute force)
    above = sorted({k / t.num_embeddings + 1e-7 for t in tables for k in range(t.num_embeddings + 1)})
    for c in above:
        if rate + 1e-6 < c < 1:
            assert port_bytes(tables, DIM, c, tp) > limit, c


def test_memory_closed_form_equals_measured(tables):
    m = Adapt()
    plan = m.solve(tables, DIM, Budget(compression_ratio=0.1), OPT)
    module = m.build(tables, DIM, plan, OPT)
    assert module.memory_report().inference_bytes == plan.memory.inference_bytes
    assert module.memory_report().breakdown == plan.memory.breakdown
    assert plan.memory.breakdown["remap"] > 0


def test_init_is_the_artifacts_uniform(tables):
    m = Adapt()
    module = m.build(tables, DIM, m.solve(tables, DIM, Budget(compression_ratio=0.5), OPT), OPT)
    bound = (1 / 700) ** 0.5
    for t in tables:
        w = module.fused.weight(t.name).detach()
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.8 * bound


def test_training_updates_only_the_rows_read(tables):
    m = Adapt()
    module = m.build(tables, DIM, m.solve(tables, DIM, Budget(compression_ratio=0.1), OPT), OPT)
    before = module.fused.weight("a").detach().clone()
    ids = np.array([5, 6, 5])
    rows = module.rows_of(one_hot_kjt(tables, "a", ids))
    module(one_hot_kjt(tables, "a", ids))["a"].sum().backward()
    changed = torch.nonzero((module.fused.weight("a") != before).any(1)).flatten()
    assert set(changed.tolist()) == set(rows.tolist())


def test_exact_split_keeps_round_nhigh(tables):
    m = Adapt(exact_split=True, top_percent=0.1)
    masks = m.masks(tables, ["a", "b"], 0.1)
    assert int(masks["a"].sum()) == round(700 * 0.1) and int(masks["b"].sum()) == round(130 * 0.1)
    # every kept id counts at least as much as every dropped one
    counts = np.asarray(tables[0].counts)
    assert counts[masks["a"]].min() >= counts[~masks["a"]].max()
    loose = Adapt().masks(tables, ["a"], 0.1)["a"]
    assert loose.sum() >= masks["a"].sum() and not (masks["a"] & ~loose).any()


def test_infeasible_and_bad_settings(tables):
    with pytest.raises(InfeasibleBudget):
        Adapt().solve(tables, DIM, Budget(compression_ratio=0.001), OPT)
    with pytest.raises(ValueError, match="top_percent"):
        Adapt(top_percent=1.5)
    with pytest.raises(ValueError, match="exact_split"):
        Adapt(exact_split="yes")
    with pytest.raises(ValueError, match="counts"):
        Adapt().solve([TableSpec("x", 50, None)], DIM, Budget(compression_ratio=0.5), OPT)
