"""``cce`` against an independent numpy port of thomasahle/cce ``cce/cce.py`` (``CCEmbedding.forward``
and the reassignment in ``CCEmbedding.cluster``) and ``cce/_tools.py`` (``KMeans.fit``, Faiss's Lloyd)
at commit 5b8a93c1a3f4d3741872338d659702aee3ddae34; the schedule of ``examples/movielens.py``
(cluster after each epoch e < int(0.75 x epochs), after that epoch's validation); the budget
with the bit-packed assignment arrays counted.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from test_contract import random_kjt

from recbench.methods.base import InfeasibleBudget
from recbench.methods.cce import CCE, ClusterHook, kmeans, reassign, split_empty
from recbench.types import Budget, EmbeddingOptimizer, TableSpec

DIM, P = 16, (1 << 31) - 1
OPT = EmbeddingOptimizer(kind="sgd", learning_rate=0.1)


def spec(name, n, pooling="sum", multi_hot=False):
    return TableSpec(name, n, np.ones(n, dtype=np.int64), pooling=pooling, multi_hot=multi_hot)


@pytest.fixture(scope="module")
def tables():
    return [spec("user", 944), spec("item", 1653), spec("gender", 3), spec("genre", 400, "mean", True)]


@pytest.fixture(scope="module")
def small():
    return [spec("user", 300), spec("gender", 3), spec("genre", 200, "mean", True)]


def build(tables, ratio=0.1, seed=0, **settings):
    m = CCE(**settings)
    plan = m.solve(tables, DIM, Budget(compression_ratio=ratio), OPT)
    torch.manual_seed(seed)
    return m, plan, m.build(tables, DIM, plan, OPT)


def kjt(tables, rng, batch=8, max_bag=3):
    return random_kjt(tables, batch, rng, max_bag)


# ---------------------------------------------------------------- independent port of the reference
def reference_state(module, name):
    """The reference's (table0, table1 (rows, c, w), h0, h1 (vocab, c)) of one field, h1 from an
    independent port of the universal hash ((a x + b) mod p) mod M."""
    c, m = module.n_chunks, module.rows[name]
    i = module.index[name]
    n = next(t.num_embeddings for t in module.tables if t.name == name)
    t0 = np.stack([module.fused.weight(f"{name}/t0c{j}").detach().numpy() for j in range(c)], 1)
    t1 = np.stack([module.fused.weight(f"{name}/t1c{j}").detach().numpy() for j in range(c)], 1)
    h0 = module.h0(i).numpy().astype(np.int64)
    x = np.arange(n, dtype=object)
    h1 = np.stack([np.array([((int(module.a[i, j]) * int(v) + int(module.b[i, j])) % P) % m for v in x])
                   for j in range(c)], 1).astype(np.int64)
    return t0, t1, h0, h1


def reference_forward(state, ids):
    """CCEmbedding.forward: (table0[h0[x], range(c)] + table1[h1[x], range(c)]).flatten(1, 2)."""
    t0, t1, h0, h1 = state
    cols = np.arange(t0.shape[1])
    return (t0[h0[ids], cols] + t1[h1[ids], cols]).reshape(len(ids), -1)


def reference_reassign(vecs, centroids, new_h1):
    """CCEmbedding.cluster's body for one column, given the centroids and the fresh h1."""
    d = ((vecs[:, None, :] - centroids[None, :, :]) ** 2).sum(-1)
    h0 = d.argmin(1)
    resid = vecs - centroids[h0]
    sums = np.zeros_like(centroids)
    np.add.at(sums, new_h1, resid)
    counts = np.bincount(new_h1, minlength=len(centroids)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        table1 = sums / counts[:, None]  # the reference: NaN in rows no id hashes to
    return h0, centroids, table1


def test_forward_matches_reference_port(tables):
    _, plan, module = build(tables)
    assert set(plan.hparams["rows"]) == {"user", "item", "genre"}  # 3 rows of gender are cheaper in full
    features = kjt(tables, np.random.default_rng(0), batch=16)
    with torch.no_grad():
        out = module(features).to_dict()
    for t in tables:
        if t.name not in plan.hparams["rows"]:
            continue
        state = reference_state(module, t.name)
        jag = features[t.name]
        ids, lengths = jag.values().numpy(), jag.lengths().numpy()
        per_id = reference_forward(state, ids)
        start = 0
        for bag, n in enumerate(lengths):
            expected = per_id[start:start + n].sum(0) if n else np.zeros(DIM)
            if t.pooling == "mean" and n:
                expected = expected / n
            start += n
            np.testing.assert_allclose(out[t.name][bag].numpy(), expected, atol=1e-6)


def test_reassignment_matches_reference_port():
    rng = np.random.default_rng(1)
    vecs = rng.normal(size=(300, 4))
    centroids = rng.normal(size=(12, 4))
    new_h1 = rng.integers(0, 11, 300)  # row 11 gets no id: the reference's NaN, recbench's 0
    h0, t0, t1 = reassign(torch.from_numpy(vecs), torch.from_numpy(centroids), torch.from_numpy(new_h1), 12)
    rh0, rt0, rt1 = reference_reassign(vecs, centroids, new_h1)
    np.testing.assert_array_equal(h0.numpy(), rh0)
    np.testing.assert_allclose(t0.numpy(), rt0)
    np.testing.assert_allclose(t1[:11].numpy(), rt1[:11], atol=1e-12)
    assert np.isnan(rt1[11]).all() and (t1[11] == 0).all()


def test_kmeans_matches_lloyd_port():
    rng = np.random.default_rng(2)
    centres = rng.normal(scale=10.0, size=(6, 4))
    x = np.concatenate([c + rng.normal(size=(50, 4)) for c in centres])
    got = kmeans(torch.from_numpy(x), 6, 20, torch.Generator().manual_seed(5)).numpy()
    # the same start: k distinct points drawn by the same permutation
    start = torch.randperm(len(x), generator=torch.Generator().manual_seed(5))[:6].numpy()
    c = x[start].copy()
    for _ in range(20):
        a = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
        c = np.stack([x[a == k].mean(0) if (a == k).any() else c[k] for k in range(6)])
    np.testing.assert_allclose(got, c, atol=1e-9)
    # n <= k: the points, then N(0, 1/d) centres (the reference's KMeans.fit)
    few = kmeans(torch.from_numpy(x[:3]), 5, 10, torch.Generator().manual_seed(0))
    assert few.shape == (5, 4) and torch.equal(few[:3], torch.from_numpy(x[:3]))


def test_empty_cluster_is_split_as_faiss():
    centres = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    out = split_empty(centres.clone(), torch.tensor([0, 5, 0]), torch.Generator().manual_seed(0))
    eps = 1 / 1024
    # both empty centres take from the only cluster with more than one point; the second halves it again
    assert torch.allclose(out[0], torch.tensor([3 * (1 + eps), 4 * (1 - eps)]))
    assert not torch.equal(out[1], centres[1]) and not torch.equal(out[2], centres[2])


def test_cluster_round_reassigns_to_the_nearest_centre_and_keeps_the_deployable_form_exact(small):
    tables = small
    _, plan, module = build(tables)
    before = {name: reference_state(module, name) for name in plan.hparams["rows"]}
    result = module.cluster(iterations=10, sample_factor=200)
    assert int(module.cluster_round) == 1 and 0 < result["distortion"] < 1
    for name, m in plan.hparams["rows"].items():
        n = next(t.num_embeddings for t in tables if t.name == name)
        old = reference_forward(before[name], np.arange(n)).reshape(n, module.n_chunks, -1)
        t0, t1, h0, h1 = reference_state(module, name)
        for j in range(module.n_chunks):
            rh0, _, rt1 = reference_reassign(old[:, j], t0[:, j].astype(np.float64), h1[:, j])
            np.testing.assert_array_equal(h0[:, j], rh0)  # every id at its nearest centre (T0 = the centres)
            filled = ~np.isnan(rt1).any(1)
            np.testing.assert_allclose(t1[filled, j], rt1[filled], atol=1e-5)
            assert (h1[:, j] != before[name][3][:, j]).any(), "h1 must be a fresh hash"
    features = kjt(tables, np.random.default_rng(3))
    with torch.no_grad():
        assert torch.equal(module(features).values(), module.to_inference()(features).values())


def test_clustering_is_reproducible_from_the_run_seed(small):
    results = []
    for seed in (0, 0, 1):
        _, _, module = build(small, seed=seed)
        module.cluster(iterations=2, sample_factor=200)
        results.append(module.h0(0).clone())
    assert torch.equal(results[0], results[1]) and not torch.equal(results[0], results[2])


def fake_context(embedding, train_rows, batch, evals, epochs):
    trainer = SimpleNamespace(split=lambda _: range(train_rows),
                              config=SimpleNamespace(batch_size=batch, evals_per_epoch=evals, max_epochs=epochs,
                                                     max_steps=None))
    return SimpleNamespace(trainer=trainer, stage=SimpleNamespace(max_steps=None, max_epochs=None), stage_step=0,
                           embedding=embedding)


@pytest.mark.parametrize("train_rows,evals", [(1000, 2), (1000, 3)])
def test_schedule_clusters_after_each_of_the_first_three_quarters_of_the_epochs(train_rows, evals):
    log = []
    embedding = SimpleNamespace(cluster=lambda *a: log.append(("cluster", context.stage_step)) or
                                {"distortion": 0.5})
    context = fake_context(embedding, train_rows, 100, evals, epochs=8)
    hook = ClusterHook(CCE())
    per_epoch, eval_every = 10, max(1, 10 // evals)
    for step in range(1, 8 * per_epoch + 1):  # the trainer's order: on_step_end, then (maybe) an evaluation
        context.stage_step = step
        hook.on_step_end(context)
        if step % eval_every == 0 or step == 8 * per_epoch:
            log.append(("eval", step))
            hook.on_eval_end(context, {"auc": 0.5})
    clusters = [s for kind, s in log if kind == "cluster"]
    assert clusters == [10, 20, 30, 40, 50, 60]  # epochs 0..5 < int(0.75 x 8) = 6
    for s in clusters:  # an evaluation on the epoch's last step comes first (validate, then cluster)
        if s % eval_every == 0:
            assert log.index(("eval", s)) < log.index(("cluster", s))
    assert hook.on_stage_end(context) == {"cluster_rounds": 6, "last_cluster_distortion": 0.5}


def test_budget_counts_packed_assignments_and_hashes(tables):
    m, plan, module = build(tables, ratio=0.1)
    rows, mem = plan.hparams["rows"], plan.memory
    dims = {t.name: t.num_embeddings for t in tables}
    bits = math.ceil(math.log2(plan.hparams["row_count"]))
    weights = sum(2 * r * DIM * 4 for r in rows.values()) + 3 * DIM * 4  # gender in full
    packed = sum(math.ceil(dims[name] * 4 * bits / 8) for name in rows)
    assert mem.breakdown == {"weights": weights, "assignments": packed, "hash": len(rows) * 2 * 4 * 8}
    assert mem.inference_bytes == weights + packed + len(rows) * 64 <= 0.1 * mem.full_bytes
    deployable = module.to_inference()
    held = sum(b.numel() * b.element_size() for b in deployable.buffers()) + \
        sum(p.numel() * p.element_size() for p in deployable.parameters())
    assert held == mem.inference_bytes
    # one row per table still needs 4 bits per id for the assignments: 0.01 is out of reach
    with pytest.raises(InfeasibleBudget, match="cannot reach"):
        m.solve(tables, DIM, Budget(compression_ratio=0.01))


@pytest.mark.parametrize("key,value", [("n_chunks", 3), ("n_chunks", 0), ("kmeans_iterations", 0),
                                       ("last_cluster_epoch", -1), ("rows", 10)])
def test_bad_settings_are_refused(tables, key, value):
    with pytest.raises(ValueError, match=key):
        CCE(**{key: value}).solve(tables, DIM, Budget(compression_ratio=0.1))
