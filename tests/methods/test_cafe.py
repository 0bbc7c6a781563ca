"""CAFE: the top-H HotSketch's semantics and top-k recall on a Zipf stream, training with the
default threshold sketch (promotion, demotion at a decay, row ownership), the top-H variant's
migration (copy-in, write-back), lookups of hot and cold ids, and budgets down to 1e-4 on a large
vocabulary. Parity with the artifact: test_cafe_parity.py."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.base import InfeasibleBudget
from recbench.methods.cafe import TABLE, Cafe, CafeEmbedding
from recbench.methods.blocks.hot_sketch import HotSketch
from recbench.types import Budget, EmbeddingOptimizer, TableSpec
from solve_build import solve_and_build

DIM = 8
#: stated levels: the sketch's top-k holds >= 90% of the true top-k ids of a Zipf(1.1) stream with
#: 4 slots per tracked id, >= 75% with 2 (the default sketch_slots_per_hot); measured 0.94 / 0.79
RECALL_LEVELS = {4: 0.9, 2: 0.75}


def sequential_insert(sketch: HotSketch, keys, values):
    """Reference: the insert rule applied one id at a time (plain Python)."""
    for k, v in zip(keys.tolist(), values.tolist()):
        b = int(sketch.bucket(torch.tensor([k]))[0])
        slots = sketch.keys[b].tolist()
        if k in slots:
            s = slots.index(k)
            sketch.scores[b, s] += v
        elif -1 in slots:
            s = slots.index(-1)
            sketch.keys[b, s], sketch.scores[b, s], sketch.rows[b, s] = k, v, -1
        else:
            s = int(torch.argmin(sketch.scores[b]))
            sketch.keys[b, s], sketch.scores[b, s], sketch.rows[b, s] = k, sketch.scores[b, s] + v, -1


def test_vectorised_insert_equals_sequential_insert():
    rng = np.random.default_rng(0)
    fast, slow = HotSketch(7, 4, seed=3, replacement="space_saving"), HotSketch(7, 4, seed=3)
    for _ in range(20):
        keys = torch.from_numpy(rng.choice(200, 40, replace=False))
        values = torch.from_numpy(rng.random(40).astype(np.float32))
        fast.insert(keys, values)
        order = torch.argsort(fast.bucket(keys), stable=True)  # the rounds' order within a bucket
        sequential_insert(slow, keys[order], values[order])
    assert torch.equal(fast.keys, slow.keys)
    assert torch.allclose(fast.scores, slow.scores)


def test_decay_replacement_keeps_heavy_ids_against_a_cold_stream():
    sketch = HotSketch(1, 4, seed=0)
    sketch.insert(torch.arange(4), torch.full((4,), 50.0))
    for start in range(100, 2100, 20):  # 2000 distinct cold ids of score 1
        sketch.insert(torch.arange(start, start + 1), torch.ones(1))
    assert set(sketch.keys[0].tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("slots_per_id", [4, 2])
def test_sketch_top_k_recall_on_a_zipf_stream(slots_per_id):
    rng = np.random.default_rng(0)
    vocabulary, k = 100_000, 500
    probabilities = 1.0 / np.arange(1, vocabulary + 1) ** 1.1
    probabilities /= probabilities.sum()
    permutation = rng.permutation(vocabulary)  # hot ids are not the small ids
    sketch = HotSketch(buckets=slots_per_id * k // 4, slots=4, seed=0)
    totals = np.zeros(vocabulary)
    for _ in range(200):
        batch = permutation[rng.choice(vocabulary, 2048, p=probabilities)]
        keys, counts = np.unique(batch, return_counts=True)
        totals[keys] += counts
        sketch.insert(torch.from_numpy(keys), torch.from_numpy(counts.astype(np.float32)))
    true_top = set(np.argsort(-totals, kind="stable")[:k].tolist())
    found = set(sketch.top_keys(k).tolist())
    recall = len(true_top & found) / k
    assert recall >= RECALL_LEVELS[slots_per_id], f"top-{k} recall {recall:.3f} < {RECALL_LEVELS[slots_per_id]}"


def specs():
    rng = np.random.default_rng(0)
    return [TableSpec("a", 400, rng.integers(0, 9, 400)), TableSpec("b", 150, rng.integers(0, 9, 150)),
            TableSpec("tags", 30, rng.integers(0, 9, 30), pooling="mean", multi_hot=True)]


def one_hot_kjt(a_ids, b_ids):
    n = len(a_ids)
    return KeyedJaggedTensor(keys=["a", "b", "tags"], values=torch.cat([a_ids, b_ids]),
                             lengths=torch.cat([torch.ones(2 * n, dtype=torch.int32), torch.zeros(n, dtype=torch.int32)]))


#: recbench's earlier default, kept as options
TOP_H = dict(promotion="top_h", hash_layout="shared", importance="batch", write_back=True, sketch_slots_per_hot=2.0,
             hash_rate=0.5)


def assert_consistent(module: CafeEmbedding):
    rows = module.sketch.rows.flatten()
    keys = module.sketch.keys.flatten()
    hot = rows >= 0
    assert rows[hot].unique().numel() == int(hot.sum()), "an exclusive row has two owners"
    assert int(hot.sum()) <= module.hot_rows
    assert torch.equal(module.row_owner[rows[hot].long()], keys[hot]), "row_owner disagrees with the sketch"
    assert int((module.row_owner >= 0).sum()) == int(hot.sum())


@pytest.mark.parametrize("levels", [1, 2])
def test_migration_copies_in_writes_back_and_keeps_ownership(levels):
    tables = specs()
    module = solve_and_build(Cafe(**TOP_H, hash_levels=levels, decay=0.9), tables, DIM, Budget(0.2), EmbeddingOptimizer(kind="sgd", learning_rate=0.1))
    module.train()
    rng = np.random.default_rng(1)
    hot_ids = torch.arange(10)
    for step in range(40):
        a = torch.cat([hot_ids, torch.from_numpy(rng.integers(10, 400, 54))])  # ids 0..9 in every batch
        b = torch.from_numpy(rng.integers(0, 150, 64))
        out = module(one_hot_kjt(a, b))
        (out.values() * torch.randn_like(out.values())).sum().backward()
        module.flush()
        assert_consistent(module)
    exclusive, _ = module.sketch.lookup(module.key_offset[0] + hot_ids)
    # ids seen in every batch (score ~ 1/(1 - decay) = 10) outrank every other id (<= 4.3); the
    # probabilistic replacement may still keep one out of a crowded bucket for a while
    assert int((exclusive >= 0).sum()) >= 8, "ids seen in every batch are hot"
    # a newly promoted id's exclusive row equals its hashed vector at promotion
    candidates = module.key_offset[1] + torch.arange(150)
    key = int(candidates[module.sketch.lookup(candidates)[0] < 0][0])  # a cold id
    lost_keys, lost_rows = module.sketch.insert(torch.tensor([key]), torch.tensor([1e6]))
    module._demote(lost_keys, lost_rows)
    module.migrate()
    row, _ = module.sketch.lookup(torch.tensor([key]))
    hashed = module.hashed_vectors(torch.tensor([key]))  # promotion leaves hash rows unchanged
    weight = module.fused.weight(TABLE)
    assert int(row) >= 0 and torch.allclose(weight[int(row)], hashed[0])
    # write-back: after demotion the id's hashed vector equals the exclusive vector it had
    with torch.no_grad():
        weight[int(row)] += 1.0
    expected = weight[int(row)].clone()
    module.sketch.scores.zero_()
    module.sketch.scores.view(-1)[(module.sketch.keys.view(-1) != key)] = 1.0  # the id falls out of the top
    module.migrate()
    assert int(module.sketch.lookup(torch.tensor([key]))[0]) == -1
    after = module.hashed_vectors(torch.tensor([key]))
    assert torch.allclose(after[0], expected, atol=1e-5)
    assert_consistent(module)


def test_threshold_sketch_training_promotes_demotes_and_keeps_ownership():
    tables = specs()
    method = Cafe(threshold=4, decay=0.5, decay_volume=1.0)
    module = solve_and_build(method, tables, DIM, Budget(0.2), EmbeddingOptimizer(kind="sgd", learning_rate=0.1))
    module.train()
    rng = np.random.default_rng(1)
    for step in range(30):
        hot = torch.arange(5) + 20 * (step // 15)  # the hot ids change half way
        a = torch.cat([hot.repeat(4), torch.from_numpy(rng.integers(40, 400, 44))])
        out = module(one_hot_kjt(a, torch.from_numpy(rng.integers(0, 150, 64))))
        (out.values() * torch.randn_like(out.values())).sum().backward()
        module.flush()
        assert_consistent(module)
    rows, _ = module.sketch.lookup(module.key_offset[0] + torch.arange(20, 25))
    assert torch.all(rows >= 0), "ids seen 4 times in every batch are hot"
    assert module.migrations["demoted"] > 0, "the first hot ids lost their rows at a decay"
    free = int(module.sketch.queue[1])
    assert free + int((module.sketch.rows >= 0).sum()) == module.hot_rows, "every row is owned or queued"
    deployed = module.to_inference()
    kjt = one_hot_kjt(torch.arange(40), torch.arange(40))
    with torch.no_grad():
        assert torch.allclose(deployed(kjt).values(), module.eval()(kjt).values())


def test_hot_ids_read_their_exclusive_row_and_cold_ids_their_hash_rows():
    tables = specs()
    module = solve_and_build(Cafe(**TOP_H), tables, DIM, Budget(0.2), EmbeddingOptimizer(kind="sgd"))
    keys = module.key_offset[0] + torch.arange(5)
    module.sketch.insert(keys, torch.full((5,), 10.0))
    module.migrate()
    module.eval()
    a = torch.arange(20)
    with torch.no_grad():
        out = module(one_hot_kjt(a, torch.zeros(20, dtype=torch.long))).to_dict()["a"]
    weight = module.fused.weight(TABLE)
    rows, _ = module.sketch.lookup(module.key_offset[0] + a)
    assert torch.all(rows[:5] >= 0) and torch.all(rows[5:] < 0)
    assert torch.allclose(out[:5], weight[rows[:5]])
    hashed = module.hashed_rows(module.key_offset[0] + a[5:])[:, 0]
    assert torch.allclose(out[5:], weight[hashed])


def test_budgets_down_to_1e_4_on_a_large_vocabulary():
    tables = [TableSpec("big", 1_000_000), TableSpec("mid", 200_000), TableSpec("small", 50)]
    method = Cafe()
    for ratio in (0.1, 0.01, 0.001, 0.0001):
        hparams = method.solve(tables, 16, Budget(ratio)).hparams
        achieved = method.memory(tables, 16, hparams).compression_ratio
        assert 0.9 * ratio <= achieved <= ratio
    with pytest.raises(InfeasibleBudget) as info:
        method.solve(tables, 16, Budget(1e-7))
    assert info.value.min_ratio > 1e-7


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="hash_levels"):
        Cafe(hash_levels=3)
    with pytest.raises(ValueError, match="hash_levels"):
        Cafe(hash_levels=2)  # needs hash_layout=shared
    with pytest.raises(ValueError, match="promotion='top_k'"):
        Cafe(promotion="top_k")
    with pytest.raises(ValueError, match="hash_rate"):
        Cafe(hash_rate=1.0)

