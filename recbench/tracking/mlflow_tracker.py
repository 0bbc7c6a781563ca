"""MLflow tracker: one run per job, SQLite store by default, explicit artifact location.

Uses ``MlflowClient`` (no global active-run state), so several trackers can live in one process
and parallel jobs never share a run. Experiment creation tolerates a concurrent creator.

References: MLflow tracking API (``mlflow.tracking.MlflowClient``), DESIGN.md section 5.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Mapping, Optional

from recbench.tracking.base import FINISHED, Tracker

MAX_PARAM_LENGTH = 6000
_BATCH = 100


def resolve_tracking_uri(uri: str, base_dir: Path) -> str:
    """Make a relative ``sqlite:///file.db`` absolute against ``base_dir``; create its folder."""
    prefix = "sqlite:///"
    if uri.startswith(prefix):
        path = Path(uri[len(prefix):])
        if not path.is_absolute():
            path = Path(base_dir) / path
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    return uri


class MLflowTracker(Tracker):
    """Args: tracking_uri (any MLflow URI; default SQLite), artifact_root (folder or URI)."""

    def __init__(self, tracking_uri: str, artifact_root: str):
        from mlflow.tracking import MlflowClient

        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self.run_id: Optional[str] = None

    def _artifact_location(self, experiment: str) -> str:
        root = self.artifact_root
        if "://" in root:
            return f"{root.rstrip('/')}/{experiment}"
        path = Path(root).absolute() / experiment
        path.mkdir(parents=True, exist_ok=True)
        return path.as_uri()

    def experiment_id(self, name: str, create: bool = True) -> Optional[str]:
        from mlflow.exceptions import MlflowException

        for attempt in range(10):
            found = self.client.get_experiment_by_name(name)
            if found is not None:
                return found.experiment_id
            if not create:
                return None
            try:
                return self.client.create_experiment(name, artifact_location=self._artifact_location(name))
            except MlflowException:
                time.sleep(0.2 * (attempt + 1))  # another job created it (or the db is busy): look again
        raise RuntimeError(f"could not create or find MLflow experiment {name!r} at {self.tracking_uri}")

    def start_run(self, experiment, run_name, tags, params, resume_run_id=None):
        from mlflow.entities import Param, RunStatus

        if resume_run_id:
            self.run_id = resume_run_id
            self.client.update_run(resume_run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return resume_run_id
        experiment_id = self.experiment_id(experiment)
        all_tags = {"mlflow.runName": run_name, **{k: str(v) for k, v in tags.items()}}
        run = self.client.create_run(experiment_id, tags=all_tags, run_name=run_name)
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(params.items())]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, params=items[i:i + _BATCH])
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in metrics.items()]
        for i in range(0, len(items), _BATCH):
            self.client.log_batch(self.run_id, metrics=items[i:i + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def end_run(self, status: str = FINISHED) -> None:
        self.client.set_terminated(self.run_id, status=status)

    def find_finished(self, experiment: str, config_hash: str) -> Optional[str]:
        experiment_id = self.experiment_id(experiment, create=False)
        if experiment_id is None:
            return None
        runs = self.client.search_runs(
            [experiment_id],
            filter_string=f"tags.config_hash = '{config_hash}' and attributes.status = 'FINISHED'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None
