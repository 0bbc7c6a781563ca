"""``recbench-report``: leaderboards from the MLflow store (or exported JSON records).

    recbench-report [--dataset movielens100k] [--sweep-id ID] [--protocol TAG] [--tracking-uri sqlite:///mlflow.db]
                    [--records runs.json] [--export runs.json] [--out reports] [--ui-url http://127.0.0.1:5000]

Writes, per dataset, ``reports/<dataset>/``: ``leaderboard.md``, ``leaderboard.csv``, a self-contained
``index.html`` (tables + figures embedded) and ``pareto.png``/``budgets.png``; prints the tables.

References: docs/architecture.md section 5; ``recbench.reporting``.
"""
from __future__ import annotations

import os
import shlex
import sys
import time
from collections import Counter
from pathlib import Path

from recbench.cli import OneLineParser, refuse, store_problem
from recbench.reporting.provenance import linked_to_store, provenance
from recbench.reporting.report import build_reports
from recbench.reporting.runs import load_mlflow_runs, load_records, save_records
from recbench.runs.catalogue import techniques
from recbench.tracking.mlflow_tracker import default_tracking_uri, resolve_tracking_uri


def ui_url_of(tracking_uri: str) -> str:
    """Where the MLflow UI of a store is: the tracking server itself for an ``http(s)`` store, else
    ``make dashboard``'s address (``http://127.0.0.1:$PORT``, PORT 5000 unless set)."""
    if tracking_uri.startswith(("http://", "https://")):
        return tracking_uri.rstrip("/")
    return f"http://127.0.0.1:{os.environ.get('PORT', '5000')}"


def of_protocol(tag, wanted: str) -> bool:
    """Whether a run's protocol tag is ``wanted``: the whole tag or its training-settings part after '/'."""
    return tag is not None and (tag == wanted or tag.split("/")[-1] == wanted)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = OneLineParser(
        prog="recbench-report",
        description="Leaderboards from MLflow runs (or exported JSON records): per dataset, <out>/<dataset>/ gets "
                    "leaderboard.md, leaderboard.csv, a self-contained index.html and the PNG figures; the tables are "
                    "printed too.",
        epilog="exit status: 0 the reports were written; 2 bad input: an unreadable --records or --export, a store "
               "that cannot be read, or a selection (--dataset, --sweep-id, --protocol) that leaves no run "
               "(one line on stderr, naming what there is to select from)")
    parser.add_argument("--dataset", default=None, help="dataset name (default: every dataset in the store)")
    parser.add_argument("--sweep-id", default=None, help="only runs tagged with this sweep id")
    parser.add_argument("--exclude-sweep-id", action="append", default=[], metavar="SWEEP_ID",
                        help="leave out runs of this sweep (repeatable; e.g. re-runs made to measure cost)")
    parser.add_argument("--protocol", action="append", default=[], metavar="PROTOCOL",
                        help="only runs of this protocol: the full tag (movielens100k-3e6e827a3f/16eedfff) or the "
                             "part after '/' (repeatable; leaves out one-off runs made under other settings)")
    parser.add_argument("--tracking-uri", default=default_tracking_uri(),
                        help="the MLflow store to read (with --records: where imported copies of the records are "
                             "looked up, so that the report's links open them)")
    parser.add_argument("--records", type=Path, default=None, help="read exported JSON records instead of MLflow")
    parser.add_argument("--export", type=Path, default=None, help="also write the records read to this JSON file")
    parser.add_argument("--out", type=Path, default=Path("reports"),
                        help="where the report folders go: <out>/<dataset>/ (default: reports)")
    parser.add_argument("--ui-url", default=None,
                        help="the MLflow UI the run links open (default: the tracking server for an http store, "
                             "else make dashboard's http://127.0.0.1:$PORT, PORT=5000 unless set)")
    parser.add_argument("--no-figures", action="store_true", help="tables only (faster; no PNG figures)")
    args = parser.parse_args(argv)
    def error(message: str) -> int:
        return refuse("recbench-report", message)

    if args.export is not None and not args.export.parent.is_dir():  # before any work, like recbench-sweep
        return error(f"--export {args.export}: folder {args.export.parent} does not exist")
    problem = store_problem(args.tracking_uri)  # in seconds, and never creating an empty store (or its folder)
    store = None if problem else resolve_tracking_uri(args.tracking_uri, Path.cwd())
    if args.records:
        try:
            every, source = load_records(args.records), str(args.records)
        except (OSError, ValueError) as exc:  # missing, unreadable or not JSON
            return error(f"--records {args.records}: {exc}")
        records = [r for r in every if not args.dataset or r.get("dataset") == args.dataset]
    elif problem:
        return error(problem)
    else:
        records = load_mlflow_runs(store, args.dataset)
        every = None  # read again only to say which datasets there are
        source = args.tracking_uri  # as the user gave it: no machine paths in committed reports
    where = f"{' for dataset ' + args.dataset if args.dataset else ''} in {args.records or args.tracking_uri}"
    if not records:
        if every is None and args.dataset:
            every = load_mlflow_runs(store)
        datasets = Counter(r.get("dataset") or "none" for r in every or [])
        return error(f"no recbench runs found{where}"
                     + ("; datasets there: " + ", ".join(f"{d} ({n})" for d, n in datasets.most_common()) if datasets else ""))
    selections = [("--sweep-id", "sweep_id", lambda r: not args.sweep_id or r.get("sweep_id") == args.sweep_id),
                  ("--exclude-sweep-id", "sweep_id", lambda r: r.get("sweep_id") not in set(args.exclude_sweep_id)),
                  ("--protocol", "protocol",
                   lambda r: not args.protocol or any(of_protocol(r.get("protocol"), p) for p in args.protocol))]
    for flag, tag, keep in selections:
        kept = [r for r in records if keep(r)]
        if not kept:  # say which selection left nothing, and what there is to select from
            there = Counter(r.get(tag) or "none" for r in records)
            return error(f"{flag} left none of the {len(records)} runs{where}; {tag} values there: "
                         + ", ".join(f"{v} ({n})" for v, n in there.most_common()))
        records = kept
    if args.export:
        save_records(records, args.export)
    links = ""
    if args.records:
        records, links = linked_to_store(records, store)
    ui_url = args.ui_url or ui_url_of(args.tracking_uri)
    generated = (f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} by `{shlex.join(['recbench-report', *argv])}` "
                 f"from {source} ({len(records)} runs).\n\n{provenance(records)}" + (f"\n{links}" if links else ""))
    families = techniques() if not args.no_figures else None  # the figures colour methods by technique
    for report in build_reports(records, args.out, ui_url, generated, figures=not args.no_figures,
                                families=families or None):
        print(f"\n== {report.dataset} ==\n{report.markdown}")
        print(f"\nwritten: {', '.join(str(p) for p in report.files)}")
        print(f"HTML report: {report.index.resolve()}")
    served = args.ui_url is None and not args.tracking_uri.startswith(("http://", "https://"))
    print(f"Run links open the MLflow UI at {ui_url}" + (" (make dashboard serves it)" if served else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
