"""FusedTables' direct TBE call equals TorchRec's FusedEmbeddingBagCollection forward, and trains the same."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.blocks.tables import FusedTables, PhysicalTable
from recbench.types import EmbeddingOptimizer


def _kjt(keys, rows, seed=0, batch=6):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 4, batch * len(keys))  # multi-hot bags, some empty
    values = np.concatenate([rng.integers(0, rows[k // batch], n) for k, n in enumerate(lengths)])
    return KeyedJaggedTensor(keys=keys, values=torch.from_numpy(values), lengths=torch.from_numpy(lengths).int())


@pytest.mark.parametrize("layout", ["per_field", "shared"])
def test_direct_lookup_matches_torchrec_forward_and_update(layout):
    if layout == "per_field":  # full, hashing, qr: one table per feature, mixed pooling
        physical = [PhysicalTable("a", 50, 8, ["f1"]), PhysicalTable("b", 30, 8, ["f2"], "mean"),
                    PhysicalTable("c", 20, 8, ["f3"])]
        rows = [50, 30, 20]
    else:  # unified: one table shared by every feature
        physical = [PhysicalTable("u", 40, 8, ["f1", "f2", "f3"])]
        rows = [40, 40, 40]
    tables = []
    for _ in range(2):
        torch.manual_seed(0)
        tables.append(FusedTables(physical, EmbeddingOptimizer("rowwise_adagrad", 0.1)))
    direct, via = tables
    initial = {t.name: direct.weight(t.name).detach().clone() for t in physical}
    kjt = _kjt(["f1", "f2", "f3"], rows)
    assert direct._direct_lookup(kjt) is not None
    out_direct, out_via = direct(kjt), via.forward_via_collection(kjt)
    assert out_direct.keys() == out_via.keys() and out_direct.length_per_key() == out_via.length_per_key()
    torch.testing.assert_close(out_direct.values(), out_via.values(), rtol=0, atol=0)
    (out_direct.values() ** 2).sum().backward()
    (out_via.values() ** 2).sum().backward()  # the fused optimizer updates inside backward
    for t in physical:
        torch.testing.assert_close(direct.weight(t.name), via.weight(t.name), rtol=0, atol=0)
    assert any(not torch.equal(direct.weight(t.name), initial[t.name]) for t in physical)  # the update happened


def test_other_key_orders_take_torchrec_path():
    physical = [PhysicalTable("a", 10, 4, ["f1"]), PhysicalTable("b", 10, 4, ["f2"])]
    tables = FusedTables(physical, EmbeddingOptimizer())
    swapped = _kjt(["f2", "f1"], [10, 10])
    assert tables._direct_lookup(swapped) is None
    out = tables(swapped)  # TorchRec's path reorders by feature name
    assert out.keys() == ["f1", "f2"]
    torch.testing.assert_close(out.values(), tables.forward_via_collection(swapped).values())
