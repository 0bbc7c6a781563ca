"""The method contract, parametrised over every ``recbench/conf/method/*.yaml`` (the registry).

For every method: it builds on a synthetic table set; output keys and shapes are right; a
backward pass reaches every trainable parameter (fused tables change, others get gradients);
the closed-form memory equals the memory measured from the tensors held; the budget is solved
at or under the target at ratios 0.5, 0.1 and 0.01 (below (1 - tolerance) x it the job flags the
run ``under_budget``), or reported infeasible only when even the smallest solution exceeds it; the
deployable form matches within the method's stated tolerance; and a multi-hot bag pools the
per-id vectors (sum or mean), never a product of pooled parts.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from recbench.runs.config import compose
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.runs.settings import instantiate_without
from recbench.runs.config import CONFIG_DIR
from recbench.methods.base import InfeasibleBudget
from recbench.types import Budget, EmbeddingOptimizer, TableSpec, full_embedding_bytes

METHODS = sorted(p.stem for p in (Path(CONFIG_DIR) / "method").glob("*.yaml"))
DIM = 16
CARDINALITIES = [5000, 1200, 300, 37, 3]
OPT = EmbeddingOptimizer(kind="sgd", learning_rate=0.5)


def zipf_counts(rows, rng):
    counts = (1e5 / np.arange(1, rows + 1) ** 1.1).astype(np.int64)
    return rng.permutation(counts)


@pytest.fixture(scope="module")
def tables():
    rng = np.random.default_rng(0)
    specs = [TableSpec(f"f{i}", c, zipf_counts(c, rng)) for i, c in enumerate(CARDINALITIES)]
    specs.append(TableSpec("bag", 400, zipf_counts(400, rng), pooling="mean", multi_hot=True))
    specs.append(TableSpec("bagsum", 900, zipf_counts(900, rng), pooling="sum", multi_hot=True))
    return specs


def method(name):
    cfg = compose([f"method={name}"])
    return instantiate_without(cfg.method, drop=())


def feasible_budget(m, tables):
    """The largest of 1.0, 0.5, 0.1, 0.01 the method can build at."""
    for ratio in (1.0, 0.5, 0.1, 0.01):
        try:
            m.solve(tables, DIM, Budget(compression_ratio=ratio))
            return Budget(compression_ratio=ratio)
        except InfeasibleBudget:
            continue
    pytest.fail(f"{m.name}: no feasible ratio among 1, 0.5, 0.1, 0.01")


def random_kjt(tables, batch, rng, max_bag=4):
    values, lengths = [], []
    for t in tables:
        n = rng.integers(0, max_bag + 1, batch) if t.multi_hot else np.ones(batch, dtype=np.int64)
        lengths.append(n)
        values.append(rng.integers(0, t.num_embeddings, int(n.sum())))
    return KeyedJaggedTensor(keys=[t.name for t in tables], values=torch.from_numpy(np.concatenate(values)),
                             lengths=torch.from_numpy(np.concatenate(lengths).astype(np.int32)))


def built(name, tables, seed=0):
    m = method(name)
    budget = feasible_budget(m, tables)
    plan = m.solve(tables, DIM, budget, OPT)
    torch.manual_seed(seed)
    return m, budget, m.build(tables, DIM, plan, OPT)


@pytest.mark.parametrize("name", METHODS)
def test_output_keys_and_shapes(name, tables):
    _, _, module = built(name, tables)
    kjt = random_kjt(tables, 32, np.random.default_rng(1))
    out = module(kjt)
    assert out.keys() == [t.name for t in tables]
    assert out.values().shape == (32, len(tables) * DIM)
    assert out.length_per_key() == [DIM] * len(tables)
    assert torch.isfinite(out.values()).all()


@pytest.mark.parametrize("name", METHODS)
def test_backward_reaches_every_trainable_parameter(name, tables):
    _, _, module = built(name, tables)
    module.train()
    fused = {id(p) for p in module.fused_parameters()}
    before = {id(p): p.detach().clone() for p in module.fused_parameters()}
    rng = np.random.default_rng(2)
    loss = (module(random_kjt(tables, 256, rng)).values() ** 2).sum() + module.extra_loss()
    loss.backward()
    for pname, p in module.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in fused:
            assert not torch.equal(before[id(p)], p.detach()), f"{name}: fused table {pname} was not updated"
        else:
            assert p.grad is not None and float(p.grad.abs().sum()) > 0, f"{name}: no gradient reached {pname}"


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("kind", ["rowwise_adagrad", "sgd"])
def test_closed_form_memory_equals_measured(name, kind, tables):
    m = method(name)
    optimizer = EmbeddingOptimizer(kind=kind)
    budget = feasible_budget(m, tables)
    plan = m.solve(tables, DIM, budget, optimizer)
    module = m.build(tables, DIM, plan, optimizer)
    closed, measured = m.memory(tables, DIM, plan.hparams, optimizer), module.memory_report()
    assert plan.memory == closed and plan.method == m.name
    assert measured.inference_bytes == closed.inference_bytes
    assert measured.training_bytes == closed.training_bytes
    assert measured.parameters == closed.parameters
    assert measured.full_bytes == closed.full_bytes == full_embedding_bytes(tables, DIM)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("ratio", [0.5, 0.1, 0.01])
def test_budget_solved_under_the_target_or_infeasible(name, ratio, tables):
    m = method(name)
    budget = Budget(compression_ratio=ratio)
    try:
        plan = m.solve(tables, DIM, budget)
    except InfeasibleBudget as exc:
        assert exc.min_ratio <= exc.max_ratio, "an infeasible verdict must carry its reachable range"
        assert exc.min_ratio > ratio, f"{name}@{ratio}: infeasible although its smallest solution ({exc.min_ratio:.4g}) fits"
        return
    achieved = m.memory(tables, DIM, plan.hparams).compression_ratio
    assert 0 < achieved <= ratio, f"{name}@{ratio}: achieved {achieved:.4g}"
    assert plan.achieved_ratio == achieved and plan.requested_ratio == ratio
    assert plan.under_budget == (achieved < (1 - budget.tolerance) * ratio)


@pytest.mark.parametrize("name", METHODS)
def test_inference_form_matches(name, tables):
    m, _, module = built(name, tables)
    module.eval()
    kjt = random_kjt(tables, 64, np.random.default_rng(3))
    deployable = module.to_inference()
    with torch.no_grad():
        a, b = module(kjt).values(), deployable(kjt).values()
    tolerance = getattr(m, "inference_tolerance", 0.0)
    error_bound = getattr(module, "inference_error_bound", None)  # a module's stated, data-dependent bound
    if error_bound is not None:
        tolerance = float(error_bound(kjt))
    assert a.shape == b.shape
    assert torch.allclose(a, b, atol=tolerance + 1e-6, rtol=0), f"{name}: max diff {float((a - b).abs().max()):.3g}"


@pytest.mark.parametrize("name", METHODS)
def test_multi_hot_pools_per_id_vectors(name, tables):
    _, _, module = built(name, tables)
    module.eval()
    rng = np.random.default_rng(4)
    kjt = random_kjt(tables, 16, rng, max_bag=5)
    with torch.no_grad():
        pooled = module(kjt).to_dict()
        for t_index, t in enumerate(tables):
            if not t.multi_hot:
                continue
            jagged = kjt[t.name]
            ids, lengths = jagged.values(), jagged.lengths()
            # one id per bag: the per-id vectors, looked up through the same module
            singles = []
            for other in tables:
                if other.name == t.name:
                    singles.append((ids, torch.ones_like(ids, dtype=torch.int32)))
                else:
                    singles.append((torch.zeros(len(ids), dtype=torch.long), torch.ones(len(ids), dtype=torch.int32)))
            single_kjt = KeyedJaggedTensor(keys=[x.name for x in tables], values=torch.cat([s[0] for s in singles]),
                                           lengths=torch.cat([s[1] for s in singles]))
            per_id = module(single_kjt).to_dict()[t.name] if len(ids) else torch.zeros(0, DIM)
            start = 0
            for b, n in enumerate(lengths.tolist()):
                expected = per_id[start:start + n].sum(0) if n else torch.zeros(DIM)
                if t.pooling == "mean" and n:
                    expected = expected / n
                start += n
                assert torch.allclose(pooled[t.name][b], expected, atol=1e-5), f"{name}: bag {b} of {t.name}"
