"""QR / compositional embeddings against the paper's equations (Shi et al., KDD 2020)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.base import InfeasibleBudget
from recbench.methods.qr import QR, digits, radices, smallest_remainder_rows
from recbench.types import Budget, EmbeddingOptimizer, TableSpec, full_embedding_bytes
from test_contract import random_kjt  # the contract's KJT generator (tests/methods is on sys.path)
from solve_build import solve_and_build

DIM = 16
OPT = EmbeddingOptimizer(kind="sgd", learning_rate=0.1)


def specs():
    return [TableSpec("big", 3000), TableSpec("mid", 700), TableSpec("tiny", 5),
            TableSpec("bag", 500, pooling="mean", multi_hot=True), TableSpec("bagsum", 400, multi_hot=True)]


@pytest.mark.parametrize("n,k,m", [(3000, 2, 55), (3000, 2, 2999), (700, 3, 9), (500, 3, 8), (1000, 4, 6), (7, 2, 3)])
def test_every_id_gets_a_unique_digit_tuple(n, k, m):
    ids = torch.arange(n)
    parts = digits(ids, k, m)
    rows = radices(n, k, m)
    for digit, r in zip(parts, rows):
        assert int(digit.min()) >= 0 and int(digit.max()) < r
    combined = torch.stack(parts, dim=1)
    assert len(torch.unique(combined, dim=0)) == n
    if k == 2:
        assert torch.equal(parts[0], ids // m) and torch.equal(parts[1], ids % m)


def kjt(tables, rng, batch=24, max_bag=5):
    return random_kjt(tables, batch, rng, max_bag)


def reference(module, table, ids, operation, k):
    """Per-id composed vectors from the stored partition tables (N, D)."""
    m = module.hparams["remainder_rows"][table.name]
    collection = module.per_id if operation == "mult" else module.pooled
    parts = [collection.weight(f"{table.name}/p{j}")[d] for j, d in enumerate(digits(ids, k, m))]
    if operation == "mult":
        return torch.stack(parts).prod(0)
    if operation == "add":
        return torch.stack(parts).sum(0)
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("operation,k", [("mult", 2), ("add", 2), ("concat", 2), ("mult", 3), ("add", 4)])
def test_bags_pool_per_id_compositions(operation, k):
    tables = specs()
    torch.manual_seed(0)
    module = solve_and_build(QR(operation=operation, partitions=k), tables, DIM, Budget(compression_ratio=0.3), OPT).eval()
    features = kjt(tables, np.random.default_rng(0))
    with torch.no_grad():
        out = module(features).to_dict()
        inference = module.to_inference()(features).to_dict()
        for t in tables:
            jag = features[t.name]
            ids, lengths = jag.values(), jag.lengths().long()
            if t.name not in module.hparams["remainder_rows"]:
                assert t.name == "tiny"
                continue
            per_id = reference(module, t, ids, operation, k)
            bag = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
            expected = torch.zeros(len(lengths), DIM).index_add_(0, bag, per_id)
            if t.pooling == "mean":
                expected = expected / lengths.clamp(min=1).unsqueeze(1)
            assert torch.allclose(out[t.name], expected, atol=1e-6), (operation, t.name)
            assert torch.equal(out[t.name], inference[t.name])


def test_mult_differs_from_pooling_first():
    """The DLRM reference pools each partition first: (sum q) * (sum r) != sum (q * r) for bags."""
    tables = [TableSpec("bag", 2000, pooling="sum", multi_hot=True)]
    torch.manual_seed(0)
    module = solve_and_build(QR(), tables, DIM, Budget(compression_ratio=0.2), OPT).eval()
    m = module.hparams["remainder_rows"]["bag"]
    ids = torch.tensor([3, 1500, 77])
    features = KeyedJaggedTensor(keys=["bag"], values=ids, lengths=torch.tensor([3], dtype=torch.int32))
    with torch.no_grad():
        out = module(features).values()[0]
        q, r = module.per_id.weight("bag/p0"), module.per_id.weight("bag/p1")
        assert torch.allclose(out, (q[ids // m] * r[ids % m]).sum(0), atol=1e-7)
        assert not torch.allclose(out, q[ids // m].sum(0) * r[ids % m].sum(0), atol=1e-7)


def test_shared_collision_count_is_the_smallest_that_fits():
    """Default: one collision count c for every field, the smallest whose bytes fit the target."""
    tables = specs()
    full = full_embedding_bytes(tables, DIM)
    for ratio in (0.5, 0.2, 0.1):
        hp = QR().solve(tables, DIM, Budget(compression_ratio=ratio)).hparams
        (c,) = set(hp["remainder_rows"].values())
        assert set(hp["remainder_rows"]) == {"big", "mid", "bag", "bagsum"}  # 5 rows never compose smaller
        assert QR().memory(tables, DIM, hp).inference_bytes <= ratio * full
        smaller = QR(remainder_rows=c - 1) if c > 1 else None
        if smaller is not None:
            with pytest.raises(InfeasibleBudget):
                smaller.solve(tables, DIM, Budget(compression_ratio=ratio))
    with pytest.raises(InfeasibleBudget) as info:
        QR().solve(tables, DIM, Budget(compression_ratio=0.01))
    top = int(np.ceil(np.sqrt(sum(t.num_embeddings for t in tables))))
    smallest = min(sum(min(t.num_embeddings, sum(radices(t.num_embeddings, 2, c))) for t in tables)
                   for c in range(1, top + 1))
    assert info.value.min_ratio == pytest.approx(smallest / sum(t.num_embeddings for t in tables))


def test_fixed_collision_count_and_over_budget():
    tables = specs()
    hp = QR(remainder_rows=4).solve(tables, DIM, Budget(compression_ratio=0.5)).hparams
    assert hp["remainder_rows"] == {"big": 4, "mid": 4, "bag": 4, "bagsum": 4}  # "tiny" (5 rows): 2 + 4 > 5
    with pytest.raises(InfeasibleBudget, match="remainder_rows=4"):
        QR(remainder_rows=4).solve(tables, DIM, Budget(compression_ratio=0.2))


def test_per_field_largest_lands_and_reports_reachable_range():
    tables = specs()
    full = full_embedding_bytes(tables, DIM)
    option = QR(partition="per_field_largest")
    for ratio in (0.5, 0.2, 0.1):
        hp = option.solve(tables, DIM, Budget(compression_ratio=ratio)).hparams
        achieved = option.memory(tables, DIM, hp).inference_bytes / full
        assert 0.9 * ratio <= achieved <= ratio
        assert "tiny" not in hp["remainder_rows"]  # QR of 5 rows is not smaller than the table
        assert hp["remainder_rows"]["big"] > np.sqrt(3000)  # the large digit is the remainder
    with pytest.raises(InfeasibleBudget) as info:
        option.solve(tables, DIM, Budget(compression_ratio=0.01))
    # smallest reachable: the row-minimising m per field, the tiny field in full
    minimum = sum(sum(radices(t.num_embeddings, 2, smallest_remainder_rows(t.num_embeddings, 2)))
                  for t in tables if t.name != "tiny") + 5
    assert info.value.min_ratio == pytest.approx(minimum / sum(t.num_embeddings for t in tables))
    concat = QR(operation="concat", partition="per_field_largest")
    hp = concat.solve(tables, DIM, Budget(compression_ratio=0.05)).hparams
    assert concat.memory(tables, DIM, hp).compression_ratio <= 0.05


@pytest.mark.parametrize("init", ["uniform_largest_field", "variance_preserving"])
def test_initialisation(init):
    """uniform_largest_field: every table U(+-1/sqrt(max n)); variance_preserving: composed
    vectors have the plain init's variance 1/(3n)."""
    tables = [TableSpec("big", 3000), TableSpec("tiny", 5)]
    torch.manual_seed(0)
    module = solve_and_build(QR(init=init), tables, DIM, Budget(compression_ratio=0.3), OPT)
    q, r = module.per_id.weight("big/p0").detach(), module.per_id.weight("big/p1").detach()
    tiny = module.pooled.weight("tiny").detach()
    if init == "uniform_largest_field":
        bound = 1 / np.sqrt(3000)
        for w in (q, r, tiny):
            assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
        assert float(q.std()) == pytest.approx(bound / np.sqrt(3), rel=0.1)
    else:
        # mult, 2 partitions: each factor U(+-b), b = sqrt(3) (3n)^(-1/4), so that the product of two
        # independent zero-mean factors, the composed coordinate, has variance b^4 / 9 = 1 / (3n)
        bound = np.sqrt(3.0) * (3.0 * 3000) ** -0.25
        for w in (q, r):
            assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.9 * bound
        assert float(q.var()) * float(r.var()) == pytest.approx(1 / (3 * 3000), rel=0.15)
        assert float(tiny.abs().max()) > 1 / np.sqrt(3000)  # plain tables keep U(+-1/sqrt(n))


def test_bad_values_name_the_key():
    with pytest.raises(ValueError, match="qr: partition must be one of shared_collisions, per_field_largest"):
        QR(partition="largest")
    with pytest.raises(ValueError, match="qr: init must be one of"):
        QR(init="dlrm")


def test_min_rows_to_compress_keeps_fields_plain():
    tables = specs()
    hp = QR().solve(tables, DIM, Budget(compression_ratio=0.5, min_rows_to_compress=600)).hparams
    assert set(hp["remainder_rows"]) == {"big", "mid"}


def test_concat_needs_dim_multiple_of_4k():
    with pytest.raises(ValueError, match="multiple of"):
        QR(operation="concat", partitions=3).solve(specs(), DIM, Budget(compression_ratio=0.5))


def test_fused_updates_and_optimizer_state_roundtrip():
    tables = specs()
    torch.manual_seed(0)
    module = solve_and_build(QR(), tables, DIM, Budget(compression_ratio=0.3), EmbeddingOptimizer())
    module(kjt(tables, np.random.default_rng(1))).values().sum().backward()
    state = module.fused_optimizer().state_dict()
    module.fused_optimizer().load_state_dict(state)
    assert module.per_id.weight("big/p0").grad is None  # fused: no dense table gradient
