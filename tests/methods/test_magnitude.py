"""magnitude against its reference, chenxing1999/recsys-benchmark (LERS) at commit
31dc3095e358db1da858d78308ac4184fa703315: ``src/utils.py``'s ``prune`` (scores ``|w|``, each row's
``min_item`` largest set to +inf, ``argsort`` of the flattened scores, the lowest ``int(R D p)``
zeroed), applied by ``scripts/deepfm/run_l2_benchmark.py`` to the best validation checkpoint.
Here: an independent numpy port of ``prune``; the family's sparse storage bytes computed from
the format definitions; a toy run of both stages (dense to its best checkpoint, prune, fine-tune)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recbench.methods.base import Hook
from recbench.methods.magnitude import Magnitude
from recbench.models.dlrm import DLRM
from recbench.training.optim import DenseOptimizer
from recbench.training.trainer import Trainer, TrainerConfig
from recbench.types import Budget, EmbeddingOptimizer, InfeasibleBudget, TableSpec
from solve_build import solve_and_build

DIM = 8
EMB = EmbeddingOptimizer(learning_rate=0.1)
TABLES = [TableSpec("a", 500), TableSpec("b", 120), TableSpec("c", 9)]


def lers_prune(weight: np.ndarray, num_prune: int, min_item: int = 0) -> np.ndarray:
    """Independent numpy port of LERS's ``src/utils.py::prune`` with the pruned count given."""
    weight = weight.copy()
    n_item, h = weight.shape
    norm = np.abs(weight)
    if min_item:
        top = np.argsort(-norm, axis=1)[:, :min_item]
        norm[np.arange(n_item)[:, None], top] = np.inf
    order = np.argsort(norm.ravel(), kind="stable")
    weight[order[:num_prune] // h, order[:num_prune] % h] = 0
    return weight


def storage_bytes(rows: int, dim: int, nnz: int) -> int:
    """The family's cheapest sparse storage, from the format definitions (values fp32, narrowest indices)."""
    def width(max_value):
        return next(b for b in (1, 2, 4, 8) if max_value < 2 ** (8 * b) or b == 8)
    dense = rows * dim * 4
    csr = nnz * 4 + nnz * width(dim - 1) + (rows + 1) * width(nnz)
    coo = nnz * 4 + nnz * width(rows - 1) + nnz * width(dim - 1)
    bitmap = nnz * 4 + rows * math.ceil(dim / 8) + (rows + 1) * width(nnz)
    return min(dense, csr, coo, bitmap)


@pytest.mark.parametrize("ratio, min_per_row", [(0.5, 0), (0.1, 0), (0.01, 0), (0.5, 2)])
def test_prune_keeps_exactly_the_references_top_magnitudes(ratio, min_per_row):
    method = Magnitude(min_per_row=min_per_row)
    emb = solve_and_build(method, TABLES, DIM, Budget(compression_ratio=ratio), EMB)
    rows = sum(t.num_embeddings for t in TABLES)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(rows, DIM, generator=torch.Generator().manual_seed(3)))
    trained = emb.weight.detach().numpy().copy()
    assert method.rebuild(emb, {}) is emb
    expected = lers_prune(trained, rows * DIM - emb.nnz, min_per_row)
    assert int(emb.mask.sum()) == emb.nnz == int((expected != 0).sum())
    np.testing.assert_array_equal(emb.weight.detach().numpy(), expected)
    np.testing.assert_array_equal(emb.mask.numpy(), expected != 0)
    # one global threshold (min_per_row = 0): every kept |w| is above every pruned |w|
    if min_per_row == 0:
        assert np.abs(trained[expected != 0]).min() > np.abs(trained[expected == 0]).max()
        assert emb.threshold() == pytest.approx(np.abs(trained[expected != 0]).min())
    else:
        assert ((expected != 0).sum(axis=1) >= min_per_row).all()


