"""MLflow tracker: one run per job, SQLite store by default, explicit artifact location.

Uses ``MlflowClient`` (no global active-run state), so several trackers can live in one process
and parallel jobs never share a run. Experiment creation tolerates a concurrent creator.

Parallel jobs on one SQLite file (Hydra's joblib launcher): the first connection to a fresh file
creates MLflow's schema, which MLflow does not serialise across processes, so it runs under an
exclusive file lock (``<db>.lock``); every client call retries with exponential backoff when SQLite
reports "database is locked" (a write lost to a concurrent writer is rolled back, never half-done).

References: MLflow tracking API (``mlflow.tracking.MlflowClient``), docs/architecture.md section 5.
"""
from __future__ import annotations

import contextlib
import logging
import os
import random
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, TypeVar

from recbench.tracking import system_metrics as system_metrics_monitor
from recbench.tracking.base import FINISHED, KILLED, NOTE_TAG, Tracker, orphan_reason
from recbench.tracking.inputs import DatasetRecord

MAX_PARAM_LENGTH = 6000
_BATCH = 100
#: retries of a client call that met a busy SQLite database (backoff 0.05 s doubling, capped at 5 s)
RETRIES = 12
_TRANSIENT = ("database is locked", "database table is locked", "database schema has changed")
#: SQLite errors no retry cures: the store cannot be written (permissions, a full disk, a broken file)
_PERMANENT = ("readonly database", "database or disk is full", "disk i/o error", "unable to open database file",
              "file is not a database", "database disk image is malformed")
T = TypeVar("T")
log = logging.getLogger(__name__)


class StoreError(RuntimeError):
    """The tracking store cannot be written or read (reported in one line, never retried)."""


def _marker(exc: BaseException, markers) -> Optional[str]:
    """The first of ``markers`` found in the message chain of ``exc``."""
    seen = 0
    while exc is not None and seen < 5:
        text = str(exc).lower()
        found = next((m for m in markers if m in text), None)
        if found:
            return found
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def is_transient(exc: BaseException) -> bool:
    """A concurrent-writer error of SQLite (worth retrying), judged by the message chain."""
    return _marker(exc, _TRANSIENT) is not None


def with_retries(call: Callable[..., T], *args: Any, retries: int = RETRIES, **kwargs: Any) -> T:
    """``call(*args, **kwargs)``, retried with jittered exponential backoff on transient SQLite errors."""
    delay = 0.05
    for attempt in range(retries + 1):
        try:
            return call(*args, **kwargs)
        except Exception as exc:  # MlflowException wraps SQLAlchemy's OperationalError
            permanent = _marker(exc, _PERMANENT)
            if permanent:
                raise StoreError(f"the MLflow store cannot be used ({permanent}): check that the store file "
                                 "(MLFLOW_TRACKING_URI) and its folder are writable and the disk has space") from exc
            if attempt == retries or not is_transient(exc):
                raise
            log.debug("MLflow store busy (%s); retry %d in %.2fs", exc, attempt + 1, delay)
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, 5.0)
    raise AssertionError("unreachable")


def default_tracking_uri() -> str:
    """The store every command uses unless told otherwise: ``MLFLOW_TRACKING_URI``, else
    ``sqlite:///mlflow.db`` in the working directory (as ``recbench/conf/tracking/mlflow.yaml``)."""
    return os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db")


