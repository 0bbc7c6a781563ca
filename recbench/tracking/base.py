"""The tracker interface (one run per job) and an in-memory tracker for tests.

Metric keys are ``split/metric`` (``val/auc``, ``test/auc``, ``emb/compression_ratio``, ...);
tags identify the run (method, model, dataset protocol id, compression ratio, seed, sweep id,
git commit, status and its reason).

References: docs/architecture.md section 5.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

from recbench.tracking.inputs import DatasetRecord

#: run statuses (MLflow's names)
FINISHED, FAILED, KILLED, RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"
#: MLflow's tags of a run's name and of its description (the note on the run's page)
RUN_NAME_TAG, NOTE_TAG = "mlflow.runName", "mlflow.note.content"


#: the Hydra key of a job's torch thread count (tag ``num_threads`` records the count a run had)
THREADS_KEY = "runtime.num_threads"


def with_thread_count(overrides: List[str], threads: object) -> List[str]:
    """``overrides`` with ``runtime.num_threads=<threads>`` appended, unless they set a count already
    (``threads`` empty: unchanged). The count is outside the config hash but changes the order of
    float reductions, so a command repeats a run bit for bit only with the count it ran with."""
    if threads in (None, "") or any(o.lstrip("+").startswith(THREADS_KEY + "=") for o in overrides):
        return list(overrides)
    return [*overrides, f"{THREADS_KEY}={threads}"]


def owner_tags() -> Dict[str, str]:
    """Which process holds a run open: host, pid and the process's start time (s since the epoch).

    A run left RUNNING by a process that no longer exists (SIGKILL, OOM kill, power loss) is an
    orphan; ``orphan_reason`` recognises it from these tags (the start time guards against a
    recycled pid).
    """
    import os
    import socket

    return {"host": socket.gethostname(), "pid": str(os.getpid()), "process_start": f"{_process_start(os.getpid()):.0f}"}


def _process_start(pid: int) -> float:
    """Start time of ``pid`` in seconds since the epoch (Linux /proc), or -1 when unknown/gone."""
    import os

    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError, StopIteration):
        return -1.0


def orphan_reason(tags: Mapping[str, str], host: Optional[str] = None) -> Optional[str]:
    """Why a RUNNING run with these tags has no live process on this host, or None.

    Runs of other hosts, and runs without owner tags, are never declared orphans (unknowable here).
    """
    import socket

    host = host or socket.gethostname()
    if tags.get("host") != host or not tags.get("pid", "").isdigit():
        return None
    pid = int(tags["pid"])
    started = _process_start(pid)
    if started < 0:
        return f"process {pid} on {host} ended without closing its run (SIGKILL, OOM kill or power loss)"
    recorded = float(tags.get("process_start") or -1)
    if recorded >= 0 and abs(started - recorded) > 2:
        return f"process {pid} on {host} ended without closing its run (its pid now belongs to another process)"
    return None


def flatten(mapping: Mapping[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists become their string form."""
    out: Dict[str, Any] = {}
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out


class Tracker(abc.ABC):
    #: {metric: step} already in the store for the current run when it was resumed: a resumed job
    #: repeats the steps between its checkpoint and the kill, and those are not logged twice
    skip_steps: Dict[str, int] = {}

    def unlogged(self, metrics: Mapping[str, float], step: int) -> Dict[str, float]:
        """``metrics`` without the keys already logged at ``step`` or later (``skip_steps``)."""
        return {k: v for k, v in metrics.items() if step > self.skip_steps.get(k, -1)}

    @abc.abstractmethod
    def start_run(self, experiment: str, run_name: str, tags: Mapping[str, str],
                  params: Mapping[str, Any], resume_run_id: Optional[str] = None) -> str:
        """Start (or resume) a run; returns its id."""

    @abc.abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None: ...

    @abc.abstractmethod
    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    @abc.abstractmethod
    def log_artifact(self, path: Path, artifact_path: Optional[str] = None) -> None:
        """Copy the file ``path`` into the run's artifacts (into the folder ``artifact_path`` when given)."""

    @abc.abstractmethod
    def log_dataset(self, record: DatasetRecord) -> None:
        """Record the dataset the current run reads (MLflow: a dataset input of the run)."""

    def start_system_metrics(self, resumed: bool = False) -> bool:
        """Start sampling this machine's CPU, memory, disk and network use into the current run until
        ``end_run``; True when sampling runs. Default: the tracker records none (the in-memory one)."""
        return False

    @abc.abstractmethod
    def end_run(self, status: str = FINISHED) -> None: ...

    def find_finished(self, experiment: str, config_hash: str) -> Optional[str]:
        """Id of a FINISHED run of ``experiment`` with this config hash, if any."""
        return None

    def has_run(self, run_id: str) -> bool:
        """Whether the store holds a run with this id (a checkpoint may outlive its store)."""
        return True

    def logged_steps(self, run_id: str) -> Dict[str, int]:
        """{metric: last step logged} of a run (a resumed job does not log those steps again)."""
        return {}

    def close_orphans(self, experiment: str) -> int:
        """Mark this host's RUNNING runs of ``experiment`` whose process is gone as KILLED (with the
        reason); returns how many. Default: nothing to close."""
        return 0


@dataclass
class MemoryRun:
    run_id: str
    experiment: str
    name: str
    tags: Dict[str, str]
    params: Dict[str, Any]
    metrics: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)
    artifacts: List[str] = field(default_factory=list)
    inputs: List[DatasetRecord] = field(default_factory=list)
    status: str = RUNNING

    def latest(self, key: str) -> float:
        return self.metrics[key][-1][1]


class InMemoryTracker(Tracker):
    """Keeps runs in a list (tests and dry runs)."""

    def __init__(self) -> None:
        self.runs: List[MemoryRun] = []

    @property
    def current(self) -> MemoryRun:
        return self.runs[-1]

    def start_run(self, experiment, run_name, tags, params, resume_run_id=None):
        if resume_run_id:
            for run in self.runs:
                if run.run_id == resume_run_id:
                    run.status = RUNNING
                    self.runs.remove(run)
                    self.runs.append(run)
                    return run.run_id
        run = MemoryRun(str(len(self.runs)), experiment, run_name, dict(tags), dict(params))
        self.runs.append(run)
        return run.run_id

    def log_metrics(self, metrics, step=0):
        for key, value in self.unlogged(metrics, step).items():
            self.current.metrics.setdefault(key, []).append((step, float(value)))

    def set_tags(self, tags):
        self.current.tags.update({k: str(v) for k, v in tags.items()})
        if RUN_NAME_TAG in tags:  # as MLflow: the tag is the run's name
            self.current.name = str(tags[RUN_NAME_TAG])

    def log_artifact(self, path, artifact_path=None):
        self.current.artifacts.append(f"{artifact_path}/{Path(path).name}" if artifact_path else str(path))

    def log_dataset(self, record):
        self.current.inputs.append(record)

    def end_run(self, status=FINISHED):
        self.current.status = status

    def has_run(self, run_id):
        return any(run.run_id == run_id for run in self.runs)

    def logged_steps(self, run_id):
        run = next((r for r in self.runs if r.run_id == run_id), None)
        return {key: max(step for step, _ in values) for key, values in run.metrics.items()} if run else {}

    def find_finished(self, experiment, config_hash):
        for run in self.runs:
            if run.experiment == experiment and run.status == FINISHED and run.tags.get("config_hash") == config_hash:
                return run.run_id
        return None
