"""The MLflow tracker's dataset inputs and system metrics on a real SQLite store, without a job."""
from __future__ import annotations

import logging
import time

import pytest
from mlflow import MlflowClient

from recbench.tracking import system_metrics
from recbench.tracking.inputs import MAX_DIGEST, DatasetRecord, digest_of
from recbench.tracking.mlflow_tracker import MLflowTracker


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module's tests (a new SQLite store costs seconds of schema migrations)."""
    folder = tmp_path_factory.mktemp("store")
    return f"sqlite:///{folder}/mlflow.db", str(folder / "art")


def _tracker(store, **kwargs):
    tracker = MLflowTracker(*store, **kwargs)
    tracker.start_run("exp", "a run", {}, {})
    return tracker


def test_system_metrics_are_sampled_until_the_run_ends(store):
    tracker = _tracker(store, system_metrics_interval_s=0.1)
    assert tracker.start_system_metrics()
    client = MlflowClient(tracker.tracking_uri)
    deadline = time.monotonic() + 20  # the monitor thread's pace depends on the machine's load
    while time.monotonic() < deadline and len(client.get_metric_history(tracker.run_id, "system/cpu_utilization_percentage")) < 2:
        time.sleep(0.1)
    tracker.end_run()
    history = client.get_metric_history(tracker.run_id, "system/cpu_utilization_percentage")
    assert len(history) >= 2 and all(0 <= m.value <= 100 for m in history)
    assert tracker._monitor is None  # stopped with the run: nothing is written after it ended
    assert client.get_run(tracker.run_id).info.status == "FINISHED"


def test_without_psutil_a_run_has_no_system_metrics_and_the_job_says_so_once(store, monkeypatch, caplog):
    monkeypatch.setattr(system_metrics, "available", lambda: False)
    monkeypatch.setattr(system_metrics, "_said_unavailable", False)
    tracker = _tracker(store)
    with caplog.at_level(logging.INFO, logger=system_metrics.__name__):
        assert not tracker.start_system_metrics()
        tracker.end_run()
        tracker.start_run("exp", "another run", {}, {})
        assert not tracker.start_system_metrics()
    said = [r.getMessage() for r in caplog.records if "psutil" in r.getMessage()]
    assert said == ["no system metrics: psutil is not installed (pip install 'recbench[system-metrics]'), "
                    "or set tracking.system_metrics=false"]


def test_switched_off_no_monitor_starts(store):
    tracker = _tracker(store, system_metrics=False)
    assert not tracker.start_system_metrics() and tracker._monitor is None
    tracker.end_run()


def test_a_dataset_input_is_kept_once_per_run(store):
    tracker = _tracker(store)
    record = DatasetRecord("toy", "toy-0123456789", "local", '{"uri": "file:///data/toy"}',
                           '{"mlflow_colspec": [{"type": "long", "name": "f0", "required": true}]}', '{"rows": {}}')
    tracker.log_dataset(record)
    tracker.log_dataset(record)  # a resumed run logs it again: MLflow keeps one
    (used,) = MlflowClient(tracker.tracking_uri).get_run(tracker.run_id).inputs.dataset_inputs
    assert (used.dataset.name, used.dataset.digest, used.dataset.profile) == ("toy", "toy-0123456789", '{"rows": {}}')


def test_a_protocol_id_too_long_for_mlflow_keeps_its_hash_as_digest():
    assert digest_of("movielens100k_temporal-0123456789") == "movielens100k_temporal-0123456789"
    long_name = "a_dataset_protocol_with_a_long_name-0123456789"
    assert len(long_name) > MAX_DIGEST and digest_of(long_name) == "0123456789"
