"""Shared fixtures: a tiny planted-signal protocol written through the real storage code."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RECBENCH_NUM_THREADS", "2")

from toy_protocol import ToyProtocol  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def toy_dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    return ToyProtocol().prepare(root)


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory):
    return tmp_path_factory.mktemp("toyroot")
