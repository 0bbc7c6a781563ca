"""Impossible or unknown settings are a specific ``ConfigError`` (or ``DistributedSetupError``)
before anything is prepared or recorded: no half-recorded run, nothing silently ignored.
(Unknown config *names* are Hydra composition errors: tests/cli/test_configs.py.)"""
from __future__ import annotations

import pytest

from recbench.runs.job import run_job
from recbench.runs.config import ConfigError
from recbench.tracking.base import InMemoryTracker
from recbench.training.distributed import DistributedSetupError
from toy_protocol import toy_cfg


@pytest.mark.parametrize("override, error, message", [
    ("budget.compression_ratio=0", ConfigError, r"must be in \(0, 1\], got 0"),
    ("budget.compression_ratio=-0.1", ConfigError, r"must be in \(0, 1\], got -0.1"),
    ("budget.compression_ratio=1.5", ConfigError, r"must be in \(0, 1\], got 1.5"),
    ("budget.compression_ratio=nan", ConfigError, r"must be in \(0, 1\], got nan"),
    ("budget.compression_ratio=inf", ConfigError, r"must be in \(0, 1\], got inf"),
    ("budget.compression_ratio=abc", ConfigError, "budget.compression_ratio must be a number, got 'abc'"),
    ("budget.tolerance=2", ConfigError, r"budget.tolerance must be in \(0, 1\)"),
    ("model.embedding_dim=10", ConfigError, r"model.embedding_dim must be a multiple of 4 \(FBGEMM tables\), got 10"),
    ("model.embedding_dim=0", ConfigError, "model.embedding_dim must be an integer >= 4, got 0"),
    ("model.embedding_dim=-4", ConfigError, "model.embedding_dim must be an integer >= 4, got -4"),
    ("seed=-1", ConfigError, "seed must be an integer >= 0, got -1"),
    ("seed=abc", ConfigError, "seed must be an integer >= 0, got 'abc'"),
    ("trainer.eval_batch_size=0", ConfigError, "trainer.eval_batch_size must be an integer >= 1, got 0"),
    ("trainer.batch_size=big", ConfigError, "trainer.batch_size must be an integer >= 1, got 'big'"),
    ("trainer.max_epochs=-1", ConfigError, "trainer.max_epochs must be a number >= 0, got -1"),
    ("trainer.max_epochs=0", ConfigError, "trainer.max_epochs must be > 0 when trainer.max_steps is null, got 0"),
    ("trainer.max_steps=-1", ConfigError, "trainer.max_steps must be an integer >= 1, got -1"),
    ("trainer.max_steps=-5", ConfigError, "trainer.max_steps must be an integer >= 1, got -5"),
    ("trainer.log_every_steps=0", ConfigError, "trainer.log_every_steps must be an integer >= 1, got 0"),
    ("trainer.latency_batch_size=0", ConfigError, "trainer.latency_batch_size must be an integer >= 1, got 0"),
    ("trainer.min_delta=nan", ConfigError, "trainer.min_delta must be a finite number >= 0, got nan"),
    ("runtime.num_threads=-1", ConfigError, "runtime.num_threads must be an integer >= 1, got -1"),
    ("optimizer.dense.learning_rate=-1", ConfigError, "optimizer.dense.learning_rate must be a number > 0, got -1"),
    ("optimizer.embedding.learning_rate=inf", ConfigError,
     "optimizer.embedding.learning_rate must be a finite number > 0, got inf"),
    ("+gate=comet", ConfigError, r"gate=comet needs a mixture-of-experts model \(model=dcn_moe or model=dlrm_moe\); "
     "model=dcn has no gate"),
    ("model=dcn_moe gate=topk gate.k=0", ConfigError, r"gate.k must be an integer in \[1, 16\], got 0"),
    ("model=dcn_moe gate=topk gate.k=100", ConfigError, r"gate.k must be an integer in \[1, 16\], got 100"),
    ("model=dcn_moe gate=comet gate.local_search=true", ConfigError,
     r"gate\.local_search is a mapping of settings, got True; turn the search on with gate\.local_search\.enabled=true"),
    ("model=dcn_moe gate=comet +gate.local_search.step=3", ConfigError, r"gate\.local_search has no setting \['step'\]"),
    ("model=dcn_moe model.num_experts=0", ConfigError, "model.num_experts must be an integer >= 1, got 0"),
    ("+trainer.nosuch=1", ConfigError, "unknown setting: .*'nosuch'"),
    ("+budget.nosuch=1", ConfigError, "unknown setting: .*'nosuch'"),
    ("+method.nosuch=1", ConfigError, "method 'full' has no setting 'nosuch'; allowed: quantize"),
    ("runtime.sharding_types=[row_wise]", DistributedSetupError, "'row_wise' is not available .*allowed: table_wise"),
    ("runtime.distributed=true", DistributedSetupError, "not part of a process group: run `torchrun"),
])
def test_bad_settings_fail_before_anything_is_recorded(tmp_path, override, error, message):
    tracker = InMemoryTracker()
    with pytest.raises(error, match=message):
        run_job(toy_cfg(tmp_path, *override.split()), tracker)
    assert tracker.runs == [] and not (tmp_path / "data").exists()


@pytest.mark.parametrize("override, message", [
    ("model=dcn_moe model.tasks=[click,nosuch]", r"model.tasks names \['nosuch'\], which toy does not have; allowed: "),
    ("model.embedding_dim=1048576", r"model.embedding_dim=1048576: toy's uncompressed tables plus one evaluation batch "
     r"\(trainer.eval_batch_size=16384\) need at least [\d,.]+ GiB, more than this machine's"),
])
def test_settings_checked_against_the_data_fail_before_a_run_exists(tmp_path, override, message):
    """Checked once the dataset is prepared (its targets, its table sizes), before any run is recorded."""
    tracker = InMemoryTracker()
    with pytest.raises(ConfigError, match=message):
        run_job(toy_cfg(tmp_path, *override.split()), tracker)
    assert tracker.runs == [] and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, message", [
    ("method=hashing", "has no setting 'nosuch'; allowed: quantize, rows, layout, allocation"),
    ("method=robe", "has no setting 'nosuch'; allowed: "),
])
def test_unknown_hyperparameter_of_a_method_is_named(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run_job(toy_cfg(tmp_path, override, "+method.nosuch=3"), InMemoryTracker())


def test_latency_repeats_must_time_something():
    """toy_cfg sets latency_repeats itself, so this one is checked on the config class."""
    from recbench.training.trainer import TrainerConfig

    with pytest.raises(ValueError, match="trainer.latency_repeats must be an integer >= 1, got 0"):
        TrainerConfig(latency_repeats=0)


def test_a_dataset_constructor_error_is_one_line_naming_the_dataset(tmp_path):
    """Hydra wraps a constructor's error in its own 6-line message; the job unwraps it."""
    from recbench.runs.config import compose
    from omegaconf import OmegaConf


    cfg = compose(["tracking=memory", "dataset=synthetic", "dataset.rows=5",
                   f"paths.data_root={tmp_path / 'data'}", f"paths.run_root={tmp_path / 'runs'}"])
    tracker = InMemoryTracker()
    with pytest.raises(ConfigError) as caught:
        run_job(OmegaConf.create(OmegaConf.to_container(cfg)), tracker)
    assert str(caught.value) == "dataset 'synthetic': rows must be >= 10, got 5"
    assert tracker.runs == [] and not (tmp_path / "data").exists()
