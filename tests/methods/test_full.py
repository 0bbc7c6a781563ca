import torch

from recbench.methods.full import Full
from recbench.types import Budget, EmbeddingOptimizer, full_embedding_bytes
from solve_build import solve_and_build


def test_full_memory_equals_rows_times_dim_times_4(toy_dataset):
    tables = toy_dataset.spec.tables
    for kind, state_per_row in (("rowwise_adagrad", 4), ("adagrad", 16 * 4), ("sgd", 0)):
        opt = EmbeddingOptimizer(kind=kind)
        module = solve_and_build(Full(), tables, 16, Budget(), opt)
        measured = module.memory_report()
        closed = Full().memory(tables, 16, {}, opt)
        rows = sum(t.num_embeddings for t in tables)
        assert measured.inference_bytes == closed.inference_bytes == rows * 16 * 4 == full_embedding_bytes(tables, 16)
        assert measured.training_bytes == closed.training_bytes == rows * 16 * 4 + rows * state_per_row
        assert measured.compression_ratio == 1.0


def test_full_is_infeasible_below_ratio_one(toy_dataset):
    import pytest

    from recbench.methods.base import InfeasibleBudget

    with pytest.raises(InfeasibleBudget, match=r"reachable range is \[1, 1\]"):
        Full().solve(toy_dataset.spec.tables, 16, Budget(compression_ratio=0.5))


def test_full_fused_update_touches_only_looked_up_rows(toy_dataset):
    from recbench.datasets.batching import make_batch
    import numpy as np

    module = solve_and_build(Full(), toy_dataset.spec.tables, 8, Budget(), EmbeddingOptimizer(kind="sgd", learning_rate=0.5))
    batch = make_batch(toy_dataset.spec, toy_dataset.split("train"), np.arange(4))
    before = module.fused.weight("f0").detach().clone()
    module(batch.sparse_features).values().sum().backward()
    after = module.fused.weight("f0").detach()
    changed = set((before != after).any(1).nonzero().flatten().tolist())
    assert changed == set(batch.sparse_features["f0"].values().tolist())
    assert module.fused.weight("f0").grad is None  # no dense gradient of the table was built


def test_full_inference_form_matches(toy_dataset):
    from recbench.datasets.batching import make_batch
    import numpy as np

    module = solve_and_build(Full(), toy_dataset.spec.tables, 8, Budget(), EmbeddingOptimizer())
    batch = make_batch(toy_dataset.spec, toy_dataset.split("val"), np.arange(64))
    with torch.no_grad():
        assert torch.allclose(module(batch.sparse_features).values(), module.to_inference()(batch.sparse_features).values())
