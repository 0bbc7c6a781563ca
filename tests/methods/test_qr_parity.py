"""Parity of ``qr`` with its references, against independent implementations written here.

References:
- facebookresearch/dlrm tricks/qr_embedding_bag.py (commit 090956ee2319ddd349a42232958aefccfe3f7b0a):
  QREmbeddingBag(n, D, num_collisions=c): quotient table ceil(n/c) rows looked up with id // c,
  remainder table c rows looked up with id % c, each pooled by embedding_bag, then combined
  (mult / add / concat).
- Hsword/Hetu tools/EmbeddingMemoryCompression methods/scheduler/compo.py and
  methods/scheduler/base.py (commit a1cb1bcaf236c9f1d452733b105997d50c16c9df): one collision count
  for all fields, bisected in [1, sqrt(N)] on target - sum_f min(n_f, ceil(n_f/x) + ceil(x)), eps 0.5,
  then ceil(left).
- HugoZHL/CAFE ArtifactEvaluation/embeddings/init_embed.py (commit
  c757c39e9a497202939904ae5b358eff426ccfda): c = ceil((N cr - sqrt((N cr)^2 - 4 N)) / 2).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.qr import QR
from recbench.types import Budget, EmbeddingOptimizer, TableSpec
from solve_build import solve_and_build

DIM = 16
OPT = EmbeddingOptimizer(kind="sgd", learning_rate=0.1)
COLLISIONS = 7


# ----------------------------------------------------------------------------- independent ports
def dlrm_qr_bag(ids, offsets, weight_q, weight_r, collisions, operation, mode):
    """DLRM QREmbeddingBag.forward: pool each partition over the bag, then combine the pooled vectors."""
    embed_q = F.embedding_bag(torch.div(ids, collisions, rounding_mode="floor"), weight_q, offsets, mode=mode)
    embed_r = F.embedding_bag(torch.remainder(ids, collisions), weight_r, offsets, mode=mode)
    if operation == "concat":
        return torch.cat([embed_q, embed_r], dim=1)
    return embed_q + embed_r if operation == "add" else embed_q * embed_r


def hetu_rows(sizes, x):
    """Hetu's memory in rows for collision count x (a field stays plain where that is smaller)."""
    return sum(min(n, math.ceil(n / x) + math.ceil(x)) for n in sizes)


def hetu_collisions(sizes, ratio):
    """Hetu's binary_search(1, sqrt(N), target - rows, eps=0.5) then ceil(left); None where its
    precondition evaluate(1) < 0 < evaluate(sqrt N) fails (Hetu asserts)."""
    target = sum(sizes) * ratio
    evaluate = lambda x: target - hetu_rows(sizes, x)  # noqa: E731
    left, right = 1.0, math.sqrt(sum(sizes))
    if not evaluate(left) < 0 < evaluate(right):
        return None
    while right - left > 0.5:
        middle = (left + right) / 2
        score = evaluate(middle)
        assert score != 0, "Hetu's loop does not terminate on an exact hit"
        left, right = (middle, right) if score < 0 else (left, middle)
    return math.ceil(left)


def cafe_collisions(n, ratio):
    return math.ceil((n * ratio - math.sqrt((n * ratio) ** 2 - 4 * n)) / 2)


def solved_collisions(sizes, ratio):
    tables = [TableSpec(f"f{i}", n) for i, n in enumerate(sizes)]
    (c,) = set(QR().solve(tables, DIM, Budget(compression_ratio=ratio)).hparams["remainder_rows"].values())
    return c


# ----------------------------------------------------------------------------- lookup parity
def build(operation, tables):
    torch.manual_seed(0)
    method = QR(operation=operation, remainder_rows=COLLISIONS)
    return solve_and_build(method, tables, DIM, Budget(compression_ratio=1.0), OPT).eval()


def partition_weights(module, operation, name):
    collection = module.per_id if operation == "mult" else module.pooled
    return collection.weight(f"{name}/p0").detach(), collection.weight(f"{name}/p1").detach()


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
def test_single_hot_equals_dlrm_qr_embedding_bag(operation):
    n = 1000
    module = build(operation, [TableSpec("f", n)])
    weight_q, weight_r = partition_weights(module, operation, "f")
    part = DIM // 2 if operation == "concat" else DIM
    assert tuple(weight_q.shape) == (math.ceil(n / COLLISIONS), part)  # quotient table: ceil(n / c) rows
    assert tuple(weight_r.shape) == (COLLISIONS, part)  # remainder table: c rows
    ids = torch.tensor([0, 6, 7, 500, 998, 999, 123, 42])
    features = KeyedJaggedTensor(keys=["f"], values=ids, lengths=torch.ones(len(ids), dtype=torch.int32))
    with torch.no_grad():
        out = module(features).values()
    expected = dlrm_qr_bag(ids, torch.arange(len(ids)), weight_q, weight_r, COLLISIONS, operation, "sum")
    assert torch.allclose(out, expected, atol=1e-7)


