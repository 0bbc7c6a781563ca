"""Ids outside ``[0, num_embeddings)`` of their field reach no method silently: every registered
method's training form and deployable form raise ``IdOutOfRange`` naming the field, the id and the
allowed range (FBGEMM alone would replace such an id by row 0 with only a log line; hashing-style
methods would hash it like any other id). In-range ids, including the OOV row 0 and the last
row, are accepted."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.base import IdOutOfRange, check_ids
from recbench.types import TableSpec
from test_contract import METHODS, built, random_kjt, tables  # noqa: F401  (the contract's table set)


def with_id(tables, field, bad_id, rng):
    """A random in-range batch whose first id of ``field`` is replaced by ``bad_id``."""
    kjt = random_kjt(tables, 6, rng, max_bag=2)
    values = kjt.values().clone()
    start = int(np.cumsum([0] + kjt.length_per_key())[kjt.keys().index(field)])
    values[start] = bad_id
    return KeyedJaggedTensor(keys=kjt.keys(), values=values, lengths=kjt.lengths())


@pytest.mark.parametrize("name", METHODS)
def test_out_of_range_ids_are_rejected_by_both_forms(name, tables):
    _, _, module = built(name, tables)
    deployable = module.to_inference()
    rng = np.random.default_rng(0)
    field = tables[2]  # f2: 300 rows
    for form in (module, deployable):
        for bad in (field.num_embeddings, field.num_embeddings + 10**6, -1):
            with pytest.raises(IdOutOfRange, match=rf"field 'f2': id {bad} is outside \[0, 300\)"):
                form(with_id(tables, "f2", bad, rng))
        form(with_id(tables, "f2", field.num_embeddings - 1, rng))  # the last row and row 0 are fine
        form(with_id(tables, "f2", 0, rng))


def test_check_ids_counts_every_bad_id_and_ignores_other_keys():
    tables = [TableSpec("a", 10), TableSpec("b", 4)]
    kjt = KeyedJaggedTensor(keys=["a", "b", "other"], values=torch.tensor([9, 0, 3, 4, 7, 10**9]),
                            lengths=torch.tensor([2, 0, 1, 2, 1, 0], dtype=torch.int32))
    with pytest.raises(IdOutOfRange, match=r"field 'b': id 4 is outside \[0, 4\) \(2 such id\(s\)"):
        check_ids(kjt, tables)
    ok = KeyedJaggedTensor(keys=["a", "other"], values=torch.tensor([9, 10**9]),
                           lengths=torch.tensor([1, 1], dtype=torch.int32))
    check_ids(ok, tables)  # keys that are not fields of the module are not checked


def test_fbgemm_bounds_check_is_off_in_production_and_named_by_the_environment(monkeypatch):
    """Production tables skip FBGEMM's per-index check (``check_ids`` guards every module); the
    test suite turns it back on (``fatal``) so an id rewrite that leaves its table fails here."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

    from recbench.methods.full import FullEmbedding
    from recbench.methods.blocks.tables import BOUNDS_CHECK_VARIABLE
    from recbench.types import EmbeddingOptimizer

    def modes():
        module = FullEmbedding([TableSpec("a", 10), TableSpec("b", 4)], 4, EmbeddingOptimizer())
        return {lookup._emb_module.bounds_check_mode_int for lookup in module.fused.collection._emb_modules}

    assert modes() == {BoundsCheckMode.FATAL.value}  # tests/conftest.py
    monkeypatch.delenv(BOUNDS_CHECK_VARIABLE)
    assert modes() == {BoundsCheckMode.NONE.value}
    monkeypatch.setenv(BOUNDS_CHECK_VARIABLE, "sometimes")
    with pytest.raises(ValueError, match=r"RECBENCH_FBGEMM_BOUNDS_CHECK='sometimes'; allowed: none, fatal"):
        modes()