@pytest.mark.parametrize("ratio", [0.5, 0.1, 0.01])
def test_memory_is_the_familys_sparse_storage_of_nnz(ratio):
    method = Magnitude()
    plan = method.solve(TABLES, DIM, Budget(compression_ratio=ratio))
    rows, nnz = 629, plan.hparams["nnz"]
    target = ratio * rows * DIM * 4
    # nnz is the largest count whose storage (values + indices) fits the target
    assert storage_bytes(rows, DIM, nnz) <= target < storage_bytes(rows, DIM, nnz + 1)
    assert plan.memory.inference_bytes == storage_bytes(rows, DIM, nnz)
    emb = method.build(TABLES, DIM, plan, EMB)
    method.rebuild(emb, {})
    assert emb.memory_report().inference_bytes == plan.memory.inference_bytes
    assert emb.to_inference().table.stored_bytes() == plan.memory.inference_bytes


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="min_per_row"):
        Magnitude(min_per_row=-1)
    with pytest.raises(ValueError, match="finetune"):
        Magnitude(finetune="yes")
    with pytest.raises(ValueError, match="min_per_row"):
        Magnitude(min_per_row=DIM + 1).solve(TABLES, DIM, Budget(compression_ratio=0.5))
    with pytest.raises(InfeasibleBudget, match="min_per_row"):  # 629 rows x 2 entries > the nnz of ratio 0.1
        Magnitude(min_per_row=2).solve(TABLES, DIM, Budget(compression_ratio=0.1))


class Checker(Hook):
    """Snapshots the dense stage's best checkpoint, computes its LERS pruning independently, and
    checks at every fine-tuning step that the mask is that one and pruned entries are zero."""

    def __init__(self):
        self.best_auc, self.best_weight, self.expected, self.steps, self.nonzero_pruned = -math.inf, None, None, 0, 0
        self.stages, self.dense_aucs = [], []

    def on_stage_start(self, context):
        self.stages.append(context.stage.name)
        if context.stage.name in ("finetune", "pruned"):
            module = context.embedding
            num_prune = module.mask.numel() - module.nnz
            self.expected = lers_prune(self.best_weight, num_prune) != 0
            assert np.array_equal(module.mask.numpy(), self.expected)

    def on_eval_end(self, context, metrics):
        if context.stage.name == "dense":
            self.dense_aucs.append(metrics["auc"])
        if context.stage.name == "dense" and metrics["auc"] > self.best_auc:
            self.best_auc, self.best_weight = metrics["auc"], context.embedding.weight.detach().numpy().copy()

    def on_step_end(self, context):
        if context.stage.name == "finetune":
            module = context.embedding
            self.steps += 1
            assert np.array_equal(module.mask.numpy(), self.expected)
            self.nonzero_pruned += int(((module.weight != 0) & ~module.mask).sum())


@pytest.mark.parametrize("finetune", [True, False])
def test_a_short_job_trains_dense_prunes_its_best_checkpoint_and_finetunes(toy_dataset, finetune):
    torch.set_num_threads(1)  # tiny tensors on a shared machine (conftest restores the count)
    torch.manual_seed(0)
    method = Magnitude(finetune=finetune)
    emb = solve_and_build(method, toy_dataset.spec.tables, DIM, Budget(compression_ratio=0.1), EMB)
    model = DLRM(emb, toy_dataset.spec.num_dense, len(toy_dataset.spec.tables), DIM, [16, DIM], [16, 1])
    config = TrainerConfig(max_epochs=3, batch_size=64, progress=False, latency_repeats=1, latency_batch_size=64,
                           evals_per_epoch=4, patience=1)
    trainer = Trainer(config, model, method, toy_dataset, DenseOptimizer(), EMB)
    checker = Checker()
    trainer.hooks.append(checker)  # after the method's hooks: sees the restored best checkpoint
    result = trainer.fit()
    dense, after = result.stage_results
    assert dense["restored_best"] == 1.0 and dense["best_val_auc"] == checker.best_auc
    assert checker.dense_aucs[-1] < checker.best_auc  # early stopped: the pruned checkpoint is not the last one
    assert checker.stages == ["dense", "finetune" if finetune else "pruned"]
    assert after["target_reached"] == 1.0 and after["density"] == emb.nnz / emb.mask.numel()
    assert int(emb.mask.sum()) == emb.nnz and int(((emb.weight != 0) & ~emb.mask).sum()) == 0
    if finetune:
        assert checker.steps > 0 and checker.nonzero_pruned == 0
        assert np.array_equal(emb.mask.numpy(), checker.expected)
    else:  # the reference exactly: the tested weights are the dense best checkpoint, pruned
        np.testing.assert_array_equal(emb.weight.detach().numpy(), lers_prune(checker.best_weight, emb.mask.numel() - emb.nnz))
    assert result.metrics["test/auc"] > 0.5
