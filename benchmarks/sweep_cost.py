"""Wall-clock cost of every method relative to ``full`` in the same leaderboard sweep.

Search stages, schedules and evolutionary searches cost time that a training-step benchmark
(``train_step.py``) does not see. This benchmark reads what the leaderboard sweeps recorded in
MLflow (never live objects, like ``recbench-report``): for each method, the wall time of its
finished runs (MLflow run start to end: every stage, the evaluations, the deployable-form test
evaluation, latency and FLOP measurement, logging) and, per budget, the training time
(``train/seconds``) and each stage's time (``stage/<name>/seconds``). The reference is ``full``
in the same sweep, or — when the sweep skipped ``full`` because an identical run had already
finished elsewhere, or when its own ``full`` runs predate the CPU-seconds metric — the ``full`` runs
of the same protocol that have it (stated per dataset).

Figures ``<dataset>_<method>``: the method's median cost (all budgets and seeds) / ``full``'s (no
target: a cost, reported). The cost is the run's CPU seconds (``run/cpu_seconds``, logged by
every job since session 3; sweep jobs run on one thread, so CPU time is their compute and is
robust to other processes on the machine) when both sides have it, else the MLflow wall time —
which carries the machine's load: runs of one method measured 12 s and 95 s at different loads.

    python benchmarks/sweep_cost.py                            # both leaderboards, their default sweep ids
    python benchmarks/sweep_cost.py --dataset synthetic --sweep-id leaderboard_synthetic-667a5bdd
    python benchmarks/sweep_cost.py --records runs.json        # exported records (recbench-report --export)

Without runs of a sweep in the store (a fresh clone) it writes nothing and says so.

References: recbench.reporting.runs (records); docs/architecture.md section 6.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from recbench.bench import harness

DATASETS = ("movielens100k", "synthetic")


def run_seconds(record: Dict[str, Any]) -> Optional[float]:
    if not record.get("end_time") or not record.get("start_time"):
        return None
    return (float(record["end_time"]) - float(record["start_time"])) / 1000.0


def cost(record: Dict[str, Any], kind: str) -> Optional[float]:
    """``cpu``: the run's CPU seconds (None when not logged); ``wall``: MLflow run wall seconds."""
    if kind == "cpu":
        value = record.get("metrics", {}).get("run/cpu_seconds")
        return float(value) if value is not None else None
    return run_seconds(record)


