"""``build_optimizers``: each parameter in exactly one optimizer, per-group rules and weight decay."""
import pytest
import torch
from torch import nn

from recbench.methods.base import ParamGroup
from recbench.training.optim import DenseOptimizer, build_optimizers
from recbench.types import EmbeddingOptimizer


class _Embedding(nn.Module):
    def __init__(self, groups):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(5, 2))
        self.thresholds = nn.Parameter(torch.zeros(3))
        self.scales = nn.Parameter(torch.ones(3))
        self._groups = groups

    def fused_parameters(self):
        return []

    def param_groups(self):
        return self._groups(self)


def _build(groups):
    embedding = _Embedding(groups)
    model = nn.ModuleDict({"embedding": embedding, "mlp": nn.Linear(2, 1)})
    return embedding, model, build_optimizers(model, embedding, DenseOptimizer(1e-3, weight_decay=0.5),
                                              EmbeddingOptimizer(kind="adagrad", learning_rate=0.1))


def test_default_rules_keep_the_old_names():
    _, model, opts = _build(lambda e: [ParamGroup("embedding", [e.table], kind="sparse"),
                                       ParamGroup("thresholds", [e.thresholds], learning_rate=0.01)])
    assert set(opts) == {"dense", "sparse"}
    assert isinstance(opts["dense"], torch.optim.Adam) and isinstance(opts["sparse"], torch.optim.Adagrad)
    names = [g["name"] for g in opts["dense"].param_groups]
    assert names == ["dense", "thresholds"]  # the unlisted parameters first, then the groups
    assert [g["weight_decay"] for g in opts["dense"].param_groups] == [0.5, 0.5]
    seen = [id(p) for o in opts.values() for g in o.param_groups for p in g["params"]]
    assert len(seen) == len(set(seen)) == len(list(model.parameters()))


def test_named_rules_get_their_own_optimizer_and_decay():
    _, model, opts = _build(lambda e: [
        ParamGroup("embedding", [e.table], kind="sparse", optimizer="sparse_adam", learning_rate=1e-3),
        ParamGroup("thresholds", [e.thresholds], optimizer="sgd", learning_rate=1e-2),
        ParamGroup("scales", [e.scales], weight_decay=1e-5)])
    assert set(opts) == {"dense", "dense_sgd", "sparse_sparse_adam"}
    assert isinstance(opts["dense_sgd"], torch.optim.SGD)
    assert opts["dense_sgd"].param_groups[0]["lr"] == 1e-2
    assert isinstance(opts["sparse_sparse_adam"], torch.optim.SparseAdam)
    scales = next(g for g in opts["dense"].param_groups if g["name"] == "scales")
    assert scales["weight_decay"] == 1e-5
    # one SGD step moves the thresholds by exactly -lr * grad
    e = model["embedding"]
    e.thresholds.grad = torch.tensor([1.0, -2.0, 0.0])
    opts["dense_sgd"].step()
    torch.testing.assert_close(e.thresholds.detach(), torch.tensor([-1e-2, 2e-2, 0.0]))


@pytest.mark.parametrize("group, message", [
    (dict(kind="dense", optimizer="adagrad"), r"optimizer of a dense group must be one of \['adam', 'sgd'\], got 'adagrad'"),
    (dict(kind="sparse", optimizer="adam"), r"optimizer of a sparse group must be one of"),
    (dict(kind="sparse", weight_decay=1e-5), r"sparse optimizers take no weight_decay"),
    (dict(kind="rowwise"), r"kind must be 'dense' or 'sparse', got 'rowwise'"),
])
def test_bad_group_rules_are_named(group, message):
    with pytest.raises(ValueError, match=message):
        _build(lambda e: [ParamGroup("thresholds", [e.thresholds], **group)])
