"""Hydra sweeper ``hydra/sweeper=recbench_planned``: Hydra's basic sweeper without its second
composition of every job.

Hydra's ``BasicSweeper`` composes every job of a batch once to validate it
(``validate_batch_is_legal``), and its launcher composes each job again to run it. When
``recbench-sweep`` launches a grid, its planner has already composed and checked every job of that
grid (``recbench.runs.sweep_plan.check_plan``), so this sweeper skips the validation pass; the
jobs, their order and their configs are the basic sweeper's. ``recbench-sweep --no-check`` (no
planner pass) keeps the basic sweeper, which validates.

References: Hydra ``hydra._internal.core_plugins.basic_sweeper``; Hydra's plugin discovery (the
``hydra_plugins`` namespace package); recbench.runs.sweep_launch (``hydra_command``).
"""
from dataclasses import dataclass
from typing import Dict, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_store import ConfigStore


@dataclass
class PlannedSweeperConf:
    _target_: str = "hydra_plugins.recbench_planned_sweeper.recbench_planned_sweeper.PlannedSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(group="hydra/sweeper", name="recbench_planned", node=PlannedSweeperConf,
                             provider="recbench")


class PlannedSweeper(BasicSweeper):
    """``BasicSweeper`` whose batches were validated by recbench's planner before the launch."""

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        return None
