"""The budget solver's shared pieces (pure functions).

Each method's ``solve_hparams(tables, dim, budget)`` turns its ``auto`` hyperparameters into the best
values whose closed-form inference bytes are at most ``budget.compression_ratio * full_bytes``
(the target). A method whose knob is an integer (rows, rank, width) uses
``largest_integer_within``; a continuous knob (a temperature) uses ``bisect_continuous``; ``land``
checks the result and raises ``InfeasibleBudget`` with the reachable range only when it exceeds
the target, i.e. when nothing the method can build fits. A solution below
``(1 - budget.tolerance) * target`` is accepted: the job runs it at the ratio it reaches and tags
the run ``under_budget=true`` (``recbench.types.under_budget``), as the reference artifacts run at the ratio they
reach. Fields with fewer rows than ``budget.min_rows_to_compress`` are left uncompressed and
charged in full (``split_tables``).

References: docs/architecture.md section 3 ("Budget and memory").
"""
from __future__ import annotations

from typing import Any, Callable, List, Sequence, Tuple

from recbench.types import FP32_BYTES, Budget, InfeasibleBudget, TableSpec, full_embedding_bytes


def split_tables(tables: Sequence[TableSpec], budget: Budget) -> Tuple[List[TableSpec], List[TableSpec]]:
    """(compressed, kept): kept tables have fewer rows than ``budget.min_rows_to_compress``."""
    compressed = [t for t in tables if t.num_embeddings >= budget.min_rows_to_compress]
    kept = [t for t in tables if t.num_embeddings < budget.min_rows_to_compress]
    return compressed, kept


def kept_bytes(kept: Sequence[TableSpec], dim: int) -> int:
    """fp32 bytes of the uncompressed tables."""
    return int(sum(t.num_embeddings for t in kept) * dim * FP32_BYTES)


def target_bytes(tables: Sequence[TableSpec], dim: int, budget: Budget) -> int:
    return int(budget.compression_ratio * full_embedding_bytes(tables, dim))


def largest_integer_within(bytes_of: Callable[[int], int], low: int, high: int, limit: int) -> int:
    """Largest x in [low, high] with bytes_of(x) <= limit, for bytes_of non-decreasing in x.

    Returns ``low - 1`` when even ``low`` exceeds the limit.
    """
    if bytes_of(low) > limit:
        return low - 1
    lo, hi = low, high
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if bytes_of(mid) <= limit:
            lo = mid
        else:
            hi = mid - 1
    return lo


def bisect_continuous(bytes_of: Callable[[float], int], low: float, high: float, limit: int,
                      iterations: int = 60, increasing: bool = True) -> float:
    """The knob value in [low, high] whose bytes are the largest not above ``limit``.

    ``bytes_of`` must be monotone (non-decreasing if ``increasing`` else non-increasing).
    """
    ok, bad = (low, high) if increasing else (high, low)
    if bytes_of(ok) > limit:
        return ok
    if bytes_of(bad) <= limit:
        return bad
    for _ in range(iterations):
        mid = (ok + bad) / 2.0
        if bytes_of(mid) <= limit:
            ok = mid
        else:
            bad = mid
    return ok


def land(method: str, achieved_bytes: int, tables: Sequence[TableSpec], dim: int, budget: Budget,
         min_bytes: int, max_bytes: int, reason: str = "") -> None:
    """Raise InfeasibleBudget when ``achieved_bytes`` (the method's best solution) exceeds the target.

    A solution at or under the target is accepted however far under it lands (the job flags it,
    see ``under_budget``). ``min_bytes``/``max_bytes`` are the smallest and largest inference bytes
    the method can reach on these tables (reported as ratios in the error).
    """
    full = full_embedding_bytes(tables, dim)
    if achieved_bytes <= budget.compression_ratio * full:
        return
    raise InfeasibleBudget(method, budget.compression_ratio, min_bytes / full, max_bytes / full,
                           reason or f"the smallest solution has ratio {achieved_bytes / full:.4g}")


def check_auto(method: str, key: str, value: Any) -> None:
    if value != "auto":
        raise ValueError(f"method {method!r}: {key}={value!r} is not supported; only 'auto' (solved from the budget)")
