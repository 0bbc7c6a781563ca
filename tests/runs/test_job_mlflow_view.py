"""What a user sees of a job in MLflow (real SQLite store): the dataset the run read (a dataset
input), this machine's load while it ran (system metrics), its learning curves and memory breakdown
(``plots/*.png``), and infeasible and failed runs told apart from successful ones."""
from __future__ import annotations

import json

import pytest
from matplotlib.image import imread
from mlflow import MlflowClient

from recbench.runs.config import ConfigError
from recbench.runs.job import run_job
from recbench.runs.run_plots import CURVES_PNG, MEMORY_PNG, PLOTS_DIR
from recbench.tracking.base import InMemoryTracker
from toy_protocol import toy_cfg


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One MLflow store for the module's jobs (a new SQLite store costs seconds of schema migrations)."""
    folder = tmp_path_factory.mktemp("store")
    return f"sqlite:///{folder}/mlflow.db", str(folder / "art")


def _cfg(tmp_path, store, *overrides):
    cfg = toy_cfg(tmp_path, *overrides, tracking="mlflow")
    cfg.tracking.tracking_uri, cfg.tracking.artifact_root = store
    return cfg


def _png_shape(path):
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    return imread(path).shape


def test_a_run_shows_its_dataset_its_system_metrics_and_its_figures(tmp_path, store):
    # the interval reaches the tracker: at the default 10 s this job would get no sample
    cfg = _cfg(tmp_path, store, "tracking.system_metrics_interval_s=0.2")
    cfg.trainer.max_steps = 12
    result = run_job(cfg)
    assert result.status == "finished"
    client = MlflowClient(cfg.tracking.tracking_uri)
    run = client.get_run(result.run_id)
    protocol_id = run.data.tags["dataset_protocol_id"]

    (used,) = run.inputs.dataset_inputs
    assert (used.dataset.name, used.dataset.digest) == ("toy", protocol_id)
    assert {t.key: t.value for t in used.tags} == {"mlflow.data.context": "train"}
    assert used.dataset.source_type == "local" and protocol_id in json.loads(used.dataset.source)["uri"]
    profile = json.loads(used.dataset.profile)
    assert profile["rows"] == {"train": 1600, "val": 200, "test": 200} and profile["sparse_fields"] == 4
    columns = json.loads(used.dataset.schema)["mlflow_colspec"]
    assert [c["name"] for c in columns] == ["dense_0", "dense_1", "dense_2", "f0", "f1", "f2", "bag", "label"]
    found = client.search_runs([run.info.experiment_id], f"dataset.name = 'toy' and dataset.digest = '{protocol_id}'")
    assert result.run_id in [r.info.run_id for r in found]
    assert not client.search_runs([run.info.experiment_id], "dataset.digest = 'toy-0000000000'")

    # MLflow's monitor, sampled every 0.2 s while the run was open
    assert "system/cpu_utilization_percentage" in run.data.metrics
    assert "system/system_memory_usage_megabytes" in run.data.metrics

    assert {a.path for a in client.list_artifacts(result.run_id, PLOTS_DIR)} == {f"{PLOTS_DIR}/{CURVES_PNG}",
                                                                                 f"{PLOTS_DIR}/{MEMORY_PNG}"}
    for name in (CURVES_PNG, MEMORY_PNG):
        path = client.download_artifacts(result.run_id, f"{PLOTS_DIR}/{name}", str(tmp_path))
        assert _png_shape(path)[:2] == (360, 1000)
    # its description (the top of its page) gives the headline numbers and points to the figures
    assert run.info.run_name == "full@1/dcn/toy/s0"
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith(f"Test AUC {run.data.metrics['test/auc']:.4f}, log loss ") and "(budget 1)" in note
    assert f"{PLOTS_DIR}/{CURVES_PNG}" in note


@pytest.mark.parametrize("override, message", [
    ("tracking.system_metrics=sometimes", "tracking.system_metrics='sometimes'; allowed: true, false"),
    ("tracking.system_metrics_interval_s=0", "tracking.system_metrics_interval_s=0; allowed: a number of seconds > 0"),
])
def test_system_metrics_settings_are_checked(tmp_path, override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        run_job(toy_cfg(tmp_path, override, tracking="mlflow"))
    assert not (tmp_path / "mlflow.db").exists()  # refused before anything was recorded


def test_an_infeasible_run_is_finished_but_named_and_described_as_infeasible(tmp_path, store):
    """FINISHED (a completed measurement: a re-launch skips it, the leaderboard reads its status tag),
    and in the UI its name starts with INFEASIBLE and its description gives the reason."""
    cfg = _cfg(tmp_path, store, "budget.compression_ratio=0.1")
    result = run_job(cfg)
    assert result.status == "infeasible"
    run = MlflowClient(cfg.tracking.tracking_uri).get_run(result.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "infeasible"
    assert run.info.run_name == "INFEASIBLE full@0.1/dcn/toy/s0" == run.data.tags["mlflow.runName"]
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("Infeasible budget") and run.data.tags["status_reason"] in note
    assert "reachable range" in note
    again = run_job(cfg)  # skip_finished: the verdict is not measured twice
    assert again.status == "skipped" and again.run_id == result.run_id


def test_a_failed_run_is_described_by_its_reason(tmp_path, store, monkeypatch):
    def broken_fit(self):
        raise RuntimeError("the trainer broke")

    monkeypatch.setattr("recbench.runs.job.Trainer.fit", broken_fit)
    cfg = _cfg(tmp_path, store, "seed=7")
    with pytest.raises(RuntimeError, match="the trainer broke"):
        run_job(cfg)
    client = MlflowClient(cfg.tracking.tracking_uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()], "tags.seed = '7'")
    assert run.info.status == "FAILED" and run.info.run_name == "full@1/dcn/toy/s7"
    assert run.data.tags["mlflow.note.content"] == "Failed: RuntimeError: the trainer broke"


def test_the_in_memory_tracker_records_the_dataset_and_the_figures(tmp_path):
    tracker = InMemoryTracker()
    cfg = toy_cfg(tmp_path)
    cfg.trainer.max_steps = 5
    run_job(cfg, tracker)
    (record,) = tracker.current.inputs
    assert record.name == "toy" and record.digest == tracker.current.tags["dataset_protocol_id"]
    assert {f"{PLOTS_DIR}/{CURVES_PNG}", f"{PLOTS_DIR}/{MEMORY_PNG}"} <= set(tracker.current.artifacts)
