"""The budget rule (docs/architecture.md section 3, "Budget and memory"): a budget is infeasible only when
nothing the method can build fits under it; a solution below (1 - tolerance) x the target is
accepted (the job runs it and flags it ``under_budget``)."""
from __future__ import annotations

import numpy as np
import pytest

from recbench.methods.blocks import budget as budget_lib
from recbench.methods.base import InfeasibleBudget
from recbench.methods.dpq import DPQ
from recbench.types import Budget, TableSpec, under_budget

DIM = 16
TABLES = [TableSpec("a", 1000, np.ones(1000, dtype=np.int64)), TableSpec("b", 250, np.ones(250, dtype=np.int64))]
FULL = 1250 * DIM * 4  # 80,000 bytes


@pytest.mark.parametrize("achieved", [1, int(0.44 * FULL), int(0.9 * 0.5 * FULL), int(0.5 * FULL)])
def test_land_accepts_every_solution_at_or_under_the_target(achieved):
    assert budget_lib.land("m", achieved, TABLES, DIM, Budget(compression_ratio=0.5), 1, FULL) is None


def test_land_raises_above_the_target_with_the_reachable_range():
    with pytest.raises(InfeasibleBudget) as info:
        budget_lib.land("m", int(0.5 * FULL) + 1, TABLES, DIM, Budget(compression_ratio=0.5), int(0.5 * FULL) + 1, FULL)
    assert (info.value.min_ratio, info.value.max_ratio) == (pytest.approx(0.5 + 1 / FULL), 1.0)
    assert "the smallest solution has ratio 0.5" in str(info.value)
    with pytest.raises(InfeasibleBudget, match="one row already exceeds"):
        budget_lib.land("m", FULL, TABLES, DIM, Budget(compression_ratio=0.01), FULL, FULL, "one row already exceeds")


def test_under_budget_is_below_one_minus_tolerance_of_the_ratio():
    budget = Budget(compression_ratio=0.5, tolerance=0.1)
    assert under_budget(0.44, budget) and under_budget(0.4499, budget)
    assert not under_budget(0.45, budget) and not under_budget(0.5, budget)
    assert not under_budget(0.44, Budget(compression_ratio=0.5, tolerance=0.2))


def test_product_quantization_takes_its_best_pair_under_the_budget_when_none_lands_within_the_tolerance():
    """DPQ's largest structure (P = D = 16 parts, K = 256 codewords) stays far under 0.5: the solver
    returns it (it was infeasible under the old [1 - tolerance, 1] window) instead of raising; within
    the reachable range it still prefers a pair inside the window; below its smallest it raises."""
    method, tables = DPQ(), [TableSpec("a", 20000, None), TableSpec("b", 5000, None)]
    hparams = method.solve(tables, DIM, Budget(compression_ratio=0.5)).hparams
    achieved = method.memory(tables, DIM, hparams).compression_ratio
    assert (hparams["parts"], hparams["codewords"]) == (16, 256) and achieved == pytest.approx(0.2602, abs=1e-4)
    for ratio in (0.2, 0.1):
        hparams = method.solve(tables, DIM, Budget(compression_ratio=ratio)).hparams
        assert 0.9 * ratio <= method.memory(tables, DIM, hparams).compression_ratio <= ratio
    with pytest.raises(InfeasibleBudget):
        method.solve(tables, DIM, Budget(compression_ratio=1e-4))
