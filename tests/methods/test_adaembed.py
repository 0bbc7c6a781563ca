"""AdaEmbed: the id-to-row map stays consistent through reallocations, importance is the row
gradient norm, the pool goes to the most important ids, evicted rows are re-initialised."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.blocks import id_gradients
from recbench.methods.adaembed import POOL, AdaEmbed, AdaEmbedEmbedding, ReallocationHook
from recbench.methods.base import InfeasibleBudget
from recbench.types import Budget, EmbeddingOptimizer, TableSpec
from test_contract import random_kjt as kjt  # the contract test's KJT builder (same folder)
from solve_build import solve_and_build

DIM = 8


def specs():
    rng = np.random.default_rng(0)
    return [TableSpec("a", 300, rng.integers(0, 50, 300)), TableSpec("b", 120, rng.integers(0, 50, 120)),
            TableSpec("tags", 40, rng.integers(0, 50, 40), pooling="mean", multi_hot=True)]


def assert_consistent(module: AdaEmbedEmbedding):
    """Every row owned by at most one id; map and owner buffers are inverse of each other."""
    owned = module.owner[module.owner >= 0].long()
    assert owned.unique().numel() == owned.numel(), "an id owns two rows"
    allocated = (module.row_of >= 0).nonzero().flatten()
    rows = module.row_of[allocated].long()
    assert rows.unique().numel() == rows.numel(), "a row is owned by two ids"
    assert torch.equal(module.owner[rows].long(), allocated), "owner[row_of[id]] != id"
    assert int((module.owner >= 0).sum()) == module.pool_rows == allocated.numel(), "the pool is not full"


def test_map_consistent_after_reallocations_and_evicted_rows_reinitialised():
    tables = specs()
    module = solve_and_build(AdaEmbed(fallback="zero"), tables, DIM, Budget(0.3), EmbeddingOptimizer(kind="sgd", learning_rate=0.1))
    assert_consistent(module)
    rng = np.random.default_rng(1)
    for _ in range(3):
        before = module.row_of.clone()
        module.importance.copy_(torch.rand(module.importance.numel()))  # a drifted hot set
        moved = module.reallocate()
        assert moved["admitted"] == moved["evicted"] > 0
        assert_consistent(module)
        admitted = ((before < 0) & (module.row_of >= 0)).nonzero().flatten()
        weight = module.fused.weight(POOL)
        assert torch.all(weight[module.row_of[admitted].long()] == 0), "rows handed to new ids are re-initialised"
        out = module(kjt(tables, 32, rng))
        (out.values() ** 2).sum().backward()
    # the pool holds the top ids by field-normalised importance
    norm = module.importance.clone()
    top = set(module.top_ids(norm).tolist())
    module.reallocate()
    assert set((module.row_of >= 0).nonzero().flatten().tolist()) == top


def test_shared_fallback_rows_copy_into_admitted_rows():
    tables = specs()
    module = solve_and_build(AdaEmbed(fallback="shared"), tables, DIM, Budget(0.3), EmbeddingOptimizer(kind="sgd"))
    module.importance.copy_(torch.rand(module.importance.numel()))
    before = module.row_of.clone()
    module.reallocate()
    admitted = ((before < 0) & (module.row_of >= 0)).nonzero().flatten()
    weight = module.fused.weight(POOL)
    expected = weight[module.pool_rows + module.field_of_id[admitted]]
    assert torch.equal(weight[module.row_of[admitted].long()], expected)


def test_unallocated_ids_read_zero_and_allocated_ids_their_row():
    tables = specs()
    module = solve_and_build(AdaEmbed(fallback="zero"), tables, DIM, Budget(0.3), EmbeddingOptimizer(kind="sgd"))
    module.eval()
    a_ids = torch.arange(300)
    features = KeyedJaggedTensor(keys=["a", "b", "tags"], values=torch.cat([a_ids, torch.zeros(300, dtype=torch.long)]),
                                 lengths=torch.cat([torch.ones(600, dtype=torch.int32), torch.zeros(300, dtype=torch.int32)]))
    with torch.no_grad():
        out = module(features).to_dict()["a"]
    rows = module.row_of[:300].long()
    weight = module.fused.weight(POOL)
    assert torch.all(out[rows < 0] == 0)
    assert torch.allclose(out[rows >= 0], weight[rows[rows >= 0]])


def test_id_gradient_norms_equal_row_gradients_of_a_plain_table():
    """The norm reported for an id is the norm of its row's gradient in an unshared table."""
    tables = specs()
    module = AdaEmbedEmbedding(tables, DIM, 100, [t.name for t in tables], "zero", 0.8, 0.95,
                               EmbeddingOptimizer(kind="sgd"))
    module.train()
    features = kjt(tables, 16, np.random.default_rng(3))
    seen = {}
    module.observe = lambda keys, norms, counts: seen.update(dict(zip(keys.tolist(), norms.tolist())))
    out = module(features)
    probe = torch.randn_like(out.values())
    (out.values() * probe).sum().backward()
    # reference: an explicit per-id lookup of one plain table with autograd
    weight = torch.randn(460, DIM, requires_grad=True)
    offsets = module.id_offset
    fields, samples, scale = id_gradients.value_layout(features, module.field_index, module.is_mean)
    keys = offsets[fields] + features.values().long()
    per_value = weight[keys] * scale.unsqueeze(1)
    pooled = torch.zeros(16, 3, DIM).index_put((samples, fields), per_value, accumulate=True)
    (pooled.view(16, -1) * probe).sum().backward()
    for key, norm in seen.items():
        assert norm == pytest.approx(float(weight.grad[key].norm()), rel=1e-5, abs=1e-7)
    assert set(seen) == set(keys.unique().tolist())


