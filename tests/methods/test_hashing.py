"""The hashing trick: rows proportional to field sizes, per-field salted hashes, modulo option."""
import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.blocks import hashing_fns as H
from recbench.methods.base import InfeasibleBudget
from recbench.methods.hashing import Hashing
from recbench.types import Budget, EmbeddingOptimizer, TableSpec
from solve_build import solve_and_build

TABLES = [TableSpec("a", 1000), TableSpec("b", 400), TableSpec("small", 10)]


def kjt(ids_per_field):
    return KeyedJaggedTensor(keys=[t.name for t in TABLES], values=torch.cat(ids_per_field),
                             lengths=torch.ones(sum(len(x) for x in ids_per_field), dtype=torch.int32))


def test_rows_proportional_to_field_size_and_small_fields_kept():
    budget = Budget(compression_ratio=0.1, min_rows_to_compress=50)
    hp = Hashing(allocation="proportional").solve(TABLES, 8, budget).hparams
    assert set(hp["rows"]) == {"a", "b"}  # "small" stays full
    r = hp["row_fraction"]
    assert hp["rows"]["a"] == int(np.ceil(r * 1000)) and hp["rows"]["b"] == int(np.ceil(r * 400))
    memory = Hashing().memory(TABLES, 8, hp)
    assert memory.inference_bytes == (hp["rows"]["a"] + hp["rows"]["b"] + 10) * 8 * 4
    assert 0.9 * 0.1 <= memory.compression_ratio <= 0.1


def test_cap_allocation_hashes_only_fields_larger_than_the_cap():
    tables = TABLES + [TableSpec("c", 3000)]
    budget = Budget(compression_ratio=0.2)
    hp = Hashing().solve(tables, 8, budget).hparams
    cap = hp["row_cap"]
    assert hp["rows"] == {t.name: min(t.num_embeddings, cap) for t in tables}
    assert hp["rows"]["small"] == 10  # a field below the cap keeps one row per id
    memory = Hashing().memory(tables, 8, hp)
    assert 0.9 * 0.2 <= memory.compression_ratio <= 0.2
    over = Hashing().memory(tables, 8, {"rows": {t.name: min(t.num_embeddings, cap + 1) for t in tables}})
    assert over.compression_ratio > 0.2  # the cap is the largest that fits


@pytest.mark.parametrize("allocation,ratio", [("cap", 0.5), ("proportional", 0.995)])
def test_a_field_the_allocation_leaves_whole_keeps_its_ids(allocation, ratio):
    """Revision 2: a compressed field with m_f = n_f is looked up by its ids (hashing it into n_f
    buckets would make ~63% of its ids share a row); only shrunk fields are hashed."""
    tables = [TableSpec("big", 5000), TableSpec("mid", 60)]
    module = solve_and_build(Hashing(allocation=allocation), tables, 8, Budget(compression_ratio=ratio, min_rows_to_compress=1),
                             EmbeddingOptimizer(kind="sgd"))
    assert int(module.buckets[1]) == 60 and int(module.buckets[0]) < 5000
    ids = [torch.arange(5000), torch.arange(5000) % 60]
    keys = KeyedJaggedTensor(keys=["big", "mid"], values=torch.cat(ids), lengths=torch.ones(10000, dtype=torch.int32))
    rows = module.rows_of(keys)
    assert torch.equal(rows[5000:], ids[1])  # one row per id, no collision
    a, b = H.draw(0, (2,))
    assert torch.equal(rows[:5000], H.universal(ids[0], a[0], b[0], int(module.buckets[0])))
    assert Hashing.revision == 2


def test_unknown_allocation_is_rejected():
    with pytest.raises(ValueError, match="allowed: cap, proportional"):
        Hashing(allocation="greedy")


def test_infeasible_when_one_row_per_field_exceeds_budget():
    with pytest.raises(InfeasibleBudget, match="one row per compressed field"):
        Hashing().solve(TABLES, 8, Budget(compression_ratio=0.001))


def test_lookup_rows_are_the_universal_hash_of_each_field():
    torch.manual_seed(0)
    module = solve_and_build(Hashing(hash_seed=5), TABLES, 8, Budget(compression_ratio=0.1, min_rows_to_compress=50),
                             EmbeddingOptimizer(kind="sgd"))
    ids = [torch.arange(1000), torch.arange(1000) % 400, torch.arange(1000) % 10]
    rows = module.rows_of(kjt(ids))
    a, b = H.draw(5, (3,))
    m_a, m_b = int(module.buckets[0]), int(module.buckets[1])
    assert torch.equal(rows[:1000], H.universal(ids[0], a[0], b[0], m_a))
    assert torch.equal(rows[1000:2000], H.universal(ids[1], a[1], b[1], m_b))
    assert torch.equal(rows[2000:], ids[2])  # kept field: identity
    # the same raw id lands on different rows in different fields (independent salts)
    assert float((rows[:400] % m_b == rows[1000:1400]).double().mean()) < 0.1
    # every id's vector is its hashed row
    out = module(kjt(ids)).to_dict()["a"]
    assert torch.allclose(out, module.fused.weight("a")[rows[:1000]])


def test_modulo_option():
    module = solve_and_build(Hashing(hash_function="modulo"), TABLES, 8, Budget(compression_ratio=0.5), EmbeddingOptimizer())
    ids = [torch.arange(1000), torch.arange(1000) % 400, torch.arange(1000) % 10]
    rows = module.rows_of(kjt(ids))
    assert torch.equal(rows[:1000], ids[0] % int(module.buckets[0]))


def test_config_rejects_unknown_hash_and_fixed_rows():
    with pytest.raises(ValueError, match="allowed: universal, modulo"):
        Hashing(hash_function="crc")
    with pytest.raises(ValueError, match="only 'auto'"):
        Hashing(rows=100)
