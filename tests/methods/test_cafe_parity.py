"""Parity of ``cafe`` with the CAFE artifact (HugoZHL/CAFE, commit
c757c39e9a497202939904ae5b358eff426ccfda, ArtifactEvaluation/).

* ``embeddings/sketch.cpp`` (class ``SS``: ``Insert``, ``decay``, ``batch_insert_val``, ``query``,
  the ``hot_id`` queue): ported below in plain Python (fp32 counts emulated with ``struct``); a
  fixed (key, score) stream gives the same slots, hot set and key -> row map in recbench's
  ``ThresholdSketch`` after every batch.
* ``embeddings/init_embed.py``: hot rows int(N * cr * (1 - hash_rate) * 4D / (4D + 48)), per-field
  hash tables of ceil(cr * hash_rate * n_f) rows; ``sk_embedding_bag.py``: a cold id reads row
  ``(id + offset) % rows_f``, importance ``g * N / sum(g)`` per field, inserted field by field.
* ``tasks/criteo.json``: the threshold / hash_rate ladder.
"""
from __future__ import annotations

import math
import random
import struct
from collections import deque

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.cafe import LADDER, TABLE, Cafe, CafeEmbedding, ladder, layout
from recbench.methods.blocks.hot_sketch import ThresholdSketch
from recbench.types import Budget, EmbeddingOptimizer, TableSpec


def f32(x: float) -> float:
    """x rounded to fp32 (a float op on fp32 operands done in double and rounded once is the fp32 op)."""
    return struct.unpack("f", struct.pack("f", x))[0]


class PortSS:
    """sketch.cpp's ``SS(k, lim, dr)``: lim buckets of 4 (val, cnt, dic), hot rows 1..lim-1 queued."""

    def __init__(self, k: int, lim: int, dr: float):
        self.k, self.s, self.dr, self.tot = k, lim, dr, 0.0
        self.val = [[0] * 4 for _ in range(lim)]
        self.cnt = [[0.0] * 4 for _ in range(lim)]
        self.dic = [[0] * 4 for _ in range(lim)]
        self.hot_id = deque(range(1, lim))

    def query(self, val: int) -> int:
        b = val % self.s
        for i in range(4):
            if self.cnt[b][i] != 0 and self.val[b][i] == val and self.dic[b][i]:
                return -self.dic[b][i]
        return val

    def decay(self) -> None:
        for b in range(self.s):
            for i in range(4):
                if self.dic[b][i] and self.cnt[b][i] * self.dr < self.k:
                    self.hot_id.append(self.dic[b][i])
                    self.dic[b][i] = 0
                self.cnt[b][i] = f32(self.cnt[b][i] * self.dr)
        self.tot = 0.0

    def insert(self, val: int, v: float) -> int:
        self.tot += v
        b, promoted = val % self.s, 0
        cnt, vals, dic = self.cnt[b], self.val[b], self.dic[b]
        for i in range(4):
            if cnt[i] and vals[i] == val:
                cnt[i] = f32(cnt[i] + v)
                if cnt[i] >= self.k and self.hot_id and not dic[i]:
                    dic[i], promoted = self.hot_id.popleft(), 1
                while i and cnt[i] > cnt[i - 1]:
                    for a in (cnt, vals, dic):
                        a[i], a[i - 1] = a[i - 1], a[i]
                    i -= 1
                return promoted
        for i in range(4):
            if cnt[i] == 0:
                cnt[i], vals[i] = v, val
                return 0
        if not dic[3]:
            cnt[3], vals[3] = f32(cnt[3] + v), val
        return 0

    def batch_insert_val(self, data, values):
        if self.tot > self.s * self.k * 10:
            self.decay()
        return [self.insert(d, v) for d, v in zip(data, values)]


