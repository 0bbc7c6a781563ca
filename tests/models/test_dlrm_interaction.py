"""DLRM's pairwise interaction (``PairwiseInteraction``) against TorchRec's ``InteractionArch``:
the same values and the same gradients, bit for bit."""
from __future__ import annotations

import pytest
import torch
from torchrec.models.dlrm import InteractionArch

from recbench.models.dlrm import PairwiseInteraction


@pytest.mark.parametrize("fields", [0, 1, 3, 26])
def test_pairwise_interaction_equals_torchrecs_values_and_gradients(fields):
    torch.manual_seed(fields)
    dense, sparse = torch.randn(37, 8), torch.randn(37, fields, 8)
    upstream = torch.randn(37, 8 + fields * (fields + 1) // 2)
    results = []
    for module in (InteractionArch(fields), PairwiseInteraction(fields)):
        d, s = dense.clone().requires_grad_(True), sparse.clone().requires_grad_(True)
        out = module(d, s)
        out.backward(upstream)
        results.append((out.detach(), d.grad, s.grad if fields else None))
    (out_ref, dd_ref, ds_ref), (out, dd, ds) = results
    assert out.shape == (37, 8 + fields * (fields + 1) // 2)
    assert torch.equal(out, out_ref) and torch.equal(dd, dd_ref)
    if fields:
        assert torch.equal(ds, ds_ref)
