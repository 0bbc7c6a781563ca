"""AutoSrh: frequency groups, soft selection, Hetu's schedule on a toy run (alpha in [0, 1], dense
layers frozen in the search, magnitude prune) and the joint variant's pair pruning."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recbench.methods.blocks import sparse_storage
from recbench.methods.autosrh import SEARCH, AutoSrh, AutoSrhEmbedding, frequency_groups
from recbench.methods.base import Hook
from recbench.methods.families.pruning import top_k_mask
from recbench.models.dlrm import DLRM
from recbench.training.optim import DenseOptimizer
from recbench.training.trainer import Trainer, TrainerConfig
from recbench.types import Budget, EmbeddingOptimizer, TableSpec, full_embedding_bytes
from solve_build import solve_and_build

DIM = 8
#: revision 1's regime, kept as options
JOINT = dict(schedule="joint", grouping="per_field", num_groups=10, selection_l1=1e-4, retrain_init="scratch")


def tables():
    return [TableSpec("a", 10, np.array([5, 90, 1, 40, 3, 70, 2, 60, 4, 80])),
            TableSpec("b", 3, np.array([1, 3, 2])), TableSpec("c", 200, np.arange(200)[::-1].copy())]


def test_per_field_groups_follow_training_frequency():
    groups, count = frequency_groups(tables(), 5, "per_field")
    groups = groups.numpy()
    a, b, c = groups[:10], groups[10:13], groups[13:]
    assert count == 13
    # field a: ids by descending count 1, 9, 5, 7, 3 | 0, 8, 4, 6, 2 -> five groups of two
    assert [sorted(np.flatnonzero(a == g).tolist()) for g in range(5)] == [[1, 9], [5, 7], [0, 3], [4, 8], [2, 6]]
    assert sorted(set(b.tolist())) == [5, 6, 7] and b[1] == 5 and b[0] == 7  # fewer rows than groups: one id each
    assert sorted(set(c.tolist())) == list(range(8, 13)) and (np.bincount(c - 8) == 40).all()
    assert (np.diff(c) >= 0).all()  # c's counts fall with the id: groups in id order
    with pytest.raises(ValueError, match="field 'x' has no counts"):
        frequency_groups([TableSpec("x", 4)], 2)


def test_global_groups_span_the_fields_rarest_first():
    groups, count = frequency_groups(tables(), 6, "global")
    counts = np.concatenate([t.counts for t in tables()])
    assert count == 6 and groups.shape == (213,) and set(groups.tolist()) == set(range(6))
    mean_count = [counts[groups.numpy() == g].mean() for g in range(6)]
    assert mean_count == sorted(mean_count)  # group 0 is the rarest
    for g in range(5):  # no tie straddles a boundary
        assert counts[groups.numpy() == g].max() < counts[groups.numpy() == g + 1].min()


def test_soft_selection_scales_each_group_and_dim():
    module = solve_and_build(AutoSrh(), tables(), DIM, Budget(0.5))
    rows = torch.arange(module.num_rows)
    weights = module.weight.detach()
    assert torch.equal(module.effective(rows, None, weights), weights)  # warm-up: the plain table
    module.advance()
    assert int(module.phase) == SEARCH and not module.selection.requires_grad
    with torch.no_grad():
        module.selection.copy_(torch.rand_like(module.selection))
    got = module.effective(rows, None, weights)
    assert torch.allclose(got, weights * module.selection.detach()[module.row_group])
    assert torch.allclose(module.effective_table(), got)


def test_hetu_deploys_a_magnitude_prune_of_the_selected_table():
    tabs, budget = tables(), Budget(0.3)
    method = AutoSrh()
    hparams = method.solve(tabs, DIM, budget).hparams
    module = solve_and_build(method, tabs, DIM, budget)
    module.advance()
    with torch.no_grad():
        module.selection.copy_(torch.rand_like(module.selection))
        module.selection[0, :3] = 0.0
    module.advance()
    assert module.retraining and bool(module.mask.all())  # retrain keeps every entry, alpha frozen
    effective = module.effective_table()
    assert torch.equal(module.deployable_mask(), top_k_mask(effective.abs(), hparams["nnz"]))
    assert not module.deployable_mask()[module.row_group == 0][:, :3].any()  # alpha 0: pruned first
    deployed = module.to_inference()
    bytes_held = sum(t.numel() * t.element_size() for t in deployed.state_dict().values())
    assert bytes_held == method.memory(tabs, DIM, hparams).inference_bytes <= 0.3 * full_embedding_bytes(tabs, DIM)


def test_joint_pruning_removes_the_smallest_selection_weights_to_the_budget():
    tabs, budget = tables(), Budget(0.3)
    method = AutoSrh(**{**JOINT, "num_groups": 4})
    hparams = method.solve(tabs, DIM, budget).hparams
    module: AutoSrhEmbedding = solve_and_build(method, tabs, DIM, budget, EmbeddingOptimizer())
    assert int(module.phase) == SEARCH and module.selection.requires_grad
    torch.manual_seed(0)
    with torch.no_grad():  # distinct selection strengths with random signs
        strengths = torch.randperm(module.selection.numel()).float().view_as(module.selection) + 1
        module.selection.copy_(strengths * torch.sign(torch.randn_like(strengths)))
    module.advance()
    mask = module.mask
    assert int(mask.sum()) == hparams["nnz"]  # exactly the solved number of entries
    pair_kept = torch.zeros_like(strengths)
    pair_kept.index_put_((module.row_group.unsqueeze(1).expand_as(mask)[mask],
                          torch.arange(DIM).expand_as(mask)[mask]), torch.tensor(1.0), accumulate=True)
    sizes = torch.bincount(module.row_group, minlength=strengths.shape[0]).unsqueeze(1).float()
    full_pairs, gone = pair_kept == sizes, pair_kept == 0
    assert int((~full_pairs & ~gone).sum()) <= 1  # at most the pair at the cut is partly kept
    assert strengths[full_pairs].min() > strengths[gone].max()  # every removed pair is weaker than every kept one
    deployed = module.to_inference()
    bytes_held = sum(t.numel() * t.element_size() for t in deployed.state_dict().values())
    assert bytes_held == method.memory(tabs, DIM, hparams).inference_bytes
    assert bytes_held == sparse_storage.stored_bytes(module.num_rows, DIM, hparams["nnz"])
    # retraining: the selection is no longer used, the mask is re-applied, the table re-drawn (scratch)
    assert module.retraining and torch.equal(module.weight != 0, mask)


class _Watch(Hook):
    """Records alpha's range after every step and the dense parameters at each stage's start and end."""

    def __init__(self):
        self.low, self.high, self.steps = [], [], []
        self.dense = {}

    def on_stage_start(self, context):
        self.dense[(context.stage.name, "start")] = self.snapshot(context)

    def on_step_end(self, context):
        alpha = context.embedding.selection.detach()
        self.low.append(float(alpha.min()))
        self.high.append(float(alpha.max()))
        self.steps.append(context.stage.name)

    def on_stage_end(self, context):
        self.dense[(context.stage.name, "end")] = self.snapshot(context)

    @staticmethod
    def snapshot(context):
        own = {id(p) for p in context.embedding.parameters()}
        return [p.detach().clone() for p in context.model.parameters() if id(p) not in own]


class _Watched(AutoSrh):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.watch = _Watch()

    def hooks(self):
        return [self.watch] + super().hooks()


def _toy_fit(dataset, method):
    spec = dataset.spec
    torch.set_num_threads(1)  # tiny tensors on a shared machine (conftest restores the count)
    torch.manual_seed(0)
    model = DLRM(solve_and_build(method, spec.tables, DIM, Budget(0.3)), spec.num_dense, len(spec.tables), DIM, [16, DIM], [16, 1])
    config = TrainerConfig(max_epochs=1, batch_size=64, progress=False, latency_repeats=1)
    return model, Trainer(config, model, method, dataset, DenseOptimizer(), EmbeddingOptimizer()).fit()


def test_hetu_alpha_stays_in_unit_interval_and_dense_layers_stay_frozen_in_the_search(toy_dataset):
    """Hetu's schedule on a toy run: alpha (init 1) is clipped to [0, 1] after every step; it moves
    (it only can fall); the search changes no dense parameter; the deployable table meets the budget."""
    method = _Watched(search_max_epochs=1)
    model, result = _toy_fit(toy_dataset, method)
    watch = method.watch
    assert [r for r in ("warmup", "search", "retrain") if r in set(watch.steps)] == ["warmup", "search", "retrain"]
    assert min(watch.low) >= 0.0 and max(watch.high) <= 1.0
    search = result.stage_results[1]
    assert search["selection_max"] <= 1.0 and search["selection_min"] < 0.99 and search["restored_best"] == 1.0
    start, end = watch.dense[("search", "start")], watch.dense[("search", "end")]
    assert all(torch.equal(a, b) for a, b in zip(start, end))
    warm_start, warm_end = watch.dense[("warmup", "start")], watch.dense[("warmup", "end")]
    assert not all(torch.equal(a, b) for a, b in zip(warm_start, warm_end))  # the warm-up trains them
    assert all(p.requires_grad for p in model.parameters() if p is not model.embedding.selection)
    full = full_embedding_bytes(toy_dataset.spec.tables, DIM)
    assert result.metrics["emb/bytes_inference"] <= 0.3 * full and result.metrics["test/auc"] > 0.55


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="retrain_init='warm'; allowed: inherit, scratch"):
        AutoSrh(retrain_init="warm")
    with pytest.raises(ValueError, match="num_groups"):
        AutoSrh(num_groups=0)
    with pytest.raises(ValueError, match="schedule='bilevel'; allowed: hetu, joint"):
        AutoSrh(schedule="bilevel")
    with pytest.raises(ValueError, match="grouping='field'; allowed: global, per_field"):
        AutoSrh(grouping="field")
    with pytest.raises(ValueError, match="selection_learning_rate=0"):
        AutoSrh(selection_learning_rate=0)