def sqlite_path(uri: str) -> Optional[Path]:
    prefix = "sqlite:///"
    return Path(uri[len(prefix):].split("?", 1)[0]) if uri.startswith(prefix) else None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Exclusive inter-process lock next to a SQLite store (no-op for other stores or on Windows)."""
    path = sqlite_path(uri)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        fcntl = None
    if path is None or fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{path}.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


#: seconds a tracking server has to answer the up-front check
SERVER_TIMEOUT = 5.0


def check_tracking_uri(uri: str) -> None:
    """Refuse, in one line and within ``SERVER_TIMEOUT`` seconds, a tracking URI that cannot work:
    a ``sqlite:`` URI MLflow cannot parse, a SQLite store whose folder does not exist (a mistyped
    path would otherwise become a new, empty store), or a tracking server that does not answer
    (MLflow itself retries for minutes). Raises StoreError."""
    if uri.startswith("sqlite:") and not uri.startswith("sqlite:///"):
        raise StoreError(f"MLFLOW_TRACKING_URI={uri} is not a SQLite URI MLflow reads; allowed: "
                         "sqlite:///relative/path.db or sqlite:////absolute/path.db")
    path = sqlite_path(uri)
    if path is not None and not path.absolute().parent.is_dir():
        raise StoreError(f"the folder {path.absolute().parent} of the MLflow store {path} does not exist: create it, "
                         "or correct MLFLOW_TRACKING_URI (a new store is made only in an existing folder)")
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=SERVER_TIMEOUT).close()
        except urllib.error.HTTPError as exc:
            if exc.code == 404:  # it answered, but has no /health: not an MLflow tracking server
                raise StoreError(f"{uri} answered but is not an MLflow tracking server (HTTP 404 on /health): "
                                 "correct MLFLOW_TRACKING_URI") from None
            # any other answer (an authentication wall, say) means a server is there
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", None) or exc
            raise StoreError(f"the MLflow tracking server {uri} does not answer ({reason}; waited at most "
                             f"{SERVER_TIMEOUT:g} s): start it (`make dashboard` serves mlflow.db on "
                             "http://127.0.0.1:5000), or set MLFLOW_TRACKING_URI to a reachable server or "
                             "sqlite:///mlflow.db") from None


def init_store(uri: str):
    """An ``MlflowClient`` whose store (schema included) exists; safe to call from parallel processes."""
    from mlflow.tracking import MlflowClient

    try:
        with store_lock(uri):  # MlflowClient may build the store (and its schema) on construction
            client = with_retries(MlflowClient, tracking_uri=uri)  # its store checks the schema: may meet a lock
            with_retries(client.search_experiments, max_results=1)  # creates/migrates the schema once
    except OSError as exc:  # the store's folder is read-only, missing or full: before MLflow is reached
        raise StoreError(f"the MLflow store {sqlite_path(uri) or uri} cannot be used ({exc.strerror or exc}): check "
                         "that the store file (MLFLOW_TRACKING_URI) and its folder are writable and the disk has "
                         "space") from exc
    return client


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


def experiment_tags(name: str) -> Dict[str, str]:
    """Tags of a new experiment (one per dataset protocol): its description in the UI, and the
    experiment kind that opens it in MLflow 3's classic model-training view (not the GenAI view)."""
    return {"mlflow.experimentKind": "custom_model_development",
            NOTE_TAG: (f"recbench runs on the dataset protocol {name} (dataset, split, label rule and "
                                    "frozen training protocol; one run per dataset, model, method, budget and seed). "
                                    "Compare runs by the tags method, compression_ratio and seed; the leaderboards "
                                    "come from `recbench-report`.")}


