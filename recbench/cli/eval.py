"""``recbench-eval``: evaluate a finished run's kept model again, and compare with what it recorded.

    recbench-eval RUN_ID [--split test|val] [--tracking-uri URI] [--data-root DIR]

The run must have kept its model (``tracking.keep_model=deployable``, the default): the deployable
model its test metrics measured. The dataset protocol is prepared from the run's own config (or
reused from the cache). Exit status 0 when the metrics match the recorded ones (1e-6), 1 when they
differ, 2 when the run or its model cannot be found.

References: ``recbench.runs.kept``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List

from recbench.cli import OneLineParser, refuse, store_problem
from recbench.tracking.mlflow_tracker import default_tracking_uri

TOLERANCE = 1e-6


def parser() -> OneLineParser:
    """The ``recbench-eval`` argument parser."""
    top = OneLineParser(prog="recbench-eval", description=__doc__.split("\n\n")[0].replace("``", ""),
                        epilog="exit status: 0 the metrics match the recorded ones (within 1e-6); 1 they differ; "
                               "2 the store, the run or its model cannot be found (one line on stderr)")
    top.add_argument("run_id", help="the MLflow run id (the result table's 'MLflow run' line)")
    top.add_argument("--split", default="test", choices=["test", "val"], help="the split to evaluate (default test)")
    top.add_argument("--tracking-uri", default=default_tracking_uri(),
                     help="the MLflow store holding the run (default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    top.add_argument("--data-root", type=Path, default=None, help="dataset cache root (default: the run's)")
    return top


def main(argv: List[str] | None = None) -> int:
    args = parser().parse_args(argv)
    problem = store_problem(args.tracking_uri)
    if problem:
        return refuse("recbench-eval", problem)
    from mlflow.exceptions import MlflowException

    from recbench.runs.kept import evaluate_model, load_kept, recorded_metrics

    try:
        model, config = load_kept(args.run_id, args.tracking_uri)
        recorded = recorded_metrics(args.run_id, args.tracking_uri)
    except (FileNotFoundError, MlflowException) as exc:
        return refuse("recbench-eval", str(exc).splitlines()[0])
    metrics = evaluate_model(model, config, args.split, args.data_root)
    worst = 0.0
    width = 2 + len(args.split) + max(map(len, metrics), default=0)
    print(f"run {args.run_id}: {config.method.name} @ {config.budget.compression_ratio} on {config.dataset.get('name') or config.dataset.get('_target_')}, "
          f"{args.split} split")
    for key, value in metrics.items():
        before = recorded.get(f"{args.split}/{key}")
        diff = abs(value - before) if before is not None else float("nan")
        worst = max(worst, diff if before is not None else 0.0)
        shown = f"recorded {before:.6f}, difference {diff:.1e}" if before is not None else "not recorded"
        print(f"  {args.split + '/' + key:<{width}} {value:.6f}   ({shown})")
    return 0 if worst <= TOLERANCE else 1


if __name__ == "__main__":
    sys.exit(main())
