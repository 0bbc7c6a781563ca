"""Run records read from MLflow (or an exported JSON file) — never from live training objects.

A record is a flat dict: run id, experiment (the dataset protocol id), status, the tags
(method, model, dataset, protocol, compression_ratio, seed, sweep_id, status, ...), the
final value of every metric and the run's params (the flattened resolved config).

References: docs/architecture.md section 5 ("Tracking schema"); ``recbench.tracking.schema``.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from recbench.tracking.base import orphan_reason
from recbench.tracking.schema import RECORD_TAGS

def machine_local(value: str) -> bool:
    """Whether a param value names a place on the machine that ran the job (an absolute path, a
    ``file:`` or ``sqlite:`` URI): meaningless elsewhere, and never part of a committed record."""
    return bool(re.match(r"(/|[A-Za-z]:[\\/]|file:|sqlite:)", str(value)))


def load_mlflow_runs(tracking_uri: str, dataset: Optional[str] = None,
                     experiments: Optional[Sequence[str]] = None) -> List[Dict[str, Any]]:
    """Every recbench run in the store (optionally of one dataset name, optionally of the named
    experiments only: the others are not read) as flat records."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    records = []
    for experiment in client.search_experiments():
        if experiment.name == "Default" or (experiments is not None and experiment.name not in experiments):
            continue
        token = None
        while True:
            page = client.search_runs([experiment.experiment_id], filter_string="tags.method != ''",
                                      max_results=1000, page_token=token)
            for run in page:
                tags = run.data.tags
                if dataset and tags.get("dataset") != dataset:
                    continue
                record: Dict[str, Any] = {"run_id": run.info.run_id, "experiment": experiment.name,
                                          "experiment_id": experiment.experiment_id,
                                          "run_status": run.info.status, "run_name": tags.get("mlflow.runName", ""),
                                          "start_time": run.info.start_time, "end_time": run.info.end_time}
                record.update({k: tags.get(k, "") for k in RECORD_TAGS})
                record["metrics"] = dict(run.data.metrics)  # the last logged value of every metric
                # the flattened resolved config (for import_records), without where this machine kept files
                record["params"] = {k: v for k, v in run.data.params.items() if not machine_local(v)}
                orphaned = orphan_reason(tags) if run.info.status == "RUNNING" else None
                if orphaned:  # shown as killed; `recbench-sweep` closes such runs in the store
                    record.update(status="killed", status_reason=orphaned)
                records.append(record)
            token = page.token
            if not token:
                break
    return records


def save_records(records: List[Dict[str, Any]], path: Path) -> None:
    """Write ``records`` as JSON, atomically: a reader (or a kill mid-write) sees the old file or the
    new one, never half of one."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(records, indent=2, sort_keys=True, default=str))
    os.replace(partial, path)


def load_records(path: Path) -> List[Dict[str, Any]]:
    return json.loads(Path(path).read_text())


def relink(records: Sequence[Dict[str, Any]], store: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """``records`` (exported elsewhere) pointing at their copies in ``store`` (this machine's records):
    a record whose run is in the store, or was imported into it (tag ``imported_from_run_id``, set by
    ``reporting.import_records``), takes that run's id and experiment id, so the report's links open
    it; the others are returned unchanged. New dicts: the input is not modified."""
    copies = {r["imported_from_run_id"]: r for r in store if r.get("imported_from_run_id")}
    copies.update({r["run_id"]: r for r in store})
    out = []
    for record in records:
        copy = copies.get(record.get("run_id")) or copies.get(record.get("imported_from_run_id") or None)
        out.append({**record, "run_id": copy["run_id"], "experiment_id": copy["experiment_id"]} if copy else record)
    return out
