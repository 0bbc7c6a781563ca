"""The CPU synchronised batch norm (``recbench.methods.blocks.sync_batch_norm``) computed in one process
equals ``nn.BatchNorm1d`` (outputs, input gradients, running statistics); weight-0 copies of a
value are normalised but counted once. Its 2-rank use is checked by the dpq/mgqe scenarios of
``tests/training/test_distributed_batch_methods.py``."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from recbench.methods.blocks.sync_batch_norm import batch_norm, global_batch_norm


def _reference(x: torch.Tensor, upstream: torch.Tensor):
    norm = nn.BatchNorm1d(x.shape[1], affine=False)
    x = x.clone().requires_grad_(True)
    y = norm(x)
    y.backward(upstream)
    return y.detach(), x.grad, norm


def test_global_batch_norm_in_one_process_equals_batch_norm_1d():
    torch.manual_seed(0)
    x, upstream = torch.randn(37, 5) * 3 + 1, torch.randn(37, 5)
    expected, expected_grad, reference = _reference(x, upstream)
    norm = nn.BatchNorm1d(5, affine=False)
    mine = x.clone().requires_grad_(True)
    y = global_batch_norm(mine, norm, world=1)
    y.backward(upstream)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(mine.grad, expected_grad, atol=1e-5, rtol=0)
    torch.testing.assert_close(norm.running_mean, reference.running_mean, atol=1e-6, rtol=0)
    torch.testing.assert_close(norm.running_var, reference.running_var, atol=1e-5, rtol=0)


def test_weight_zero_copies_are_normalised_but_counted_once():
    """A value held twice (two ranks looking up the same row): the copy has weight 0; outputs
    equal batch norm over the unique values and the copies' gradients sum to the unique value's."""
    torch.manual_seed(1)
    unique, upstream = torch.randn(20, 4), torch.randn(20, 4)
    copies = torch.tensor([3, 7, 7, 15])
    share = torch.rand(len(copies), 4)  # part of a value's upstream gradient arrives through its copy
    direct = upstream.clone()
    direct.index_add_(0, copies, -share)
    expected, expected_grad, _ = _reference(unique, upstream)
    x = torch.cat([unique, unique[copies]]).requires_grad_(True)
    weights = torch.cat([torch.ones(20), torch.zeros(len(copies))])
    y = global_batch_norm(x, nn.BatchNorm1d(4, affine=False), world=1, weights=weights)
    y.backward(torch.cat([direct, share]))
    torch.testing.assert_close(y[:20], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(y[20:], expected[copies], atol=1e-5, rtol=0)
    summed = x.grad[:20].index_add(0, copies, x.grad[20:])
    torch.testing.assert_close(summed, expected_grad, atol=1e-5, rtol=0)


def test_one_process_and_evaluation_use_torch_batch_norm_itself():
    torch.manual_seed(2)
    x = torch.randn(9, 3)
    ours, theirs = nn.BatchNorm1d(3, affine=False), nn.BatchNorm1d(3, affine=False)
    assert torch.equal(batch_norm(x, ours, training=True), theirs(x))
    ours.eval(), theirs.eval()
    assert torch.equal(batch_norm(x, ours, training=False), theirs(x))


def test_affine_batch_norm_is_refused():
    with pytest.raises(ValueError, match="affine"):
        global_batch_norm(torch.randn(4, 2), nn.BatchNorm1d(2), world=1)
