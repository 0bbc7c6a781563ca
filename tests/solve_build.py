"""Solve the budget once and build from the plan, as a job does (``CompressionMethod.solve`` -> ``build``)."""
from __future__ import annotations

from typing import Sequence

from recbench.types import Budget, EmbeddingOptimizer, TableSpec


def solve_and_build(method, tables: Sequence[TableSpec], dim: int, budget: Budget,
                    optimizer: EmbeddingOptimizer = EmbeddingOptimizer()):
    """The embedding module ``method`` builds from its plan for ``budget`` (one ``solve`` call)."""
    return method.build(tables, dim, method.solve(tables, dim, budget, optimizer), optimizer)
