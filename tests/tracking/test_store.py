"""The store side of resuming: which runs exist, which steps are logged, and permanent store errors."""
from __future__ import annotations

import sqlite3

import pytest

from recbench.tracking.base import InMemoryTracker
from recbench.tracking.mlflow_tracker import MLflowTracker, StoreError, with_retries


@pytest.mark.parametrize("kind", ["memory", "mlflow"])
def test_a_resumed_run_does_not_log_a_step_twice(tmp_path, kind):
    """A job killed after its checkpoint re-runs the steps between checkpoint and kill; the history
    keeps one value per (metric, step) (was: ``val/auc`` at one step logged twice)."""
    tracker = InMemoryTracker() if kind == "memory" else MLflowTracker(f"sqlite:///{tmp_path}/m.db", str(tmp_path / "a"))
    run_id = tracker.start_run("toy", "r", {}, {})
    for step in (10, 20, 30):
        tracker.log_metrics({"val/auc": step / 100, "train/loss": 1.0}, step=step)
    assert tracker.has_run(run_id) and not tracker.has_run("0123456789abcdef0123456789abcdef")
    assert tracker.logged_steps(run_id) == {"val/auc": 30, "train/loss": 30}
    tracker.start_run("toy", "r", {}, {}, resume_run_id=run_id)
    tracker.skip_steps = tracker.logged_steps(run_id)
    for step in (20, 30, 40):  # resumed at the checkpoint of step 10
        tracker.log_metrics({"val/auc": step / 100 + 0.5, "test/auc": 0.7}, step=step)
    if kind == "memory":
        history = tracker.current.metrics["val/auc"]
        test_history = tracker.current.metrics["test/auc"]
    else:
        history = [(m.step, m.value) for m in tracker.client.get_metric_history(run_id, "val/auc")]
        test_history = [(m.step, m.value) for m in tracker.client.get_metric_history(run_id, "test/auc")]
    assert sorted(history) == [(10, 0.1), (20, 0.2), (30, 0.3), (40, 0.9)]
    assert sorted(test_history) == [(20, 0.7), (30, 0.7), (40, 0.7)]  # a key new to the run is never dropped


@pytest.mark.parametrize("message", ["attempt to write a readonly database", "database or disk is full",
                                     "disk I/O error"])
def test_a_store_that_cannot_be_written_is_one_clear_error_without_retries(message):
    """Permanent SQLite errors are not retried for a minute (was: 54-97 s, then 100+ lines)."""
    calls = []

    def fail():
        calls.append(1)
        raise RuntimeError("(sqlite3.OperationalError)") from sqlite3.OperationalError(message)

    with pytest.raises(StoreError, match=r"the MLflow store cannot be used \(.*\): check that the store file"):
        with_retries(fail)
    assert calls == [1]


def test_a_tracker_opened_while_another_process_holds_the_store_waits_for_it(tmp_path):
    """A new process opening the store while another holds ``BEGIN EXCLUSIVE`` waits and then runs
    (the probe's ``store_locked`` case; opening the store, MLflow's schema check included, is retried
    on SQLite's lock like every other store call)."""
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path}/m.db"
    MLflowTracker(uri, str(tmp_path / "a"))  # the store exists
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sqlite3, sys, time; c = sqlite3.connect(sys.argv[1], isolation_level=None); "
        "c.execute('BEGIN EXCLUSIVE'); print('locked', flush=True); time.sleep(8); c.execute('COMMIT')"),
        str(tmp_path / "m.db")], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    start = time.perf_counter()
    opener = subprocess.run([sys.executable, "-c", (  # a new process: MLflow checks the schema on its first open
        "import sys; from recbench.tracking.mlflow_tracker import MLflowTracker; "
        "t = MLflowTracker(sys.argv[1], sys.argv[2]); print(t.start_run('toy', 'r', {}, {}))"),
        uri, str(tmp_path / "a")], capture_output=True, text=True, timeout=120)
    holder.wait(timeout=30)
    assert opener.returncode == 0, opener.stderr[-2000:]
    assert MLflowTracker(uri, str(tmp_path / "a")).has_run(opener.stdout.strip().splitlines()[-1])
    assert time.perf_counter() - start > 2