def stream(seed: int, batches: int, size: int, vocabulary: int):
    """Batches of (keys, fp32 scores): Zipf-like keys (repeats within a batch) whose popular keys
    drift every 30 batches (old hot ids decay below the threshold), scores in (0, 3)."""
    rng = random.Random(seed)
    weights = [1.0 / (r + 1) ** 1.1 for r in range(vocabulary)]
    for t in range(batches):
        keys = [(key + 37 * (t // 30)) % vocabulary for key in rng.choices(range(vocabulary), weights, k=size)]
        yield keys, [f32(rng.uniform(0.01, 3.0)) for _ in keys]


def test_threshold_sketch_equals_a_port_of_sketch_cpp():
    buckets, k, dr = 16, 6, 0.5  # a faster decay than the default 0.99, so demotions happen in 150 batches
    port = PortSS(k, buckets, dr)
    ours = ThresholdSketch(buckets, buckets - 1, k, decay=dr, decay_volume=10)  # rows 0..14 = port's 1..15
    decays = exhausted = demoted = 0
    for keys, scores in stream(0, 150, 60, 400):
        decays += port.tot > port.s * port.k * 10
        mask = port.batch_insert_val(keys, scores)
        promoted_keys, promoted_rows, lost_keys, _ = ours.insert(torch.tensor(keys), torch.tensor(scores))
        demoted += lost_keys.numel()
        exhausted += not port.hot_id
        assert promoted_keys.tolist() == [key for key, m in zip(keys, mask) if m]
        assert [-port.query(key) - 1 for key in promoted_keys.tolist()] == promoted_rows.tolist()
        assert ours.keys.tolist() == port.val
        assert ours.scores.tolist() == port.cnt, "fp32 counts differ"
        assert (ours.rows + 1).tolist() == port.dic
        hot = {key: row for key, row in ours.hot_map().items()}
        expected = {port.val[b][i]: port.dic[b][i] - 1 for b in range(buckets) for i in range(4) if port.dic[b][i]}
        assert hot == expected
        queried = ours.lookup(torch.arange(400))[0]
        assert queried.tolist() == [-port.query(key) - 1 if port.query(key) < 0 else -1 for key in range(400)]
        assert abs(float(ours.total) - port.tot) <= 1e-9 * max(1.0, port.tot)
    # the stream exercises every rule: decays, demotions at a decay, an exhausted free-row queue
    assert decays >= 3 and demoted > 0 and exhausted > 0


def test_layout_follows_init_embed():
    sizes, dim = [100_000, 30_000, 977, 12], 16
    for ratio, _, rate in LADDER[:8]:
        settings = {"hash_rate": rate, "sketch_slots_per_hot": 4.0, "hash_layout": "per_field", "hash_levels": 1}
        got = layout(sizes, ratio, dim, settings)
        hotn = int(sum(sizes) * ratio * (1 - rate) * (dim * 4 / (dim * 4 + 48)))
        assert got["hot_rows"] == max(1, hotn) and got["buckets"] == got["hot_rows"]  # SS(k, lim=hotn): hotn buckets
        assert got["hash_rows"] == [max(1, int(math.ceil(ratio * rate * n))) for n in sizes]


def test_ladder_is_tasks_criteo_json():
    assert [r for r, _, _ in LADDER] == [0.5, 0.2, 0.1, 0.05, 0.02, 0.01, 0.005, 0.002, 0.001, 0.0005, 0.0002, 0.0001]
    assert [t for _, t, _ in LADDER] == [10, 10, 20, 30, 50, 100, 200, 500, 500, 500, 500, 500]
    assert [h for _, _, h in LADDER] == [0.7, 0.5, 0.5, 0.5, 0.3, 0.3, 0.2, 0.2, 0.2, 0.1, 0.1, 0.1]
    assert ladder(0.01) == (100.0, 0.3)
    # nearest on a log scale (the geometric midpoint of 0.2 and 0.5 is 0.316)
    assert ladder(0.3) == (10.0, 0.5) and ladder(0.35) == (10.0, 0.7)
    assert ladder(0.9) == (10.0, 0.7) and ladder(1e-6) == (500.0, 0.1)


def test_cold_rows_importance_and_promotion_copy_follow_sk_embedding_bag():
    tables = [TableSpec("a", 500), TableSpec("b", 300), TableSpec("c", 40)]
    dim = 4
    torch.manual_seed(0)
    method = Cafe(threshold=2)
    hparams = method.solve(tables, dim, Budget(0.2)).hparams
    module = CafeEmbedding(tables, dim, hparams, EmbeddingOptimizer(kind="sgd", learning_rate=0.1))
    module.train()
    # per-field tables of ceil(c * hash_rate * n_f) rows; a cold id reads row (id + offset) % rows_f
    # of its field's block, offset = the sizes of all earlier fields
    c, rate = hparams["layout_ratio"], hparams["hash_rate"]
    assert module.field_rows.tolist() == [math.ceil(c * rate * t.num_embeddings) for t in tables]
    rows_b = int(module.field_rows[1])
    ids = torch.arange(300)
    got = module.hashed_rows(module.key_offset[1] + ids)[:, 0]
    start = module.hot_rows + int(module.field_rows[0])
    assert torch.equal(got, start + (ids + 500) % rows_b)
    # importance: per lookup g = |d loss / d bag|, scaled per field to g * N_f / sum g, field by field
    calls = []
    insert = module.sketch.insert
    module.sketch.insert = lambda keys, values: calls.append((keys.clone(), values.clone())) or insert(keys, values)
    rng = np.random.default_rng(0)
    a, b, c = (torch.from_numpy(rng.integers(0, n, 16)) for n in (500, 300, 4))  # c: repeated ids
    kjt = KeyedJaggedTensor(keys=["a", "b", "c"], values=torch.cat([a, b, c]), lengths=torch.ones(48, dtype=torch.int32))
    out = module(kjt)
    weights = torch.randn_like(out.values())
    (out.values() * weights).sum().backward()
    module.flush()
    assert len(calls) == 3
    for f, (ids_f, (keys, values)) in enumerate(zip((a, b, c), calls)):
        g = weights.view(16, 3, dim)[:, f].norm(dim=1)
        assert torch.equal(keys, module.key_offset[f] + ids_f)
        assert torch.allclose(values, g * 16 / g.sum(), rtol=1e-6)
    # a newly hot id's exclusive row is a copy of the hash row it reads (after the step that promoted it)
    promoted = module.sketch.rows >= 0
    assert promoted.any()
    weight = module.fused.weight(TABLE)
    for key, row in module.sketch.hot_map().items():
        assert torch.equal(weight[row], weight[module.hashed_rows(torch.tensor([key]))[0, 0]])
