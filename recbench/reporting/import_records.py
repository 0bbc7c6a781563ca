"""Put exported run records (``recbench-report --export runs.json``) back into an MLflow store.

    python -m recbench.reporting.import_records reports/reference/synthetic/runs.json [--tracking-uri URI]

The MLflow store is one SQLite file on the machine that ran the jobs. A committed reference report
carries its runs as records (``reports/reference/<dataset>/runs.json``, written by ``--export``), so
that the results outlive that file: importing them into a new (or lost) store makes a re-launched
sweep skip every job they hold (same ``config_hash`` tag, status FINISHED) and makes
``recbench-report`` and the dashboard show them beside new runs. A sweep spread over several
machines or sessions thus resumes from what was committed.

An imported run holds the record's tags (``tracking.schema.RECORD_TAGS``), its params (the flattened
resolved config, when the record has them), the final value of every metric (logged at step 0), its
MLflow status and start/end times, and two tags of its own: ``imported_from_run_id`` (the run id in
the store it was exported from) and ``imported_from`` (the file name). It holds no metric histories
or artifacts (stage masks, chosen dims, ``config.yaml``): those stay in the original store, so
``recbench.runs.rehash`` lists imported runs as "without config" and leaves them alone. A record whose run is still RUNNING in the export (a job
killed before the export) is imported as KILLED, so a re-launch runs that job again.

Idempotent: a record whose run id is in the store, or that an earlier import already brought in
(tag ``imported_from_run_id``, deleted runs included), is skipped; an imported run exported again
keeps the run id of its first store, so records that travelled through several stores meet as one. ``--dry-run`` only counts.

References: docs/architecture.md section 5 (tracking, sweep bookkeeping); ``recbench.reporting.runs`` (the record format).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Sequence, Set

from recbench.reporting.runs import load_records
from recbench.tracking.schema import RECORD_TAGS
from recbench.tracking.base import KILLED
from recbench.tracking.mlflow_tracker import MLflowTracker, default_tracking_uri, resolve_tracking_uri, with_retries

#: tags an import adds to every run it creates
SOURCE_RUN_TAG = "imported_from_run_id"
SOURCE_FILE_TAG = "imported_from"
_STATUSES = ("FINISHED", "FAILED", "KILLED")


class RecordError(ValueError):
    """An exported record that cannot be imported (names the record and the field)."""


@dataclass
class ImportSummary:
    records: int = 0
    imported: List[str] = field(default_factory=list)  # source run ids
    already_present: int = 0

    def __str__(self) -> str:
        return (f"{self.records} records: {len(self.imported)} imported, "
                f"{self.already_present} already in the store (skipped)")


def check_record(record: Dict[str, Any], position: int, source: str) -> None:
    """Raise ``RecordError`` unless the record has what an import needs."""
    where = f"{source}: record {position}"
    if not isinstance(record, dict):
        raise RecordError(f"{where}: not an object; allowed: the records written by recbench-report --export")
    for key in ("run_id", "experiment", "run_status", "metrics"):
        if key not in record:
            raise RecordError(f"{where}: no field {key!r}; allowed: the records written by recbench-report --export")
    if record["run_status"] not in (*_STATUSES, "RUNNING"):
        raise RecordError(f"{where} (run {record['run_id']}): run_status {record['run_status']!r}; "
                          f"allowed: {', '.join((*_STATUSES, 'RUNNING'))}")
    if not isinstance(record["metrics"], dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in record["metrics"].values()):
        raise RecordError(f"{where} (run {record['run_id']}): 'metrics' is not an object of name -> value")
    if not isinstance(record.get("params", {}), dict):
        raise RecordError(f"{where} (run {record['run_id']}): 'params' is not an object of name -> value")


def _present(tracker: MLflowTracker, experiment_id: str) -> Set[str]:
    """Run ids of the experiment and the source run ids of its imported runs (deleted runs included)."""
    from mlflow.entities import ViewType

    seen, token = set(), None
    while True:
        page = with_retries(tracker.client.search_runs, [experiment_id], "", run_view_type=ViewType.ALL,
                            max_results=1000, page_token=token)
        for run in page:
            seen.add(run.info.run_id)
            if SOURCE_RUN_TAG in run.data.tags:
                seen.add(run.data.tags[SOURCE_RUN_TAG])
        token = page.token
        if not token:
            return seen


def origin(record: Dict[str, Any]) -> str:
    """The run id a record started as: an imported run exported again keeps its first store's id."""
    return str(record.get(SOURCE_RUN_TAG) or record["run_id"])


def _tags_of(record: Dict[str, Any], source_name: str) -> Dict[str, str]:
    tags = {key: str(record[key]) for key in RECORD_TAGS if record.get(key) not in (None, "")}
    tags.update({"mlflow.runName": str(record.get("run_name") or record["run_id"]),
                 SOURCE_RUN_TAG: origin(record), SOURCE_FILE_TAG: source_name})
    return tags


def import_records(records: Sequence[Dict[str, Any]], tracker: MLflowTracker, source: str = "records",
                   dry_run: bool = False) -> ImportSummary:
    """Create one run per record not yet in the store (see the module docstring)."""
    if not isinstance(records, list):
        raise RecordError(f"{source}: not a list of records (recbench-report --export)")
    for position, record in enumerate(records):  # every record is checked before anything is written
        check_record(record, position, source)
    summary = ImportSummary(records=len(records))
    present: Dict[str, Set[str]] = {}
    for record in records:
        experiment = str(record["experiment"])
        if experiment not in present:
            experiment_id = tracker.experiment_id(experiment, create=not dry_run)
            present[experiment] = _present(tracker, experiment_id) if experiment_id else set()
        if record["run_id"] in present[experiment] or origin(record) in present[experiment]:
            summary.already_present += 1
            continue
        summary.imported.append(record["run_id"])
        if dry_run:
            continue
        start = int(record.get("start_time") or 0) or None
        end = int(record.get("end_time") or 0) or start
        tags = _tags_of(record, Path(source).name)
        if record["run_status"] not in _STATUSES:  # RUNNING when exported: its process is gone by now
            tags.update(status="killed", status_reason=f"still RUNNING when exported ({Path(source).name}); "
                                                       "imported as KILLED")
        tracker.start_run(experiment, tags["mlflow.runName"], tags, record.get("params") or {}, start_time=start)
        tracker.log_metrics(record["metrics"], step=0, timestamp=end)
        tracker.end_run(record["run_status"] if record["run_status"] in _STATUSES else KILLED, end_time=end)
        present[experiment].update((record["run_id"], origin(record)))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m recbench.reporting.import_records",
                                     description="put exported run records back into an MLflow store")
    parser.add_argument("records", type=Path, nargs="+", help="JSON files written by recbench-report --export")
    parser.add_argument("--tracking-uri", default=default_tracking_uri())
    parser.add_argument("--artifact-root", default=os.environ.get("RECBENCH_ARTIFACT_ROOT", "mlartifacts"))
    parser.add_argument("--dry-run", action="store_true", help="only count what would be imported")
    args = parser.parse_args(argv)
    tracker = MLflowTracker(resolve_tracking_uri(args.tracking_uri, Path.cwd()), args.artifact_root)
    for path in args.records:
        try:
            records = load_records(path)
        except (OSError, ValueError) as exc:
            print(f"import_records: error: {path}: {exc}", file=sys.stderr)
            return 2
        try:
            summary = import_records(records, tracker, str(path), dry_run=args.dry_run)
        except RecordError as exc:
            print(f"import_records: error: {exc}", file=sys.stderr)
            return 2
        print(f"{path}: {summary}{' (dry run: nothing written)' if args.dry_run else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
