"""Launching a planned sweep: one Hydra multirun per grid (joblib launcher for parallel jobs),
each job's thread count given as its ``runtime.num_threads``, a periodic export of the run records,
and the count of the jobs' outcomes at the end.

References: hydra-joblib-launcher; docs/architecture.md ("Sweeps").
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from recbench.reporting.runs import load_mlflow_runs, save_records
from recbench.runs.job import usable_cores
from recbench.runs.sweep_plan import Grid, SweepPlan
from recbench.types import format_duration

OUTCOMES = ("finished", "skipped", "infeasible", "failed")


class Ticker:
    """A background thread that calls ``tick()`` every ``interval`` seconds while the ``with``
    block runs, and ``last()`` once when it ends, however it ends. ``log`` prints a line (default:
    standard output, flushed, so a pipe or a log file sees it at once)."""

    name = "recbench-ticker"

    def __init__(self, interval: float, log=None):
        self.interval = interval
        self.log = log or (lambda line: print(line, flush=True))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)

    def tick(self) -> None: ...

    def last(self) -> None: ...

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.last()


class PeriodicExport(Ticker):
    """While a sweep runs, export the run records of its MLflow experiments (every run in them: this
    sweep's, and the runs of other sweeps it skips as already FINISHED) to one JSON file every
    ``minutes``, and once more when the launch ends, however it ends. The file is what
    ``python -m recbench.reporting.import_records`` puts back into a new store, so a store lost
    mid-sweep costs at most ``minutes`` of it. A failed export (store busy, disk full) is reported
    and tried again at the next tick; it never stops the sweep.

    Usage: ``with PeriodicExport(plan.stores, path, minutes): run_plan(...)``.
    """

    name = "recbench-export"

    def __init__(self, stores: Dict[str, List[str]], path: Path, minutes: float, log=None):
        super().__init__(60.0 * minutes, log)
        self.stores, self.path = stores, Path(path)
        self.exports = 0

    def export(self) -> bool:
        try:
            records = [r for uri, experiments in self.stores.items()
                       for r in load_mlflow_runs(uri, experiments=experiments)]
            save_records(records, self.path)
        except Exception as exc:  # noqa: BLE001 - an export must never end the sweep; say why it failed
            self.log(f"[recbench-sweep] export to {self.path} failed ({type(exc).__name__}: {exc}); "
                     "the sweep goes on")
            return False
        self.exports += 1
        statuses = Counter(r.get("status") or "no status" for r in records)
        self.log(f"[recbench-sweep] {time.strftime('%H:%M:%S')} exported {len(records)} run record(s) "
                 f"({', '.join(f'{k} {v}' for k, v in sorted(statuses.items()))}) to {self.path}")
        return True

    def tick(self) -> None:
        self.export()

    def last(self) -> None:
        self.export()


def job_threads(jobs: int, overrides: Sequence[str] = ()) -> int:
    """Torch threads per job: the user's ``runtime.num_threads`` override, else the usable cores
    shared by the ``jobs`` parallel jobs (no oversubscription)."""
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "runtime.num_threads" and value.isdigit() and int(value) > 0:
            return int(value)
    return max(1, usable_cores() // max(1, jobs))


def job_environment(threads: int, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment of the Hydra process: the thread pools of third-party libraries (OpenMP, MKL,
    OpenBLAS read only these variables) sized like the jobs' torch threads. recbench's own settings
    reach the jobs as Hydra overrides (``hydra_command``), never as environment variables."""
    env = dict(os.environ if base is None else base)
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = str(threads)
    return env


def recbench_command() -> List[str]:
    script = Path(sys.executable).parent / "recbench"
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from recbench.cli.train import main; main()"]


def hydra_command(plan: SweepPlan, grid: Grid, jobs: int, sweep_dir: Path) -> List[str]:
    """The multirun of one grid: the preset, the grid's overrides, the sweep id and each job's thread
    count as config (both left out of the config hash), the launcher and the sweep folder. Jobs the
    planner composed and checked (``plan.checked``) go through the ``recbench_planned`` sweeper,
    which does not compose them a second time to validate them."""
    launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"] if jobs > 1 else []
    if plan.checked:
        launcher.append("hydra/sweeper=recbench_planned")
    runtime = [f"sweep_id={plan.sweep_id}"]
    if not any(o.startswith("runtime.num_threads=") for o in grid.overrides):
        runtime.append(f"runtime.num_threads={job_threads(jobs)}")
    return [*recbench_command(), "-m", f"sweep={plan.preset}", *grid.overrides, *runtime, *launcher,
            f"hydra.sweep.dir={sweep_dir / grid.name}", "hydra.sweep.subdir=${hydra.job.num}"]


def count_outcomes(sweep_dir: Path, expected: int) -> Counter:
    counts: Counter = Counter()
    for path in Path(sweep_dir).glob("*/*/outcome.json"):
        try:
            counts[json.loads(path.read_text()).get("status", "failed")] += 1
        except (OSError, ValueError):
            counts["failed"] += 1
    counts["no outcome (killed?)"] = max(0, expected - sum(counts.values()))
    return counts


class SweepProgress(Ticker):
    """While a sweep runs, one line each time jobs end: ``job k/N``, the outcomes so far and the
    time left at the pace of the jobs that ran (jobs the plan found FINISHED are skipped in
    seconds and do not count towards the pace). Read from the jobs' ``outcome.json`` files every
    ``seconds``; the line goes to the terminal and to any log the output is piped to."""

    name = "recbench-progress"

    def __init__(self, plan: SweepPlan, sweep_dir: Path, seconds: float = 15.0, log=None):
        super().__init__(seconds, log)
        self.plan, self.sweep_dir = plan, Path(sweep_dir)
        self.start = time.perf_counter()
        self.seen = -1

    def line(self, counts: Counter) -> str:
        done = sum(counts.get(k, 0) for k in OUTCOMES)
        elapsed = time.perf_counter() - self.start
        ran = done - counts.get("skipped", 0)
        to_run = max(0, self.plan.jobs_total - self.plan.already_finished - ran)
        parts = ", ".join(f"{k} {counts.get(k, 0)}" for k in OUTCOMES)
        pace = (f"about {format_duration(elapsed / ran * to_run)} left at the pace so far" if ran and to_run else
                "no job has run yet" if to_run else "the last jobs are ending")
        return (f"[recbench-sweep] {time.strftime('%H:%M:%S')} job {done}/{self.plan.jobs_total} done ({parts}); "
                f"{format_duration(elapsed)} elapsed, {pace}")

    def tick(self) -> None:
        counts = count_outcomes(self.sweep_dir, self.plan.jobs_total)
        done = sum(counts.get(k, 0) for k in OUTCOMES)
        if done != self.seen:
            self.seen = done
            if done:
                self.log(self.line(counts))

    def last(self) -> None:
        self.tick()


#: runs one grid's multirun: (``recbench`` arguments after the program name, the jobs' thread count) -> exit status
Launch = Callable[[List[str], int], int]


def launch_in_subprocess(arguments: List[str], threads: int) -> int:
    """The multirun in a new ``recbench`` process (``--isolate``: a job that kills its process, e.g. a
    crash inside a native kernel, cannot take the planner down with it; each grid pays a process
    start, imports and the MLflow store's setup)."""
    return subprocess.run([*recbench_command(), *arguments], env=job_environment(threads)).returncode


def run_plan(plan: SweepPlan, jobs: int, root: Path, launch: Launch = launch_in_subprocess) -> Tuple[int, Counter]:
    """Run every grid of ``plan`` through ``launch`` (one Hydra multirun per grid), with progress lines."""
    # one folder per launch, even for two launches of one sweep in the same second
    sweep_dir = Path(root) / plan.sweep_id / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}"
    code = 0
    with SweepProgress(plan, sweep_dir):
        for grid in plan.grids:
            command = hydra_command(plan, grid, jobs, sweep_dir)
            print(f"\n[recbench-sweep] {grid.name}: {len(grid.jobs)} jobs\n  {shlex.join(command)}", flush=True)
            code = launch(command[len(recbench_command()):], job_threads(jobs, grid.overrides)) or code
    return code, count_outcomes(sweep_dir, plan.jobs_total)


