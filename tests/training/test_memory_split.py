"""The training memory split (weights, optimizer state, buffers, runtime) against TorchRec's planner."""
import math

import numpy as np
import torch
from torchrec.distributed.planner.shard_estimators import _get_optimizer_multipler
from torchrec.optim import RowWiseAdagrad

from recbench.datasets.batching import make_batch
from recbench.methods.full import Full
from recbench.methods.hashing import Hashing
from recbench.training.memory_split import PARTS, as_metrics, training_memory_split
from recbench.types import Budget, EmbeddingOptimizer
from solve_build import solve_and_build


def test_full_split_equals_torchrec_planner_weights_and_optimizer(toy_dataset):
    """TorchRec's planner: weights = rows x D x 4; row-wise Adagrad state = weights x 1/D; plain
    Adagrad x 1; SGD x 0 (``_get_optimizer_multipler``). The split also sums to the closed form."""
    tables, dim = toy_dataset.spec.tables, 16
    batch = make_batch(toy_dataset.spec, toy_dataset.split("train"), np.arange(32)).sparse_features
    for kind, planner_class in (("rowwise_adagrad", RowWiseAdagrad), ("adagrad", torch.optim.Adagrad),
                                ("sgd", torch.optim.SGD)):
        module = solve_and_build(Full(), tables, dim, Budget(), EmbeddingOptimizer(kind=kind))
        split = training_memory_split(module, [], batch, dim)
        weights = sum(t.num_embeddings for t in tables) * dim * 4
        assert split["weights"] == weights
        expected = sum(math.ceil(t.num_embeddings * dim * 4 * _get_optimizer_multipler(planner_class, (t.num_embeddings, dim)))
                       for t in tables)
        assert split["optimizer_state"] == expected, kind
        assert split["buffers"] == 0
        assert split["weights"] + split["optimizer_state"] == module.memory_report().training_bytes
        # IO of one step: the ids and lengths as held, int64 offsets, and the (B, F*D) fp32 output and its gradient
        ids = batch.values().numel() * batch.values().element_size()
        lengths = batch.lengths().numel() * batch.lengths().element_size()
        assert split["runtime"] == ids + lengths + (batch.lengths().numel() + 1) * 8 + 2 * 32 * len(tables) * dim * 4


def test_split_counts_only_the_embeddings_optimizer_state_and_each_tensor_once(toy_dataset):
    tables, dim = toy_dataset.spec.tables, 8
    batch = make_batch(toy_dataset.spec, toy_dataset.split("train"), np.arange(16)).sparse_features
    module = solve_and_build(Hashing(), tables, dim, Budget(compression_ratio=0.5), EmbeddingOptimizer())
    other = torch.nn.Linear(4, 4)  # a dense layer's Adam state is not embedding memory
    dense = torch.optim.Adam(other.parameters())
    other(torch.ones(2, 4)).sum().backward()
    dense.step()
    alone = training_memory_split(module, [], batch, dim)
    with_dense = training_memory_split(module, [dense], batch, dim)
    assert alone == with_dense
    # the hash functions' coefficients are buffers; FBGEMM's fused optimizer state is optimizer state
    fused_state = sum(v.numel() * v.element_size() for s in module.fused_optimizer().state.values()
                      for v in s.values() if isinstance(v, torch.Tensor))
    assert alone["optimizer_state"] == fused_state > 0
    assert alone["buffers"] == sum(b.numel() * b.element_size() for b in module.buffers()) > 0


def test_a_tensor_held_twice_counts_once(toy_dataset):
    batch = make_batch(toy_dataset.spec, toy_dataset.split("train"), np.arange(4)).sparse_features
    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.zeros(10, 4))
    module.register_buffer("alias", module.weight.data)  # the same storage, as a buffer
    module.register_buffer("mask", torch.ones(10, dtype=torch.bool))
    split = training_memory_split(module, [], batch, 4)
    assert (split["weights"], split["buffers"]) == (160, 10)
    assert list(as_metrics(split)) == [f"emb/bytes_training_{p}" for p in PARTS]
