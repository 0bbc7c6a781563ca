"""``recbench-report``: leaderboards from the MLflow store (or exported JSON records).

    recbench-report [--dataset movielens100k] [--tracking-uri sqlite:///mlflow.db] [--out reports]

Writes ``reports/<dataset>/leaderboard.md`` and ``leaderboard.csv`` and prints the table.

References: DESIGN.md section 5; ``recbench.reporting``.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

from recbench.reporting.leaderboard import aggregate, csv_rows, markdown
from recbench.reporting.runs import load_mlflow_runs, load_records
from recbench.tracking.mlflow_tracker import resolve_tracking_uri


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="recbench-report", description="leaderboards from MLflow runs")
    parser.add_argument("--dataset", default=None, help="dataset name (default: every dataset in the store)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    parser.add_argument("--records", type=Path, default=None, help="read exported JSON records instead of MLflow")
    parser.add_argument("--out", type=Path, default=Path("reports"))
    args = parser.parse_args(argv)
    if args.records:
        records = load_records(args.records)
        if args.dataset:
            records = [r for r in records if r.get("dataset") == args.dataset]
    else:
        records = load_mlflow_runs(resolve_tracking_uri(args.tracking_uri, Path.cwd()), args.dataset)
    if not records:
        print(f"recbench-report: no recbench runs found{' for dataset ' + args.dataset if args.dataset else ''} "
              f"in {args.records or args.tracking_uri}", file=sys.stderr)
        return 1
    for dataset in sorted({r.get("dataset", "") for r in records}):
        rows = aggregate([r for r in records if r.get("dataset") == dataset])
        folder = args.out / dataset
        folder.mkdir(parents=True, exist_ok=True)
        text = markdown(rows)
        (folder / "leaderboard.md").write_text(f"# Leaderboard: {dataset}\n\n{text}\n")
        table = csv_rows(rows)
        with open(folder / "leaderboard.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(table[0]))
            writer.writeheader()
            writer.writerows(table)
        print(f"\n== {dataset} ==\n{text}")
        print(f"written: {folder / 'leaderboard.md'}, {folder / 'leaderboard.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