def summary(plan: SweepPlan, counts: Optional[Counter] = None, jobs: int = 1) -> str:
    lines = [f"sweep {plan.preset} (sweep id {plan.sweep_id}): {plan.jobs_total} jobs in {len(plan.grids)} grid(s)"]
    if plan.checked:
        lines.append(f"  before launch: {plan.already_finished} already FINISHED (will be skipped), "
                     f"{plan.jobs_total - plan.already_finished} to run; protocols: {', '.join(plan.protocols)}")
        if plan.infeasible:
            methods = ", ".join(f"{m or '?'} x{n}" for m, n in sorted(plan.infeasible.items()))
            lines.append(f"  of these, {sum(plan.infeasible.values())} infeasible by the method's budget solver "
                         f"(each recorded as an infeasible run in seconds): {methods}")
        if plan.under_budget:
            methods = ", ".join(f"{m or '?'} x{n}" for m, n in sorted(plan.under_budget.items()))
            lines.append(f"  {sum(plan.under_budget.values())} run under budget (the method's best configuration "
                         f"under the budget lands below (1 - tolerance) x the target; tagged under_budget=true): "
                         f"{methods}")
        if counts is None and plan.jobs_total > plan.already_finished + sum(plan.infeasible.values()):
            lines.append("  " + cost_line(plan, jobs))
        if plan.orphans_closed:
            lines.append(f"  closed {plan.orphans_closed} run(s) left RUNNING by killed processes (now KILLED, "
                         "with the reason; their jobs run again)")
    if counts is not None:
        parts = ", ".join(f"{k} {counts.get(k, 0)}" for k in (*OUTCOMES, "no outcome (killed?)"))
        lines.append(f"  this launch:   {parts}")
    return "\n".join(lines)


def cost_line(plan: SweepPlan, jobs: int) -> str:
    """The estimated cost of the feasible jobs to run (those the budget solver rejects end in
    seconds), and the jobs the store has no finished run to price by."""
    parts = []
    if plan.estimated_jobs:
        parallel = max(1, min(jobs, usable_cores()))
        parts.append(f"estimated {format_duration(plan.estimated_cpu_seconds)} CPU for {plan.estimated_jobs} job(s), "
                     f"about {format_duration(plan.estimated_cpu_seconds / parallel)} wall at {parallel} parallel job(s) "
                     "(median CPU seconds of finished runs of the same method and protocol)")
    if plan.unestimated:
        methods = ", ".join(f"{m or '?'} x{n}" for m, n in sorted(plan.unestimated.items()))
        parts.append(f"not estimated (no finished run of the method on this protocol): {methods}")
    return "; ".join(parts)
