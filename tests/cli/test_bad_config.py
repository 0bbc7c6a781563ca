"""Impossible or unknown settings are a specific ``ConfigError`` (or ``DistributedSetupError``)
before anything is prepared or recorded: no half-recorded run, nothing silently ignored.
(Unknown config *names* are Hydra composition errors: tests/cli/test_configs.py.)"""
from __future__ import annotations

import pytest

from recbench.cli.job import ConfigError, run_job
from recbench.tracking.base import InMemoryTracker
from recbench.training.distributed import DistributedSetupError
from test_job import toy_cfg


@pytest.mark.parametrize("override, error, message", [
    ("budget.compression_ratio=0", ConfigError, r"must be in \(0, 1\], got 0"),
    ("budget.compression_ratio=-0.1", ConfigError, r"must be in \(0, 1\], got -0.1"),
    ("budget.compression_ratio=1.5", ConfigError, r"must be in \(0, 1\], got 1.5"),
    ("budget.compression_ratio=nan", ConfigError, r"must be in \(0, 1\], got nan"),
    ("budget.compression_ratio=inf", ConfigError, r"must be in \(0, 1\], got inf"),
    ("budget.compression_ratio=abc", ConfigError, "budget.compression_ratio must be a number, got 'abc'"),
    ("budget.tolerance=2", ConfigError, r"budget.tolerance must be in \(0, 1\)"),
    ("model.embedding_dim=10", ConfigError, "embedding_dim=10: FBGEMM tables need a positive multiple of 4"),
    ("model.embedding_dim=0", ConfigError, "embedding_dim=0: FBGEMM tables need a positive multiple of 4"),
    ("model.embedding_dim=-4", ConfigError, "embedding_dim=-4: FBGEMM tables need a positive multiple of 4"),
    ("seed=-1", ConfigError, "seed must be a non-negative integer, got -1"),
    ("trainer.eval_batch_size=0", ConfigError, "trainer.eval_batch_size must be >= 1"),
    ("trainer.max_epochs=-1", ConfigError, "max_epochs or trainer.max_steps must be > 0"),
    ("optimizer.dense.learning_rate=-1", ConfigError, "optimizer.dense.learning_rate must be > 0"),
    ("+trainer.nosuch=1", ConfigError, "unknown setting: .*'nosuch'"),
    ("+budget.nosuch=1", ConfigError, "unknown setting: .*'nosuch'"),
    ("+method.nosuch=1", ConfigError, "method 'full' has no hyperparameters; unknown setting\\(s\\): nosuch"),
    ("trainer.sharding_types=[row_wise]", DistributedSetupError, "'row_wise' is not available .*allowed: table_wise"),
    ("trainer.distributed=true", DistributedSetupError, "not part of a process group: run `torchrun"),
])
def test_bad_settings_fail_before_anything_is_recorded(tmp_path, override, error, message):
    tracker = InMemoryTracker()
    with pytest.raises(error, match=message):
        run_job(toy_cfg(tmp_path, override), tracker)
    assert tracker.runs == [] and not (tmp_path / "data").exists()


@pytest.mark.parametrize("override, message", [
    ("method=hashing", "unexpected keyword argument 'nosuch'"),
    ("method=robe", "unexpected keyword argument 'nosuch'"),
])
def test_unknown_hyperparameter_of_a_method_is_named(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run_job(toy_cfg(tmp_path, override, "+method.nosuch=3"), InMemoryTracker())