class MLflowTracker(Tracker):
    """Args: tracking_uri (any MLflow URI; default SQLite), artifact_root (folder or URI),
    system_metrics (sample this machine's CPU, memory, disk and network use into each run when
    ``psutil`` is installed) and system_metrics_interval_s (seconds between samples); see
    ``recbench.tracking.system_metrics``."""

    def __init__(self, tracking_uri: str, artifact_root: str, system_metrics: bool = True,
                 system_metrics_interval_s: float = system_metrics_monitor.DEFAULT_INTERVAL_S):
        system_metrics_monitor.check_settings(system_metrics, system_metrics_interval_s)
        self.tracking_uri = tracking_uri
        self.artifact_root = artifact_root
        self.system_metrics, self.system_metrics_interval_s = system_metrics, float(system_metrics_interval_s)
        check_tracking_uri(tracking_uri)
        self.client = init_store(tracking_uri)
        self.run_id: Optional[str] = None
        self._monitor = None

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
            found = with_retries(self.client.get_experiment_by_name, name)
            if found is not None:
                return found.experiment_id
            if not create:
                return None
            try:
                with store_lock(self.tracking_uri):  # one creator at a time on a shared SQLite file
                    found = with_retries(self.client.get_experiment_by_name, name)
                    if found is not None:
                        return found.experiment_id
                    return with_retries(self.client.create_experiment, name,
                                        artifact_location=self._artifact_location(name),
                                        tags=experiment_tags(name))
            except MlflowException:
                time.sleep(0.2 * (attempt + 1))  # another job created it (or the db is busy): look again
        raise RuntimeError(f"could not create or find MLflow experiment {name!r} at {self.tracking_uri}")

    def start_run(self, experiment, run_name, tags, params, resume_run_id=None, start_time=None):
        """``start_time`` (ms since the epoch; default now) is set only when copying a run (import_records)."""
        from mlflow.entities import Param, RunStatus

        if resume_run_id:
            self.run_id = resume_run_id
            with_retries(self.client.update_run, resume_run_id, status=RunStatus.to_string(RunStatus.RUNNING))
            return resume_run_id
        experiment_id = self.experiment_id(experiment)
        all_tags = {"mlflow.runName": run_name, **{k: str(v) for k, v in tags.items()}}
        run = with_retries(self.client.create_run, experiment_id, tags=all_tags, run_name=run_name,
                           start_time=start_time)
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:MAX_PARAM_LENGTH]) for k, v in sorted(params.items())]
        for i in range(0, len(items), _BATCH):
            with_retries(self.client.log_batch, self.run_id, params=items[i:i + _BATCH])
        return self.run_id

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0, timestamp: Optional[int] = None) -> None:
        from mlflow.entities import Metric

        now = timestamp or int(time.time() * 1000)
        items = [Metric(k, float(v), now, int(step)) for k, v in self.unlogged(metrics, step).items()]
        for i in range(0, len(items), _BATCH):
            with_retries(self.client.log_batch, self.run_id, metrics=items[i:i + _BATCH])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        from mlflow.entities import RunTag

        with_retries(self.client.log_batch, self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        with_retries(self.client.log_artifact, self.run_id, str(path), artifact_path)

    def log_dataset(self, record: DatasetRecord) -> None:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(record.name, record.digest, record.source_type, record.source, record.schema, record.profile)
        tags = [InputTag("mlflow.data.context", record.context)]
        with_retries(self.client.log_inputs, self.run_id, datasets=[DatasetInput(dataset, tags)])

    def start_system_metrics(self, resumed: bool = False) -> bool:
        if self.system_metrics and self._monitor is None:
            self._monitor = system_metrics_monitor.start(self.run_id, self.tracking_uri,
                                                         self.system_metrics_interval_s, resumed)
        return self._monitor is not None

    def end_run(self, status: str = FINISHED, end_time: Optional[int] = None) -> None:
        monitor, self._monitor = self._monitor, None
        system_metrics_monitor.stop(monitor)  # its last samples, while the run is still open
        with_retries(self.client.set_terminated, self.run_id, status=status, end_time=end_time)

    def has_run(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            with_retries(self.client.get_run, run_id)
        except MlflowException as exc:
            if getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def logged_steps(self, run_id: str) -> Dict[str, int]:
        keys = with_retries(self.client.get_run, run_id).data.metrics
        return {key: max(m.step for m in with_retries(self.client.get_metric_history, run_id, key)) for key in keys}

    def close_orphans(self, experiment: str) -> int:
        experiment_id = self.experiment_id(experiment, create=False)
        if experiment_id is None:
            return 0
        closed, token = 0, None
        while True:
            page = with_retries(self.client.search_runs, [experiment_id], "attributes.status = 'RUNNING'",
                                max_results=1000, page_token=token)
            for run in page:
                reason = orphan_reason(run.data.tags)
                if reason:
                    from mlflow.entities import RunTag

                    with_retries(self.client.log_batch, run.info.run_id,
                                 tags=[RunTag("status", "killed"), RunTag("status_reason", reason),
                                       RunTag(NOTE_TAG, f"Killed: {reason}.")])
                    with_retries(self.client.set_terminated, run.info.run_id, status=KILLED)
                    closed += 1
            token = page.token
            if not token:
                return closed

    def find_finished(self, experiment: str, config_hash: str) -> Optional[str]:
        experiment_id = self.experiment_id(experiment, create=False)
        if experiment_id is None:
            return None
        runs = with_retries(
            self.client.search_runs, [experiment_id],
            filter_string=f"tags.config_hash = '{config_hash}' and attributes.status = 'FINISHED'",
            max_results=1,
        )
        return runs[0].info.run_id if runs else None
