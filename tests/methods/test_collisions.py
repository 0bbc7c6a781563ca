"""Collision rates (``emb/collision_rate``, ``emb/collision_rate_lookups``) against plain numpy counts."""
from collections import Counter

import numpy as np
import pytest

from recbench.methods.blocks.collisions import collision_rates
from recbench.methods.cafe import Cafe as CAFE
from recbench.methods.freq_prune import FreqPrune
from recbench.methods.full import Full
from recbench.methods.hashing import Hashing
from recbench.methods.unified import Unified
from recbench.types import Budget, EmbeddingOptimizer, TableSpec
from solve_build import solve_and_build

RNG = np.random.default_rng(3)
TABLES = [TableSpec("a", 900, counts=RNG.zipf(1.4, 900).astype(np.int64) * (RNG.random(900) < 0.8)),
          TableSpec("b", 300, counts=RNG.zipf(1.4, 300).astype(np.int64)),
          TableSpec("c", 20, counts=np.ones(20, dtype=np.int64))]


def _rates(groups):
    """groups: one hashable signature per (field, id), with its training count."""
    keys = [g for g, _ in groups]
    seen = Counter(keys)
    vocab = sum(seen[k] > 1 for k in keys) / len(keys)
    trained = Counter(k for k, c in groups if c > 0)
    lookups = sum(c for k, c in groups if c > 0 and trained[k] > 1) / sum(c for _, c in groups if c > 0)
    return vocab, lookups


def _build(method, ratio, dim=8):
    return solve_and_build(method, TABLES, dim, Budget(compression_ratio=ratio, min_rows_to_compress=100),
                           EmbeddingOptimizer())


def test_per_field_modulo_hashing_collides_within_a_field_only():
    module = _build(Hashing(hash_function="modulo"), 0.3)
    rows = {t.name: int(module.buckets[i]) for i, t in enumerate(TABLES)}
    groups = [((t.name, i % rows[t.name]), int(c)) for t in TABLES for i, c in enumerate(t.counts)]
    vocab, lookups = _rates(groups)
    got = collision_rates(module)
    assert got["emb/collision_rate"] == pytest.approx(vocab) and 0 < vocab < 1
    assert got["emb/collision_rate_lookups"] == pytest.approx(lookups)


def test_global_modulo_hashing_collides_across_fields():
    module = _build(Hashing(layout="global", hash_function="modulo"), 0.3)
    m = module.rows
    offsets = np.cumsum([0] + [t.num_embeddings for t in TABLES[:-1]])
    groups = [(("shared", (i + off) % m) if t.num_embeddings >= 100 else (t.name, i), int(c))
              for t, off in zip(TABLES, offsets) for i, c in enumerate(t.counts)]
    vocab, lookups = _rates(groups)
    got = collision_rates(module)
    assert got["emb/collision_rate"] == pytest.approx(vocab)
    assert got["emb/collision_rate_lookups"] == pytest.approx(lookups)


def test_unified_ids_collide_only_when_every_probe_does():
    module = _build(Unified(probes=2), 0.05)
    groups = []
    for t in TABLES:
        ids = np.arange(t.num_embeddings)
        if t.name in module.kept:
            groups += [((t.name, i), int(c)) for i, c in zip(ids, t.counts)]
        else:
            import torch
            rows = module.probe_rows(t.name, torch.from_numpy(ids)).numpy()
            groups += [(("shared", *r), int(c)) for r, c in zip(map(tuple, rows), t.counts)]
    vocab, lookups = _rates(groups)
    got = collision_rates(module)
    assert got["emb/collision_rate"] == pytest.approx(vocab)
    assert got["emb/collision_rate_lookups"] == pytest.approx(lookups)


def test_freq_prune_sends_pruned_ids_to_one_row_and_full_has_none():
    module = _build(FreqPrune(), 0.3)
    got = collision_rates(module)
    assert 0 < got["emb/collision_rate"] < 1
    assert collision_rates(_build(Full(), 1.0)) == {"emb/collision_rate": 0.0, "emb/collision_rate_lookups": 0.0}


def test_methods_without_a_one_value_per_id_rewrite_report_nothing():
    from recbench.methods.adaembed import AdaEmbed

    assert collision_rates(_build(CAFE(), 0.3)) == {}
    assert collision_rates(_build(AdaEmbed(), 0.3)) == {}  # no rewrite of its own