def test_hook_reallocates_and_decays_on_schedule():
    tables = specs()
    module = solve_and_build(AdaEmbed(reallocate_every=2, decay=0.5, decay_every=3), tables, DIM, Budget(0.3), EmbeddingOptimizer())
    hook = ReallocationHook(2, 3)
    module.importance.fill_(1.0)
    context = SimpleNamespace(embedding=module)
    for _ in range(3):
        hook.on_step_end(context)
    assert int(module.steps) == 3 and len(hook.history) == 1
    assert torch.allclose(module.importance, torch.full_like(module.importance, 0.5))


def test_map_is_counted_and_low_ratios_are_infeasible_with_range():
    tables = specs()
    method = AdaEmbed()
    hparams = method.solve(tables, DIM, Budget(0.3)).hparams
    report = method.memory(tables, DIM, hparams)
    assert report.breakdown["map"] == 4 * sum(t.num_embeddings for t in tables)
    with pytest.raises(InfeasibleBudget) as info:
        method.solve(tables, DIM, Budget(0.05))
    assert info.value.min_ratio > 1.0 / DIM


def test_bad_settings_name_the_key():
    with pytest.raises(ValueError, match="fallback"):
        AdaEmbed(fallback="mean")
    with pytest.raises(ValueError, match="normalize"):
        AdaEmbed(normalize="zscore")


def test_reassigned_rows_keep_their_optimizer_state_as_documented():
    """The card's choice (every recorded run had it): a row handed to a new id is re-initialised,
    its row-wise Adagrad accumulator is kept."""
    tables = specs()
    module = solve_and_build(AdaEmbed(fallback="zero"), tables, DIM, Budget(0.3),
                             EmbeddingOptimizer(kind="rowwise_adagrad", learning_rate=0.1))
    rng = np.random.default_rng(1)
    for _ in range(3):
        out = module(kjt(tables, 32, rng))
        (out.values() ** 2).sum().backward()
    state = next(iter(module.fused.fused_optimizer().state_dict()["state"].values()))
    accumulator = next(iter(state.values()))
    before_state, before_map = accumulator.clone(), module.row_of.clone()
    module.importance.copy_(torch.rand(module.importance.numel()))
    assert module.reallocate()["admitted"] > 0
    rows = module.row_of[(before_map < 0) & (module.row_of >= 0)].long()
    assert torch.all(module.fused.weight(POOL)[rows] == 0)  # re-initialised
    assert float(before_state[rows].abs().sum()) > 0 and torch.equal(accumulator, before_state)  # state kept