@pytest.mark.parametrize("operation", ["mult", "add", "concat"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_multi_hot_composes_per_id(operation, pooling):
    """add and concat commute with pooling, so they equal DLRM's pooled-then-combined output; for
    mult recbench gives sum_i q[i // c] * r[i % c] (per id, then pooled), DLRM (sum q) * (sum r)."""
    module = build(operation, [TableSpec("bag", 700, pooling=pooling, multi_hot=True)])
    weight_q, weight_r = partition_weights(module, operation, "bag")
    ids = torch.tensor([3, 650, 77, 12, 12, 400, 699])
    lengths = torch.tensor([3, 1, 3], dtype=torch.int32)
    offsets = torch.tensor([0, 3, 4])
    features = KeyedJaggedTensor(keys=["bag"], values=ids, lengths=lengths)
    with torch.no_grad():
        out = module(features).values()
    dlrm = dlrm_qr_bag(ids, offsets, weight_q, weight_r, COLLISIONS, operation, pooling)
    if operation != "mult":
        assert torch.allclose(out, dlrm, atol=1e-7)
        return
    per_id = weight_q[ids // COLLISIONS] * weight_r[ids % COLLISIONS]
    expected = F.embedding_bag(torch.arange(len(ids)), per_id, offsets, mode=pooling)
    assert torch.allclose(out, expected, atol=1e-7)
    assert torch.allclose(out[1], dlrm[1], atol=1e-7)  # a bag of one id: the same
    assert not torch.allclose(out[[0, 2]], dlrm[[0, 2]], atol=1e-6)  # bags of 3 ids: not the same


# ----------------------------------------------------------------------------- budget parity
@pytest.mark.parametrize("n,ratio", [(100_000, 0.1), (100_000, 0.02), (101_313, 0.05), (1_000_000, 0.01),
                                     (2_000_003, 0.002), (10_000, 0.5)])
def test_collision_count_of_one_table(n, ratio):
    """One table: c is CAFE's closed form and the smallest c whose Hetu row count fits N * cr.
    Hetu's bisection returns that c or c - 1, and c - 1 exceeds the target (recbench never does)."""
    c = solved_collisions([n], ratio)
    assert c == cafe_collisions(n, ratio)
    assert hetu_rows([n], c) <= n * ratio < hetu_rows([n], c - 1)
    hetu = hetu_collisions([n], ratio)
    assert hetu in (c, c - 1)
    if hetu == c - 1:
        assert hetu_rows([n], hetu) > n * ratio
    if (n, ratio) == (100_000, 0.1):
        assert c == 11 and hetu == 10


MOVIELENS = [944, 1653, 62, 3, 22, 383, 72, 20]
CRITEO = [1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194, 27, 14992,
          5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572]


@pytest.mark.parametrize("sizes,ratio", [(MOVIELENS, 0.5), (MOVIELENS, 0.2), (MOVIELENS, 0.1), (CRITEO, 0.5),
                                         (CRITEO, 0.1), (CRITEO, 0.01)])
def test_collision_count_shared_by_fields(sizes, ratio):
    """Several fields, one c: the smallest c in [1, ceil(sqrt N)] with Hetu's per-field row count
    (min(n, ceil(n/c) + c)) within N * cr. Hetu's bisection agrees up to its c - 1 overshoot, or
    stops where its rows are not monotone in c (MovieLens at 0.1: rows at sqrt(N) exceed the target)."""
    c = solved_collisions(sizes, ratio)
    target = sum(sizes) * ratio
    top = math.ceil(math.sqrt(sum(sizes)))
    assert c == next(x for x in range(1, top + 1) if hetu_rows(sizes, x) <= target)
    hetu = hetu_collisions(sizes, ratio)
    if (sizes, ratio) == (MOVIELENS, 0.1):
        assert hetu is None and c == 16
        return
    assert hetu in (c, c - 1)
    if hetu == c - 1:
        assert hetu_rows(sizes, hetu) > target
