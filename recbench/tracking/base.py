"""The tracker interface (one run per job) and an in-memory tracker for tests.

Metric keys are ``split/metric`` (``val/auc``, ``test/auc``, ``emb/compression_ratio``, ...);
tags identify the run (method, model, dataset protocol id, compression ratio, seed, sweep id,
git commit, status and its reason).

References: DESIGN.md section 5.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Tuple

#: run statuses (MLflow's names)
FINISHED, FAILED, KILLED, RUNNING = "FINISHED", "FAILED", "KILLED", "RUNNING"


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
    @abc.abstractmethod
    def start_run(self, experiment: str, run_name: str, tags: Mapping[str, str],
                  params: Mapping[str, Any], resume_run_id: Optional[str] = None) -> str:
        """Start (or resume) a run; returns its id."""

    @abc.abstractmethod
    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None: ...

    @abc.abstractmethod
    def set_tags(self, tags: Mapping[str, str]) -> None: ...

    @abc.abstractmethod
    def log_artifact(self, path: Path) -> None: ...

    @abc.abstractmethod
    def end_run(self, status: str = FINISHED) -> None: ...

    def find_finished(self, experiment: str, config_hash: str) -> Optional[str]:
        """Id of a FINISHED run of ``experiment`` with this config hash, if any."""
        return None


@dataclass
class MemoryRun:
    run_id: str
    experiment: str
    name: str
    tags: Dict[str, str]
    params: Dict[str, Any]
    metrics: Dict[str, List[Tuple[int, float]]] = field(default_factory=dict)
    artifacts: List[str] = field(default_factory=list)
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
        for key, value in metrics.items():
            self.current.metrics.setdefault(key, []).append((step, float(value)))

    def set_tags(self, tags):
        self.current.tags.update({k: str(v) for k, v in tags.items()})

    def log_artifact(self, path):
        self.current.artifacts.append(str(path))

    def end_run(self, status=FINISHED):
        self.current.status = status

    def find_finished(self, experiment, config_hash):
        for run in self.runs:
            if run.experiment == experiment and run.status == FINISHED and run.tags.get("config_hash") == config_hash:
                return run.run_id
        return None
