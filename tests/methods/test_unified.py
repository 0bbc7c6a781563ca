"""Unified Embedding: one shared table, per-field salts, k probes of width D/k concatenated."""
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.blocks import hashing_fns as H
from recbench.methods.unified import SHARED, Unified
from recbench.types import Budget, EmbeddingOptimizer, TableSpec
from solve_build import solve_and_build

DIM = 16
TABLES = [TableSpec("a", 3000), TableSpec("b", 2000, pooling="mean", multi_hot=True), TableSpec("small", 12)]


def kjt(ids, lengths=None):
    lengths = lengths if lengths is not None else torch.ones(sum(len(x) for x in ids), dtype=torch.int32)
    return KeyedJaggedTensor(keys=[t.name for t in TABLES], values=torch.cat(ids), lengths=lengths)


def build(ratio=0.1, probes=2, min_rows=0, seed=0):
    torch.manual_seed(0)
    return solve_and_build(Unified(probes=probes, hash_seed=seed), 
        TABLES, DIM, Budget(compression_ratio=ratio, min_rows_to_compress=min_rows), EmbeddingOptimizer(kind="sgd"))


def test_budget_charges_the_shared_table_and_kept_fields():
    hp = Unified(probes=4).solve(TABLES, DIM, Budget(compression_ratio=0.1, min_rows_to_compress=100)).hparams
    memory = Unified(probes=4).memory(TABLES, DIM, hp)
    assert hp["kept"] == ["small"]
    assert memory.inference_bytes == hp["rows"] * (DIM // 4) * 4 + 12 * DIM * 4
    assert 0.09 <= memory.compression_ratio <= 0.1


def test_probes_concatenate_rows_of_the_shared_table():
    module = build(probes=2)
    ids = torch.arange(200)
    out = module(kjt([ids, ids, ids % 12])).to_dict()
    weight = module.fused.weight(SHARED)
    a, b = H.draw(0, (3, 2))
    for f, name in enumerate(["a", "b"]):
        rows = H.universal(ids.unsqueeze(1), a[f], b[f], module.rows)
        assert torch.allclose(out[name], torch.cat([weight[rows[:, 0]], weight[rows[:, 1]]], dim=1))


def test_salts_decorrelate_fields_and_probes():
    module = build(ratio=0.5)
    ids = torch.arange(2000)
    rows_a, rows_b = module.probe_rows("a", ids), module.probe_rows("b", ids)
    same_field_rate = float((rows_a[:, 0] == rows_b[:, 0]).double().mean())
    same_probe_rate = float((rows_a[:, 0] == rows_a[:, 1]).double().mean())
    expected = 1 / module.rows
    assert same_field_rate < 5 * expected + 0.005 and same_probe_rate < 5 * expected + 0.005
    # and the salts are a function of the seed
    assert torch.equal(build(ratio=0.5, seed=0).probe_rows("a", ids), rows_a)
    assert not torch.equal(build(ratio=0.5, seed=1).probe_rows("a", ids), rows_a)


def test_kept_field_uses_its_own_table_and_inference_form_matches():
    module = build(min_rows=100).eval()
    ids = [torch.arange(50), torch.arange(60) % 2000, torch.arange(50) % 12]
    lengths = torch.cat([torch.ones(50, dtype=torch.int32), torch.full((50,), 0, dtype=torch.int32),
                         torch.ones(50, dtype=torch.int32)])
    lengths[50:80] = 2  # 30 bags of 2 ids in "b", 20 empty bags
    features = kjt(ids, lengths)
    out = module(features)
    assert torch.allclose(out.to_dict()["small"], module.fused.weight("small")[ids[2]])
    with torch.no_grad():
        assert torch.equal(out.values(), module.to_inference()(features).values())


@pytest.mark.parametrize("probes", [3, 8])
def test_probe_width_must_divide_dim_and_be_a_multiple_of_4(probes):
    with pytest.raises(ValueError, match="probes"):
        Unified(probes=probes).solve(TABLES, DIM, Budget(compression_ratio=0.5))
