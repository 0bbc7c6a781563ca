"""Impossible settings are refused in one line before a run exists (issue "Reliability", probe cases
``method_unknown``, ``key_not_in_struct``, ``synthetic_rows_10``, ``synthetic_rows_text``,
``store_read_only``, ``leftover_*``)."""
from __future__ import annotations

import os

import pytest

from recbench.runs.config import override_problem
from recbench.runs.job import run_job
from recbench.runs.config import ConfigError
from recbench.runs.settings import instantiate_dataset
from recbench.tracking.base import InMemoryTracker
from recbench.tracking.mlflow_tracker import StoreError, init_store
from toy_protocol import ToyProtocol, toy_cfg


@pytest.mark.parametrize("overrides, expected", [
    (["method=nosuch"], "method=nosuch: there is no recbench/conf/method/nosuch.yaml; allowed: adaembed"),
    (["dataset=movielens100k,nosuch"], "dataset=nosuch: there is no recbench/conf/dataset/nosuch.yaml; allowed:"),
    (["nosuchkey=1"], "nosuchkey: no setting of this name"),
    (["seed=1", "method=qr,hashing", "+gate=comet", "trainer.max_steps=3", "hydra/launcher=joblib",
      "method=glob(*,exclude=full)", "budget.compression_ratio=0.1,0.2"], None),
])
def test_unknown_config_options_and_keys_are_one_line_naming_what_is_allowed(overrides, expected):
    problem = override_problem(overrides)
    if expected is None:
        assert problem is None
    else:
        assert expected in problem and "\n" not in problem


def test_a_non_numeric_dataset_setting_names_the_key_and_the_type_allowed(tmp_path):
    cfg = toy_cfg(tmp_path)
    cfg.dataset.rows = "abc"
    with pytest.raises(ConfigError, match=r"dataset.rows='abc' is not a number; allowed: an integer"):
        instantiate_dataset(cfg)


def test_a_split_with_one_class_is_refused_before_a_run_exists(tmp_path):
    cfg = toy_cfg(tmp_path)
    cfg.dataset.rows = 12  # val and test get one row each: one class, AUC undefined
    tracker = InMemoryTracker()
    with pytest.raises(ConfigError, match=r"its val split has 1 row\(s\), all labelled .* AUC is undefined"):
        run_job(cfg, tracker)
    assert not tracker.runs


def test_a_store_that_cannot_be_created_is_one_store_error_naming_it():
    with pytest.raises(StoreError, match=r"the MLflow store /proc/recbench-no-store/mlflow.db cannot be used"):
        init_store("sqlite:////proc/recbench-no-store/mlflow.db")


def test_leftovers_of_dead_processes_are_removed_when_the_cache_is_found(tmp_path):
    protocol = ToyProtocol(rows=400)
    protocol.prepare(tmp_path)
    directory = protocol.cache_dir(tmp_path)
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale_build = directory.with_name(f".{directory.name}.tmp-{dead}")
    stale_build.mkdir()
    raw = directory.parent.parent / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    stale_raw, live_raw = raw / f"source.txt.tmp-{dead}", raw / f"source.txt.tmp-{os.getpid()}"
    stale_raw.write_text("half"), live_raw.write_text("being written")
    protocol.prepare(tmp_path)  # a cache hit
    assert not stale_build.exists() and not stale_raw.exists()
    assert live_raw.exists()  # a live process's file is left alone
