"""Non-finite dense features reach no model silently: DLRM and DCNv2 (and so their MoE variants,
which share ``DenseInput``) raise ``NonFiniteDense`` naming the row, the feature and the value, in
the forward and in the search stages' memo path; finite batches and protocols without dense
features are unaffected. Before this check the row's prediction was NaN, with no error."""
from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.full import Full
from recbench.models.common import NonFiniteDense
from recbench.models.dcn import DCNv2
from recbench.models.dlrm import DLRM
from recbench.types import Budget, EmbeddingOptimizer, TableSpec
from solve_build import solve_and_build

TABLES = [TableSpec("a", 10), TableSpec("b", 7)]


def batch(size=4):
    ids = torch.arange(size * 2) % 7
    return KeyedJaggedTensor(keys=["a", "b"], values=ids, lengths=torch.ones(size * 2, dtype=torch.int32))


def model(kind, num_dense=3):
    embedding = solve_and_build(Full(), TABLES, 8, Budget(), EmbeddingOptimizer(learning_rate=0.1))
    if kind == "dlrm":
        return DLRM(embedding, num_dense, len(TABLES), 8, [16, 8], [16, 1])
    return DCNv2(embedding, num_dense, len(TABLES), 8, [16, 8], [16, 1], cross_layers=1, cross_rank=4)


@pytest.mark.parametrize("kind", ["dlrm", "dcn"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_dense_features_are_refused(kind, value):
    net = model(kind).eval()
    dense = torch.rand(4, 3)
    with torch.no_grad():
        assert torch.isfinite(net(dense, batch())).all()
        dense[2, 1] = value
        with pytest.raises(NonFiniteDense, match=rf"dense feature 1 of row 2 is {value} \(1 non-finite"):
            net(dense, batch())
        with pytest.raises(NonFiniteDense):
            net.memo(dense, batch())  # the search stages' path


def test_a_protocol_without_dense_features_is_not_checked():
    net = model("dlrm", num_dense=0).eval()
    with torch.no_grad():
        assert torch.isfinite(net(torch.empty(4, 0), batch())).all()
