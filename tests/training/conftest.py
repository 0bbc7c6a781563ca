"""Fixtures of the training tests: a one-rank gloo process group for in-process distributed checks."""
from __future__ import annotations

import pytest

from multistage_ranks import free_port
from recbench.training import distributed


@pytest.fixture
def one_rank_group(monkeypatch):
    """``ProcessGroupParallel`` of rank 0 in a world of 1 (DMP, DDP and the collectives run for real)."""
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with distributed.session(True) as parallel:
        yield parallel
