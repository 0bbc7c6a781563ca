"""AutoSrh: frequency groups, soft selection, and pruning of the smallest selection weights to the budget."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from recbench.methods import sparse_storage
from recbench.methods.autosrh import AutoSrh, AutoSrhEmbedding, frequency_groups
from recbench.types import Budget, EmbeddingOptimizer, TableSpec, full_embedding_bytes

DIM = 8


def tables():
    return [TableSpec("a", 10, np.array([5, 90, 1, 40, 3, 70, 2, 60, 4, 80])),
            TableSpec("b", 3, np.array([1, 3, 2])), TableSpec("c", 200, np.arange(200)[::-1].copy())]


def test_groups_follow_training_frequency():
    groups = frequency_groups(tables(), num_groups=5).numpy()
    a, b, c = groups[:10], groups[10:13], groups[13:]
    # field a: ids by descending count 1, 9, 5, 7, 3 | 0, 8, 4, 6, 2 -> five groups of two
    assert [sorted(np.flatnonzero(a == g).tolist()) for g in range(5)] == [[1, 9], [5, 7], [0, 3], [4, 8], [2, 6]]
    assert sorted(set(b.tolist())) == [5, 6, 7] and b[1] == 5 and b[0] == 7  # fewer rows than groups: one id each
    assert sorted(set(c.tolist())) == list(range(8, 13)) and (np.bincount(c - 8) == 40).all()
    assert (np.diff(c) >= 0).all()  # c's counts fall with the id: groups in id order
    with pytest.raises(ValueError, match="field 'x' has no counts"):
        frequency_groups([TableSpec("x", 4)], 2)


def test_soft_selection_scales_each_group_and_dim():
    module = AutoSrh(num_groups=2).build(tables(), DIM, Budget(0.5))
    with torch.no_grad():
        module.selection.copy_(torch.arange(module.selection.numel(), dtype=torch.float32).view_as(module.selection))
    rows = torch.arange(module.num_rows)
    got = module.effective(rows, None, module.weight.detach())
    assert torch.allclose(got, module.weight.detach() * module.selection.detach()[module.row_group])
    assert torch.allclose(module.effective_table(), got)


def test_pruning_removes_the_smallest_selection_weights_to_the_budget():
    tabs, budget = tables(), Budget(0.3)
    method = AutoSrh(num_groups=4)
    hparams = method.solve(tabs, DIM, budget)
    module: AutoSrhEmbedding = method.build(tabs, DIM, budget, EmbeddingOptimizer())
    torch.manual_seed(0)
    with torch.no_grad():  # distinct selection strengths with random signs
        strengths = torch.randperm(module.selection.numel()).float().view_as(module.selection) + 1
        module.selection.copy_(strengths * torch.sign(torch.randn_like(strengths)))
    module.start_retraining()
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
    assert bytes_held <= 0.3 * full_embedding_bytes(tabs, DIM)
    assert bytes_held == sparse_storage.stored_bytes(module.num_rows, DIM, hparams["nnz"])
    # retraining: the selection is no longer used, the mask is re-applied, the table re-drawn (scratch)
    assert bool(module.retraining) and torch.equal(module.weight != 0, mask)


def test_bad_settings_are_rejected():
    with pytest.raises(ValueError, match="retrain_init"):
        AutoSrh(retrain_init="warm")
    with pytest.raises(ValueError, match="num_groups"):
        AutoSrh(num_groups=0)
