"""End to end: wall time of two sweeps with 1 and 2 parallel jobs, and the per-job overhead.

Grids: ``smoke`` (every registered method at ratio 0.1, 30 training steps: the worst case for
overhead, jobs of 1-4 s of work), ``demo`` (``make demo``'s preset: 5 methods x 2 ratios + ``full``
on movielens100k, jobs trained to convergence) and ``leaderboard`` (a slice of
``leaderboard_movielens100k``: ``--leaderboard-methods`` at ratio 0.1, seed 0, plus the ``full``
reference: jobs exactly as the leaderboard runs them, tens of seconds each).

Each launch is the real command, ``recbench-sweep smoke --jobs N``, in a fresh temporary
directory with its own MLflow SQLite store, artifact root, run root and data root (the
MovieLens-100K raw files are copied in, so the protocol is prepared from scratch by the sweep's
planner, as on a new machine), the way ``tests/cli/test_sweep.py`` isolates a sweep. The sweep
runs every registered method at ratio 0.1 plus ``full`` at 1.0, 30 training steps each, and
records one MLflow run per job. Every job runs on one thread (``--job-threads``): the 2-job sweep
gives each job cores // 2 = 1 thread, and the 1-job sweep is pinned to the same so the figure
compares job-level parallelism (a 2-thread job on a machine loaded by other processes measures
OpenMP barrier stalls: 92 s of training steps instead of 5 s, measured at load 10).

From the store: each job's run time (MLflow run start to end: training, validation, the final
evaluation on the deployable form, latency and FLOP measurement, metric and artifact logging)
and its time in training steps (``train/seconds``). Figures:

- ``<grid>_jobs2_vs_jobs1``: sweep wall time with 1 job / with 2 parallel jobs (no target: on
  2 cores shared with other work the gain depends on the load, stated with the figure);
- ``<grid>_overhead_fraction``: (sweep wall time - sum of the jobs' run times) / sweep wall time
  with 1 job: process start and imports, Hydra composition of every job, the planner (composing
  the grid, counting finished runs, preparing the dataset from its raw files), MLflow store
  creation and run setup outside the runs (target <= 0.10; one-time costs of a fresh folder
  included, so this is an upper bound for a sweep on a prepared machine);
- ``<grid>_per_job_overhead_fraction``: what each further job adds: the gaps between one run's
  end and the next run's start in the same process (tag ``pid``; composing the next job, its
  setup before the run and teardown after it) / (those gaps + the run times they follow), with
  1 job (target <= 0.10). The rest of the time outside the runs is paid once per launch (process
  starts and imports, store creation, planning, dataset preparation) and is listed per launch.

    python benchmarks/end_to_end.py                     # every grid, jobs 1 and 2
    python benchmarks/end_to_end.py --grids smoke --methods full hashing --jobs 1 2

References: recbench.cli.sweep; docs/architecture.md sections 5 and 6.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

from recbench.bench import harness

MOVIELENS_RAW = harness.REPO / "datasets" / "movielens100k" / "raw"


def launch(preset: str, jobs: int, scratch: Path, extra: List[str], job_threads: int = 1) -> Dict[str, Any]:
    """One sweep in a fresh folder; returns its wall time, exit code and per-run facts from MLflow."""
    root = scratch / f"jobs{jobs}"
    raw = root / "data" / "movielens100k" / "raw"
    raw.parent.mkdir(parents=True)
    shutil.copytree(MOVIELENS_RAW, raw)
    env = dict(os.environ, MLFLOW_TRACKING_URI=f"sqlite:///{root}/mlflow.db", RECBENCH_ARTIFACT_ROOT=str(root / "art"),
               RECBENCH_DATA_ROOT=str(root / "data"), RECBENCH_RUN_ROOT=str(root / "runs"), TQDM_DISABLE="1")
    env.pop("OMP_NUM_THREADS", None)
    if job_threads and jobs == 1:  # a sequential sweep keeps the user's choice; parallel ones get cores // jobs
        extra = [*extra, f"runtime.num_threads={job_threads}"]
    command = [str(Path(sys.executable).parent / "recbench-sweep"), preset, *extra, "--jobs", str(jobs),
               "--root", str(root / "sweeps"), "--sweep-id", f"bench-jobs{jobs}"]
    start, cpu_start = time.perf_counter(), _children_cpu()
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu_start
    (scratch / f"jobs{jobs}.log").write_text(done.stdout + done.stderr)
    return {"jobs": jobs, "wall_seconds": wall, "cpu_seconds": cpu, "exit_code": done.returncode, "runs": runs_of(env["MLFLOW_TRACKING_URI"]),
            "command": shlex.join(["recbench-sweep", *command[1:]]).replace(str(scratch), "<scratch>"),
            "tail": (done.stdout + done.stderr)[-1500:]}


def _children_cpu() -> float:
    """CPU seconds (user + system) of every finished child process of this one and their children."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


