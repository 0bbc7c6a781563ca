"""Shared fixtures: a tiny planted-signal protocol written through the real storage code."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

# FBGEMM checks every index in tests (production relies on check_ids alone; tables.skip_bounds_check)
os.environ.setdefault("RECBENCH_FBGEMM_BOUNDS_CHECK", "fatal")

from toy_protocol import ToyProtocol  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def pytest_report_header(config):
    """The CPU dispatch the suite runs under (``make test-portable`` forces each level)."""
    import torch

    forced = {k: os.environ[k] for k in ("ATEN_CPU_CAPABILITY", "FBGEMM_ENABLE_INSTRUCTIONS") if k in os.environ}
    return f"torch CPU capability: {torch.backends.cpu.get_cpu_capability()} (forced: {forced or 'nothing'})"


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """A test that runs a job in-process sets torch's thread count (``runtime.num_threads``); put it
    back so later tests of tiny tensors do not inherit it (two spinning OpenMP threads on a loaded
    2-core machine made a 0.2 s gate test take 45 s)."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return ToyProtocol().prepare(root)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    return tmp_path_factory.mktemp("toyroot")
