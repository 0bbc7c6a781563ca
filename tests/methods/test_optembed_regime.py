"""OptEmbed's training regime against its references: thresholds by SGD, the table by Adam with L2
weight decay on every row, Xavier init; and its effect, learned pruning of rarely seen rows.

References: fuyuanlyu/OptEmbed @ 0feda5f8d43e570d87ecbcb2847a3c2bfdef7975, utils/train_help.py
(``get_optimizer``: SGD over the threshold at ``threshold_lr``; one Adam over network and embedding
at ``lr`` with ``weight_decay=wd``), supernet.py (flag defaults lr 1e-4, wd 5e-5, t_lr 3e-4,
alpha 3e-4), models/modules.py (``init_embedding``: xavier_uniform_ over the (feature_num,
latent_dim) table; ``init_threshold``: 0); Hsword/Hetu @ a1cb1bcaf236c9f1d452733b105997d50c16c9df,
tools/EmbeddingMemoryCompression/methods/scheduler/base.py (default initializer
U(+-sqrt(1 / max n_f))).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import mannwhitneyu
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.optembed import OptEmbed, OptEmbedRetrain
from recbench.training.optim import DenseOptimizer, build_optimizers
from recbench.types import Budget, EmbeddingOptimizer, TableSpec
from solve_build import solve_and_build

DIM = 8
DENSE_LR = 3e-3  # the MovieLens protocol's dense learning rate


class Head(nn.Module):
    """(B, F * D) -> (B,) logits; ``embedding`` is the module under test."""

    def __init__(self, embedding, fields):
        super().__init__()
        self.embedding, self.mlp = embedding, nn.Sequential(nn.Linear(fields * DIM, 16), nn.ReLU(), nn.Linear(16, 1))

    def forward(self, kjt):
        return self.mlp(self.embedding(kjt).values()).squeeze(1)


def planted(seed, steps, batch=128, rows=200):
    """Field "a": the first half of its rows (in a random id order) carries 99.8% of the traffic,
    each row of the other half is seen about once per 50,000 samples; field "b": 20 uniform rows.
    Labels are logistic in per-row weights of both fields. Returns tables, batches, counts, rare mask."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(rows)
    p = np.where(np.arange(rows) < rows // 2, 1.0, 0.002)
    p /= p.sum()
    n = steps * batch
    a, b = perm[rng.choice(rows, n, p=p)], rng.integers(0, 20, n)
    wa, wb = rng.normal(0, 1, rows), rng.normal(0, 1, 20)
    y = (rng.random(n) < 1 / (1 + np.exp(-(wa[a] + wb[b])))).astype(np.float32)
    counts = np.bincount(a, minlength=rows)
    tables = [TableSpec("a", rows, counts), TableSpec("b", 20, np.bincount(b, minlength=20))]
    batches = [(KeyedJaggedTensor(keys=["a", "b"], values=torch.from_numpy(np.concatenate([a[s], b[s]])),
                                  lengths=torch.ones(2 * batch, dtype=torch.int32)), torch.from_numpy(y[s]))
               for s in (slice(i * batch, (i + 1) * batch) for i in range(steps))]
    return tables, batches, counts, np.isin(np.arange(rows), perm[rows // 2:])


def train_planted(seed, steps, **hparams):
    """The supernet stage's update (Trainer._step) on ``planted`` data; returns (module, counts, rare)."""
    tables, batches, counts, rare = planted(seed, steps)
    torch.set_num_threads(1)  # tiny tensors: one thread (conftest restores the count)
    torch.manual_seed(seed)
    module = solve_and_build(OptEmbed(**hparams), tables, DIM, Budget(0.5))
    model = Head(module, 2)
    optimizers = build_optimizers(model, module, DenseOptimizer(DENSE_LR), EmbeddingOptimizer())
    model.train()
    for kjt, label in batches:
        loss = nn.functional.binary_cross_entropy_with_logits(model(kjt), label) + module.extra_loss()
        for opt in optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()
        for opt in optimizers.values():
            opt.step()
    return module, counts, rare


def l1_norms(module, rows=200):
    return module.weight.detach()[:rows].abs().sum(1).numpy()


def test_rarely_seen_rows_decay_to_zero_under_the_reference_regime():
    """Fast companion of the slow pruning test: in 300 steps Adam's L2 term drives the rows of field
    "a" seen about once towards 0 while frequently seen rows keep norms of order 1 (recbench's earlier
    regime, row-sparse Adagrad without decay, leaves them at their initial norms, ~0.2). ~4 s."""
    module, _, rare = train_planted(0, 300)
    norms = l1_norms(module)
    assert np.median(norms[~rare]) > 0.3
    assert np.median(norms[rare]) < 1e-2 * np.median(norms[~rare])
    assert np.mean(norms[rare] < 1e-4) >= 0.4


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_learned_thresholds_prune_the_rarely_seen_rows(seed):
    """With the reference's defaults (alpha = t_lr = 3e-4, wd 5e-5, Xavier) and 1,000 steps, the
    learned thresholds prune rows, only rarely seen ones, and pruned rows are rarer than kept ones
    (Mann-Whitney). ~15 s per seed."""
    module, counts, rare = train_planted(seed, 1000)
    kept = (module.row_scores() > 0).numpy()[:200]
    assert (module.thresholds.detach() > 0).all()
    assert 0 < (~kept).sum() and not (~kept & ~rare).any()  # rows pruned, no frequently seen one
    assert (~kept).sum() >= 0.3 * rare.sum()
    assert mannwhitneyu(counts[~kept], counts[kept], alternative="less").pvalue < 1e-10


def test_one_step_matches_the_reference_optimizers():
    """Parity with train_help.get_optimizer on fixed weights: thresholds t - t_lr * g (plain SGD);
    table: torch Adam's first step with L2, e - lr * g' / (|g'| + eps), g' = g + wd * e on every
    row, untouched rows (g = 0) included."""
    tables = [TableSpec("a", 50, np.ones(50, dtype=np.int64)), TableSpec("b", 30, np.ones(30, dtype=np.int64))]
    module = solve_and_build(OptEmbed(threshold_learning_rate=1e-2, table_weight_decay=1e-2), tables, DIM, Budget(0.5))
    model = Head(module, 2)
    optimizers = build_optimizers(model, module, DenseOptimizer(DENSE_LR), EmbeddingOptimizer())
    assert set(optimizers) == {"dense", "dense_sgd"}
    with torch.no_grad():
        module.thresholds.copy_(module.row_scores()[[0, 50]] + module.thresholds - 0.05)  # near the margin
    ids = torch.tensor([0, 3, 3, 7, 1, 2, 2, 9])  # 4 samples: field a then field b
    kjt = KeyedJaggedTensor(keys=["a", "b"], values=ids, lengths=torch.ones(8, dtype=torch.int32))
    model.train()
    torch.manual_seed(0)
    loss = nn.functional.binary_cross_entropy_with_logits(model(kjt), torch.tensor([1.0, 0, 1, 0])) + module.extra_loss()
    loss.backward()
    e, g, t, gt = (module.weight.detach().clone(), module.weight.grad.clone(), module.thresholds.detach().clone(),
                   module.thresholds.grad.clone())
    assert not g.is_sparse and (gt != 0).any()
    for opt in optimizers.values():
        opt.step()
    g2 = g + 1e-2 * e
    assert torch.allclose(module.weight.detach(), e - DENSE_LR * g2 / (g2.abs() + 1e-8), atol=1e-7)
    assert torch.allclose(module.thresholds.detach(), t - 1e-2 * gt)
    untouched = torch.ones(80, dtype=torch.bool)
    untouched[[0, 3, 7, 51, 52, 59]] = False
    moved = (e - module.weight.detach())[untouched].abs()
    assert float((moved > 0.9 * DENSE_LR).float().mean()) > 0.98  # untouched rows decay by ~lr per coordinate


def test_initialisations():
    """xavier: the reference's xavier_uniform_ over (sum n_f, D); hetu: U(+-sqrt(1 / max n_f));
    dlrm (recbench's earlier init): U(+-1/sqrt(n_f)) per field."""
    tables = [TableSpec("a", 400, None), TableSpec("b", 100, None)]
    bounds = {"xavier": [math.sqrt(6 / (500 + DIM))] * 2, "hetu": [math.sqrt(1 / 400)] * 2,
              "dlrm": [1 / math.sqrt(400), 1 / math.sqrt(100)]}
    for init, (ba, bb) in bounds.items():
        weight = solve_and_build(OptEmbed(init=init), tables, DIM, Budget(0.5)).weight.detach()
        for part, bound in ((weight[:400], ba), (weight[400:], bb)):
            assert part.abs().max() <= bound and part.abs().max() > 0.95 * bound and abs(float(part.mean())) < 0.1 * bound
    reference = torch.empty(500, DIM)
    nn.init.xavier_uniform_(reference)
    assert reference.abs().max() <= bounds["xavier"][0]


@pytest.mark.parametrize("hparams, names", [
    ({}, {"dense", "dense_sgd"}),
    ({"table_optimizer": "sparse_adam", "table_learning_rate": 1e-3}, {"dense", "sparse_sparse_adam", "dense_sgd"}),
    ({"threshold_optimizer": "adam", "table_optimizer": "adagrad", "table_weight_decay": 0, "init": "dlrm"},
     {"dense", "sparse"}),
])
def test_regimes_optimizers_and_memory(hparams, names):
    """Each regime's optimizers ("dense" holds the head at least) in the supernet and the retrain
    stage; the closed-form training bytes equal the measured ones, with and without a kept field."""
    rng = np.random.default_rng(0)
    tables = [TableSpec("a", 200, rng.integers(0, 50, 200)), TableSpec("b", 60, rng.integers(0, 50, 60)),
              TableSpec("c", 5, rng.integers(0, 50, 5))]
    for budget, expected in ((Budget(0.5), names), (Budget(0.5, min_rows_to_compress=10), names | {"sparse"})):
        method = OptEmbed(**hparams)
        module = solve_and_build(method, tables, DIM, budget)
        assert set(build_optimizers(Head(module, 3), module, DenseOptimizer(), EmbeddingOptimizer())) == expected
        closed = method.memory(tables, DIM, method.solve(tables, DIM, budget).hparams)
        assert module.memory_report().training_bytes == closed.training_bytes
        keep = torch.zeros(module.num_rows, dtype=torch.bool)
        keep[::3] = True
        retrain = method.rebuild(module, {"keep": keep, "dims": torch.full((len(module.compressed_sizes),), 4)})
        assert isinstance(retrain, OptEmbedRetrain) and retrain.table_training == module.table_training
        assert set(build_optimizers(Head(retrain, 3), retrain, DenseOptimizer(), EmbeddingOptimizer())) == expected - {"dense_sgd"}


def test_sparse_adam_decays_the_touched_rows_lazily():
    """table_optimizer=sparse_adam: the loss gains 0.5 * wd * ||e_x||^2 of each unique touched row
    (once per batch), as a row-sparse gradient; untouched rows get none."""
    tables = [TableSpec("a", 50, None), TableSpec("b", 30, None)]
    module = solve_and_build(OptEmbed(table_optimizer="sparse_adam", table_learning_rate=1e-3, table_weight_decay=0.1,
                             threshold_regularization=0.0), tables, DIM, Budget(0.5))
    module.train()
    ids = torch.tensor([4, 4, 9, 1, 1, 2])
    module(KeyedJaggedTensor(keys=["a", "b"], values=ids, lengths=torch.ones(6, dtype=torch.int32)))
    rows = torch.tensor([4, 9, 51, 52])
    penalty = module.extra_loss()
    assert torch.allclose(penalty, 0.05 * (module.weight.detach()[rows] ** 2).sum())
    penalty.backward()
    grad = module.weight.grad.coalesce()
    assert grad.is_sparse and sorted(grad.indices()[0].tolist()) == rows.tolist()
    assert torch.allclose(grad.to_dense()[rows], 0.1 * module.weight.detach()[rows])
    assert float(module.extra_loss().detach()) == 0.0  # consumed: the next batch's rows only


def test_bad_regime_values_are_rejected():
    for key, value in (("threshold_optimizer", "adagrad"), ("table_optimizer", "rowwise_adagrad"), ("init", "normal")):
        with pytest.raises(ValueError, match=f"method 'optembed': {key}="):
            OptEmbed(**{key: value})
    with pytest.raises(ValueError, match="table_weight_decay"):
        OptEmbed(table_optimizer="adagrad")  # the reference's decay with a rule that takes none
    with pytest.raises(ValueError, match="table_learning_rate=None with table_optimizer='sparse_adam'"):
        OptEmbed(table_optimizer="sparse_adam")
    with pytest.raises(ValueError, match="table_learning_rate"):
        OptEmbed(table_learning_rate=0.0)