PROCESS_COST = """
import json, time
start = time.process_time()
import recbench.runs.job
imported = time.process_time()
from recbench.tracking.mlflow_tracker import init_store
init_store({uri!r})
print(json.dumps({{"imports_cpu_s": imported - start, "mlflow_store_init_cpu_s": time.process_time() - imported}}))
"""


def process_cost(scratch: Path) -> Dict[str, float]:
    """CPU seconds every recbench process pays once: imports of a job, and MLflow's store setup on an
    existing SQLite store (the sweep's planner and each Hydra process pay both)."""
    uri = f"sqlite:///{scratch}/cost.db"
    import json

    for _ in range(2):  # the first call creates the store; the second is what later processes pay
        done = subprocess.run([sys.executable, "-c", PROCESS_COST.format(uri=uri)], capture_output=True, text=True,
                              check=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    return json.loads(done.stdout.strip().splitlines()[-1])


def runs_of(uri: str) -> List[Dict[str, Any]]:
    """The launch's runs as read by ``recbench-report`` (``load_mlflow_runs``), reduced to timings."""
    from recbench.reporting.runs import load_mlflow_runs

    out = []
    for record in load_mlflow_runs(uri):
        start = record["start_time"] / 1000.0
        end = (record["end_time"] or record["start_time"]) / 1000.0
        out.append({"method": record["method"], "status": record["status"], "run_seconds": end - start,
                    "train_seconds": record["metrics"].get("train/seconds", 0.0), "pid": record["pid"],
                    "start": start, "end": end})
    return out


def between_runs(runs: List[Dict[str, Any]]) -> Tuple[List[float], float]:
    """Per-job overhead of a launch: the gaps between one run's end and the next run's start in the
    same process (tag ``pid``: Hydra composing the next job, the job's setup before its MLflow run,
    teardown after it), and the run time of the runs those gaps follow."""
    gaps, followed = [], 0.0
    by_process: Dict[Any, List[Dict[str, Any]]] = {}
    for run in runs:
        by_process.setdefault(run["pid"], []).append(run)
    for group in by_process.values():
        group.sort(key=lambda r: r["start"])
        for before, after in zip(group, group[1:]):
            gaps.append(max(after["start"] - before["end"], 0.0))
            followed += before["run_seconds"]
    return gaps, followed


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/end_to_end.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--grids", nargs="+", default=list(GRIDS), choices=list(GRIDS))
    parser.add_argument("--jobs", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--methods", nargs="*", default=None, help="restrict the smoke grid (default: every method)")
    parser.add_argument("--leaderboard-methods", nargs="+", default=["hashing", "qr"],
                        help="methods of the leaderboard slice (ratio 0.1, seed 0; full is added as the reference)")
    parser.add_argument("--job-threads", type=int, default=1,
                        help="runtime.num_threads of the 1-job sweep (default 1, as each of 2 parallel jobs gets on "
                             "2 cores; 0: the sweep's default, all cores)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary sweep folders")
    harness.add_common_arguments(parser, rounds=1, warmup=0)
    args = parser.parse_args(argv)
    if args.quick:
        args.methods = args.methods or ["hashing"]
        args.grids = ["smoke"]
    if not (MOVIELENS_RAW / "ml-100k.inter").is_file():
        print(f"end_to_end: {MOVIELENS_RAW} is missing; run `recbench-data fetch movielens100k` (make data) first",
              file=sys.stderr)
        return 2
    result = harness.BenchResult.start("end_to_end", argv, args)
    scratch = Path(tempfile.mkdtemp(prefix="recbench-bench-e2e-"))
    status = 0
    try:
        cost = process_cost(scratch) if not args.quick else {}
        for grid in args.grids:
            preset, extra = GRIDS[grid](args)
            launches = measure(preset, extra, args, scratch / grid)
            report(result, grid, preset, launches, args.jobs)
            status |= any(f["exit_code"] for v in launches.values() for f in v)
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            print(f"kept {scratch}")
    if cost:
        result.tables["fixed cost per process (CPU seconds)"] = [cost]
        result.notes.append(
            f"A 1-job sweep is one Python process: the planner runs each grid's Hydra multirun in process (with "
            f"`--isolate`, each grid gets a process of its own). A process pays {cost['imports_cpu_s']:.1f} CPU-s of "
            f"imports and {cost['mlflow_store_init_cpu_s']:.1f} CPU-s of MLflow SQLAlchemy store setup (its schema "
            "check) before any job runs; a 2-job sweep pays them again in each joblib worker.")
    result.settings.update({"grids": {g: " ".join([GRIDS[g](args)[0], *GRIDS[g](args)[1]]) for g in args.grids},
                            "cores": harness.machine_info().get("usable_cpus")})
    result.finish(args)
    return 1 if status else 0


GRIDS = {
    "smoke": lambda args: ("smoke", ["method=" + ",".join(args.methods)] if args.methods else []),
    "demo": lambda args: ("demo", []),
    "leaderboard": lambda args: ("leaderboard_movielens100k", ["method=" + ",".join(args.leaderboard_methods),
                                                               "budget.compression_ratio=0.1", "seed=0"]),
}


def measure(preset: str, extra: List[str], args, scratch: Path) -> Dict[int, List[Dict[str, Any]]]:
    """Every launch of one grid: ``args.rounds`` rounds over ``args.jobs`` (order alternating)."""
    launches: Dict[int, List[Dict[str, Any]]] = {jobs: [] for jobs in args.jobs}
    for r in range(args.rounds):
        for jobs in (args.jobs if r % 2 == 0 else args.jobs[::-1]):
            run_dir = scratch / f"round{r}"
            run_dir.mkdir(parents=True, exist_ok=True)
            facts = launch(preset, jobs, run_dir, extra, args.job_threads)
            launches[jobs].append(facts)
            print(f"{preset} --jobs {jobs}: {facts['wall_seconds']:.1f} s, exit {facts['exit_code']}, "
                  f"{len(facts['runs'])} runs; load {os.getloadavg()[0]:.1f}", flush=True)
            if facts["exit_code"]:
                print(facts["tail"], file=sys.stderr)
    return launches


def report(result, grid: str, preset: str, launches: Dict[int, List[Dict[str, Any]]], jobs_list: List[int]) -> None:
    """Tables and figures of one grid (``<grid>_jobs2_vs_jobs1``, ``<grid>_overhead_fraction``)."""
    rows = []
    for jobs, facts_list in launches.items():
        for facts in facts_list:
            runs = facts["runs"]
            in_runs = sum(r["run_seconds"] for r in runs)
            gaps, _ = between_runs(runs)
            rows.append({"jobs": jobs, "exit code": facts["exit_code"], "runs": len(runs),
                         "finished": sum(r["status"] == "finished" for r in runs),
                         "infeasible": sum(r["status"] == "infeasible" for r in runs),
                         "wall s": facts["wall_seconds"], "CPU s (all processes)": facts.get("cpu_seconds"),
                         "sum of run times s": in_runs,
                         "mean run s": in_runs / max(len(runs), 1),
                         "sum of train-step times s": sum(r["train_seconds"] for r in runs),
                         "outside runs s": facts["wall_seconds"] - in_runs,
                         "outside runs per job s": (facts["wall_seconds"] - in_runs) / max(len(runs), 1),
                         "between runs (same process), median s": harness.median(gaps) if gaps else None,
                         "once per launch s": facts["wall_seconds"] - in_runs - sum(gaps)})
    result.tables[f"{grid}: launches (`{launches[jobs_list[0]][-1]['command']}`)"] = rows
    first = launches[jobs_list[0]][-1]
    result.tables[f"{grid}: runs (first launch)"] = sorted(first["runs"], key=lambda r: -r["run_seconds"])
    if 1 in launches and 2 in launches:
        result.add(harness.Figure(
            f"{grid}_jobs2_vs_jobs1", f"wall time of `recbench-sweep {preset}` ({grid} grid) with 1 job / with 2 "
            "parallel jobs (fresh store and data root each).",
            harness.Side("--jobs 2", [f["wall_seconds"] for f in launches[2]], "s"),
            harness.Side("--jobs 1", [f["wall_seconds"] for f in launches[1]], "s"), ratio_of="reference/candidate"))
    if 1 in launches:
        sequential = launches[1]
        inside = [sum(r["run_seconds"] for r in f["runs"]) for f in sequential]
        result.add(harness.Figure(
            f"{grid}_overhead_fraction", f"share of the 1-job `{preset}` ({grid} grid) sweep's wall time spent outside "
            "the jobs' MLflow runs (process start, imports, Hydra composition, planning and dataset preparation, "
            "store creation, run setup).",
            harness.Side("outside the runs", [f["wall_seconds"] - i for f, i in zip(sequential, inside)], "s"),
            harness.Side("sweep wall time", [f["wall_seconds"] for f in sequential], "s"),
            ratio_of="candidate/reference", target="<= 0.1"))
        per_job = [between_runs(f["runs"]) for f in sequential]
        if all(gaps for gaps, _ in per_job):
            result.add(harness.Figure(
                f"{grid}_per_job_overhead_fraction", f"per-job overhead of the 1-job `{preset}` ({grid} grid) sweep: "
                "time between one job's MLflow run and the next one's in the same process (composing the next job, "
                "its setup and teardown) as a share of that time plus the job's run time. Launch costs paid once "
                "(process start, imports, store creation, planning, dataset preparation) are listed per launch.",
                harness.Side("between runs", [sum(g) for g, _ in per_job], "s"),
                harness.Side("between runs + runs", [sum(g) + r for g, r in per_job], "s"),
                ratio_of="candidate/reference", target="<= 0.1"))


if __name__ == "__main__":
    sys.exit(main())