def finished(records: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    return [r for r in records if r.get("status") == "finished" and run_seconds(r) is not None]


def reference_runs(records: Sequence[Dict[str, Any]],
                   sweep: List[Dict[str, Any]]) -> Tuple[List[Dict[str, Any]], str]:
    """``full``'s finished runs in the sweep, else of the sweep's protocol(s) in any sweep. Runs with
    CPU seconds come first: when the sweep's own ``full`` predates that metric (its wall time carries
    the load of its day: 107-134 s of training for MovieLens runs that take ~9 s of CPU), ``full``
    runs of the same protocol that logged it are the reference, and the label says so."""
    own = [r for r in sweep if r.get("method") == "full"]
    if any(cost(r, "cpu") is not None for r in own):
        return own, "full in the same sweep"
    protocols = {r.get("dataset_protocol_id") for r in sweep}
    other = [r for r in finished(records) if r.get("method") == "full" and r.get("dataset_protocol_id") in protocols
             and float(r.get("compression_ratio") or 1.0) == 1.0 and r not in own]
    timed = [r for r in other if cost(r, "cpu") is not None]
    if timed and any(cost(r, "cpu") is not None for r in sweep if r.get("method") != "full"):
        return timed, ("full of the same protocol from other sweeps, with CPU seconds (the sweep's own full "
                       "runs have none)" if own else
                       "full of the same protocol from other sweeps (the sweep skipped it as already finished)")
    if own:
        return own, "full in the same sweep"
    return other, "full of the same protocol from other sweeps (the sweep skipped it as already finished)"


def cost_table(sweep: List[Dict[str, Any]], reference: Optional[float]) -> List[Dict[str, Any]]:
    """One row per method and budget: runs, median wall / CPU / train / stage seconds, CPU ratio to
    ``full`` (``reference``: full's median CPU seconds, None when not logged)."""
    groups: Dict[tuple, List[Dict[str, Any]]] = defaultdict(list)
    for record in sweep:
        groups[(record.get("method"), float(record.get("compression_ratio") or 1.0))].append(record)
    rows = []
    for (method, ratio), runs in sorted(groups.items(), key=lambda kv: (kv[0][0] != "full", kv[0][0], -kv[0][1])):
        wall = statistics.median(run_seconds(r) for r in runs)
        stages = defaultdict(list)
        for r in runs:
            for key, value in r.get("metrics", {}).items():
                if key.startswith("stage/") and key.endswith("/seconds"):
                    stages[key.split("/")[1]].append(float(value))
        train = [float(r["metrics"]["train/seconds"]) for r in runs if "train/seconds" in r.get("metrics", {})]
        cpu = [cost(r, "cpu") for r in runs if cost(r, "cpu") is not None]
        rows.append({"method": method, "budget": ratio, "runs": len(runs), "median run s": round(wall, 1),
                     "median CPU s": round(statistics.median(cpu), 1) if cpu else None,
                     "x full (CPU)": round(statistics.median(cpu) / reference, 2) if cpu and reference else None,
                     "median train s": round(statistics.median(train), 1) if train else None,
                     "median stage s": ", ".join(f"{k} {statistics.median(v):.0f}" for k, v in stages.items()) or ""})
    return rows


def largest_leaderboard(records: Sequence[Dict[str, Any]], dataset: str) -> str:
    """The ``leaderboard_<dataset>-<hash>`` sweep id with the most runs (the preset's hash changes
    when methods are added, and a sweep keeps the id it was launched with)."""
    counts: Dict[str, int] = defaultdict(int)
    for record in records:
        if record.get("dataset") == dataset and str(record.get("sweep_id", "")).startswith(f"leaderboard_{dataset}-"):
            counts[record["sweep_id"]] += 1
    return max(counts, key=counts.get) if counts else f"leaderboard_{dataset}-(none)"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/sweep_cost.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--sweep-id", nargs="+", default=None,
                        help="one per --dataset (default: the `leaderboard_<dataset>-*` sweep with the most runs)")
    parser.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI", "sqlite:///mlflow.db"))
    parser.add_argument("--records", type=Path, default=None, help="exported run records instead of MLflow")
    harness.add_common_arguments(parser, rounds=1, warmup=0)
    args = parser.parse_args(argv)
    from recbench.reporting.runs import load_mlflow_runs, load_records

    records = load_records(args.records) if args.records else load_mlflow_runs(args.tracking_uri)
    sweep_ids = args.sweep_id or [largest_leaderboard(records, d) for d in args.dataset]
    if len(sweep_ids) != len(args.dataset):
        parser.error(f"--sweep-id needs one id per dataset ({len(args.dataset)}), got {len(sweep_ids)}")
    result = harness.BenchResult.start("sweep_cost", argv, args)
    for dataset, sweep_id in zip(args.dataset, sweep_ids):
        sweep = [r for r in finished(records) if r.get("dataset") == dataset and r.get("sweep_id") == sweep_id]
        if not sweep:
            print(f"sweep_cost: no finished run of sweep {sweep_id!r} on {dataset} in the store; skipped", file=sys.stderr)
            continue
        reference, source = reference_runs(records, sweep)
        if not reference:
            print(f"sweep_cost: no finished `full` run for {dataset}; skipped", file=sys.stderr)
            continue
        full_cpu = [cost(r, "cpu") for r in reference if cost(r, "cpu") is not None]
        result.tables[f"{dataset}: sweep `{sweep_id}` (reference: {source}, {len(reference)} runs)"] = \
            cost_table(sweep + [r for r in reference if r not in sweep], statistics.median(full_cpu) if full_cpu else None)
        by_method: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
        for record in sweep:
            if record.get("method") != "full":
                by_method[record["method"]].append(record)
        for method, runs in sorted(by_method.items()):
            kind = "cpu" if full_cpu and all(cost(r, "cpu") is not None for r in runs) else "wall"
            label = "CPU seconds" if kind == "cpu" else "wall time (load-dependent)"
            result.add(harness.Figure(
                f"{dataset}_{method}", f"{method} on {dataset}: median {label} of its finished runs in sweep "
                f"`{sweep_id}` ({len(runs)} runs, every budget and seed) / `full`'s ({source}).",
                harness.Side(method, [cost(r, kind) for r in runs], "s"),
                harness.Side("full", [cost(r, kind) for r in reference if cost(r, kind) is not None], "s"),
                ratio_of="candidate/reference"))
    if not result.figures:
        print("sweep_cost: nothing to report (no leaderboard runs in this store); no results written", file=sys.stderr)
        return 0
    result.notes.append("Wall times (and stage/train seconds) come from jobs run over hours at varying load "
                        "(1-3 concurrent jobs on 2 cores); CPU seconds are what to compare where logged.")
    result.finish(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
