"""DeepLight and DSL against their papers' rules, on direct module calls and toy training runs (PEP: test_pep.py)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.blocks import budget as budget_lib
from recbench.methods.blocks import sparse_storage
from recbench.methods.base import Hook
from recbench.methods.deeplight import DeepLight, damped_sparsity, time_constant_for
from recbench.methods.dsl import DSL, prune_fraction
from recbench.models.dlrm import DLRM
from recbench.training.optim import DenseOptimizer
from recbench.training.trainer import Trainer, TrainerConfig
from recbench.types import Budget, EmbeddingOptimizer, TableSpec
from solve_build import solve_and_build

DIM = 8
EMB = EmbeddingOptimizer(learning_rate=0.1)
TABLES = [TableSpec("a", 500), TableSpec("b", 120), TableSpec("bag", 60, pooling="sum", multi_hot=True)]


def kjt(rng, tables=TABLES, batch=64):
    values, lengths = [], []
    for t in tables:
        n = rng.integers(0, 4, batch) if t.multi_hot else np.ones(batch, dtype=np.int64)
        lengths.append(n)
        values.append(rng.integers(0, t.num_embeddings, int(n.sum())))
    return KeyedJaggedTensor(keys=[t.name for t in tables], values=torch.from_numpy(np.concatenate(values)),
                             lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)))


def trainer_for(dataset, method, ratio, **cfg):
    torch.manual_seed(0)
    emb = solve_and_build(method, dataset.spec.tables, DIM, Budget(compression_ratio=ratio), EMB)
    model = DLRM(emb, dataset.spec.num_dense, len(dataset.spec.tables), DIM, [16, DIM], [16, 1])
    config = TrainerConfig(**{"max_epochs": 3, "batch_size": 64, "progress": False, "latency_repeats": 1,
                              "evals_per_epoch": 2, **cfg})
    return Trainer(config, model, method, dataset, DenseOptimizer(), EMB)


# ---------------------------------------------------------------- budget
def test_target_nnz_counts_index_bytes():
    m = DSL()
    hp = m.solve(TABLES, DIM, Budget(compression_ratio=0.1)).hparams
    rows = 680
    target = int(0.1 * rows * DIM * 4)
    assert sparse_storage.stored_bytes(rows, DIM, hp["nnz"]) <= target < sparse_storage.stored_bytes(rows, DIM, hp["nnz"] + 1)
    assert hp["density"] < 0.1  # index overhead: a mask of density d costs more than d of the dense bytes


def assert_mask_artifacts(result, module):
    """A stage result carries the mask (packed bits) and its nonzeros per compressed field."""
    rows, dim = module.mask.shape
    unpacked = np.unpackbits(result["mask_bits"].numpy())[:rows * dim].reshape(rows, dim)
    assert np.array_equal(unpacked.astype(bool), module.mask.numpy())
    per_field = result["nonzeros_per_field"]
    assert len(per_field) == len(module.tables) - len(module.kept_names)
    assert int(per_field.sum()) == int(((module.weight * module.mask) != 0).sum()) <= module.nnz


# ---------------------------------------------------------------- DeepLight
def test_deeplight_schedule_reaches_target_within_tolerance():
    target, damping, tol, horizon = 0.9429, 0.99, 1e-3, 624
    tau = time_constant_for(horizon, target, damping, tol)
    schedule = [damped_sparsity(t, target, damping, tau) for t in range(0, horizon + 1, 10)]
    assert schedule[0] == 0.0
    assert all(b > a for a, b in zip(schedule, schedule[1:]))  # monotone
    assert abs(target - damped_sparsity(horizon, target, damping, tau) - tol) < 1e-12
    assert target - damped_sparsity(horizon - 10, target, damping, tau) > tol
    # the paper's constants: 0.99^(t/100)
    assert damped_sparsity(100, 0.9, 0.99, 100) == pytest.approx(0.9 * 0.01)


def test_deeplight_prunes_on_schedule_and_ends_at_target(toy_dataset):
    method = DeepLight(warmup_epochs=0.5, time_constant="auto", pruning_epochs=1.0, prune_every=2)
    trainer = trainer_for(toy_dataset, method, 0.1, max_epochs=1)
    module = trainer.model.embedding
    seen = []

    class Watch(Hook):
        def on_step_end(self, context):
            if context.stage.name == "prune":
                seen.append((context.stage_step, 1.0 - module.density()))
                assert int(((module.weight != 0) & ~module.mask).sum()) == 0  # pruned weights stay zero

        def on_stage_end(self, context):
            if context.stage.name == "prune":
                seen.append(("end", 1.0 - module.density()))

    trainer.hooks.append(Watch())
    trainer.fit()
    target = module.target_sparsity()
    assert trainer.hooks[1].reached
    assert seen[-1][0] == "end" and abs(seen[-1][1] - target) <= 1e-3 + 1.0 / module.mask.numel()
    sparsities = [s for step, s in seen[:-1]]
    assert sparsities[0] == 0.0 and all(b >= a for a, b in zip(sparsities, sparsities[1:]))
    assert int(module.mask.sum()) == module.nnz  # the finetune stage runs at exactly nnz
    assert int(((module.weight != 0) & ~module.mask).sum()) == 0
    assert_mask_artifacts(trainer.stage_results[1], module)  # the finetune stage's fixed mask
    rng = np.random.default_rng(0)
    features = kjt(rng, toy_dataset.spec.tables)
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(features).values(), module.to_inference()(features).values())


# ---------------------------------------------------------------- DSL
def test_dsl_prune_fraction_is_cosine_annealed():
    assert prune_fraction(0, 100, 0.5) == 0.5
    assert prune_fraction(50, 100, 0.5) == pytest.approx(0.25)
    assert prune_fraction(100, 100, 0.5) == 0.0 and prune_fraction(150, 100, 0.5) == 0.0


def test_dsl_prune_and_regrow_by_magnitude_and_gradient():
    module = solve_and_build(DSL(), TABLES, DIM, Budget(compression_ratio=0.5))
    nnz = module.nnz
    assert int(module.mask.sum()) == nnz and int(((module.weight != 0) & ~module.mask).sum()) == 0
    features = kjt(np.random.default_rng(0))
    (module(features).values() ** 2 * torch.linspace(0.5, 2.0, len(TABLES) * DIM)).sum().backward()
    rows, grad = module._gradient
    assert grad.shape == (rows.numel(), DIM)
    dense_grad = torch.zeros(module.num_rows, DIM).index_add_(0, rows, grad)
    before_mask, before_weight = module.mask.clone(), module.weight.detach().clone()
    k = module.prune_and_regrow(0.2, scope="global", regrow_fill="shrink")  # recbench's earlier variant
    candidates = int(((dense_grad != 0) & ~before_mask).sum())
    assert k == min(int(0.2 * nnz), candidates) and k > 0
    dropped, grown = before_mask & ~module.mask, module.mask & ~before_mask
    assert int(module.mask.sum()) == nnz
    # dropped: the smallest magnitudes among the active entries (a just-dropped entry may regrow)
    active_after_drop = before_mask.clone()
    order = before_weight.abs().masked_fill(~before_mask, float("inf")).flatten().argsort()[:k]
    active_after_drop.view(-1)[order] = False
    assert torch.equal(dropped, before_mask & ~module.mask)
    assert int(dropped.sum()) <= k and int(grown.sum()) <= k and int(dropped.sum()) == int(grown.sum())
    # grown: the largest |gradient| among entries inactive after the drop
    grow_scores = dense_grad.abs().masked_fill(active_after_drop, -1.0)
    threshold = torch.topk(grow_scores.flatten(), k).values.min()
    newly = module.mask & ~active_after_drop
    assert int(newly.sum()) == k and float(grow_scores[newly].min()) >= float(threshold)
    assert float(module.weight.detach()[newly].abs().max()) == 0.0  # regrown at zero


def test_dsl_density_is_constant_at_every_step_and_the_mask_moves(toy_dataset):
    method = DSL(update_interval=5, anneal_epochs=1.0)
    trainer = trainer_for(toy_dataset, method, 0.1, max_epochs=1)
    module = trainer.model.embedding
    nnz, masks = module.nnz, [module.mask.clone()]

    class Check(Hook):
        def on_step_end(self, context):
            assert int(module.mask.sum()) == nnz
            assert int((module.weight != 0).sum()) <= nnz
            assert int(((module.weight != 0) & ~module.mask).sum()) == 0
            if context.stage_step % 5 == 0:
                masks.append(module.mask.clone())

    trainer.hooks.append(Check())
    trainer.fit()
    moved = [int((a != b).sum()) for a, b in zip(masks, masks[1:])]
    assert sum(moved) > 0 and trainer.hooks[1].updates > 0
    assert moved[0] > moved[-1]  # the cosine-annealed fraction shrinks to zero
    budget_bytes = budget_lib.target_bytes(toy_dataset.spec.tables, DIM, Budget(compression_ratio=0.1))
    assert module.memory_report().inference_bytes <= budget_bytes
    features = kjt(np.random.default_rng(1), toy_dataset.spec.tables)
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(features).values(), module.to_inference()(features).values())
