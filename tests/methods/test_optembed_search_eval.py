"""OptEmbed's search evaluation path against the plain forward: the per-candidate masks of the
stored full-dim rows give the eval forward's output bitwise, the columns the module calls active
hold every nonzero output, DCNv2's memo forward on those columns gives the full forward's logits
to float summation order, and the scores of a search evaluation in small row batches equal
``Trainer.evaluate``'s per candidate."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recbench.datasets.batching import BatchIterator
from recbench.methods.optembed import OptEmbed
from recbench.models.dcn import DCNv2
from recbench.training.optim import DenseOptimizer
from recbench.training.search_cache import SearchEvaluation
from recbench.training.trainer import Trainer, TrainerConfig
from recbench.types import Budget, EmbeddingOptimizer
from solve_build import solve_and_build

DIM = 8


def _trainer(dataset, ratio=0.3):
    torch.manual_seed(0)
    embedding = solve_and_build(OptEmbed(), dataset.spec.tables, DIM, Budget(ratio, min_rows_to_compress=10))
    model = DCNv2(embedding, dataset.spec.num_dense, len(dataset.spec.tables), DIM, [16, DIM], [32, 16, 1])
    with torch.no_grad():  # a trained-looking state: rows, thresholds and biases spread out
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    config = TrainerConfig(max_epochs=1, batch_size=64, eval_batch_size=128, progress=False)
    return Trainer(config, model, OptEmbed(), dataset, DenseOptimizer(), EmbeddingOptimizer())


def _candidates(module, count, seed=0):
    rng = np.random.default_rng(seed)
    return [tuple(int(d) for d in rng.integers(1, module.dim_cap + 1, len(module.compressed_sizes)))
            for _ in range(count)] + [None]


def _batch(dataset, trainer, rows=300):
    return next(iter(BatchIterator(dataset.spec, trainer.split("val"), rows)))


def test_precomputed_masks_give_the_eval_forward_bitwise_and_active_columns_hold_the_nonzeros(toy_dataset):
    trainer = _trainer(toy_dataset)
    module = trainer.model.embedding.eval()
    batch = _batch(toy_dataset, trainer)
    state = module.precompute(batch.sparse_features)
    assert state.pooling is not None  # the toy has mean-pooled multi-hot bags
    for candidate in _candidates(module, 4):
        module.candidate = candidate
        with torch.no_grad():
            direct = module(batch.sparse_features).values()
        assert torch.equal(module.forward_precomputed(state).values(), direct)
        columns = module.active_columns()
        inactive = torch.ones(direct.shape[1], dtype=torch.bool)
        inactive[columns] = False
        assert inactive.any() and (direct[:, inactive] == 0).all()
        assert (direct[:, columns] != 0).any(0).sum() > 0.9 * len(columns)  # the active ones are used
        dims = torch.tensor(candidate) if candidate is not None else torch.full((len(module.compressed_sizes),),
                                                                                module.dim_cap)
        assert len(columns) == DIM * len(module.kept_names) + int(dims.sum())
    module.train()
    assert module.active_columns() is None  # the sampled training dims reach D


def test_dcn_memo_forward_on_the_active_columns_equals_the_full_forward(toy_dataset):
    trainer = _trainer(toy_dataset)
    model, module = trainer.model.eval(), trainer.model.embedding
    batch = _batch(toy_dataset, trainer)
    memo = model.memo(batch.dense_features, batch.sparse_features)
    for candidate in _candidates(module, 4, seed=1):
        module.candidate = candidate
        with torch.no_grad():
            full = model(batch.dense_features, batch.sparse_features)
            restricted = model.forward_memo(memo)
        columns = module.active_columns()
        assert model._restricted_cache[0][0] == tuple(columns.tolist())  # the restricted path ran
        assert len(columns) < DIM * len(toy_dataset.spec.tables)
        torch.testing.assert_close(restricted, full, rtol=1e-6, atol=1e-6)


def test_search_scores_in_small_row_batches_equal_the_plain_evaluation(toy_dataset):
    trainer = _trainer(toy_dataset)
    module = trainer.model.embedding
    with SearchEvaluation(trainer, "val", batch_rows=48) as evaluation:
        for candidate in _candidates(module, 5, seed=2):
            module.candidate = candidate
            cached, plain = evaluation.evaluate(), trainer.evaluate("val")
            assert evaluation.cached and len(evaluation.memos) > len(trainer.split("val")) // 128
            assert cached["auc"] == pytest.approx(plain["auc"], abs=1e-6)
            assert cached["logloss"] == pytest.approx(plain["logloss"], abs=1e-6)
        assert evaluation.builds == 1
