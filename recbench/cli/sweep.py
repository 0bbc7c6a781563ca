"""``recbench-sweep``: run a sweep preset (``recbench/conf/sweep/<preset>.yaml``) as one command.

    recbench-sweep leaderboard_synthetic                 # every method x 6 budgets x 3 seeds + `full`
    recbench-sweep demo --jobs 2                         # two parallel local jobs (Hydra joblib launcher)
    recbench-sweep smoke seed=1 dataset.rows=100000      # extra Hydra overrides win over the preset
    recbench-sweep leaderboard_movielens100k --dry-run   # print the plan (job counts) and the commands
    recbench-sweep --list                                # the presets

A preset is an ordinary Hydra config (``# @package _global_``): its ``hydra.sweeper.params`` hold
the grid, so ``recbench -m sweep=<preset>`` runs the main grid too. ``method: glob(*,exclude=full)``
expands, at launch time, to every file in ``recbench/conf/method/`` (the folder is the registry: nothing to
keep in sync). ``sweep_preset.reference`` names extra fixed points launched after the main grid
with the same seeds, e.g. the uncompressed ``full`` model at ratio 1.0 that every leaderboard row is
compared with. ``sweep_preset`` never changes a job's numbers (it is left out of the config hash).

Bookkeeping:
- every job gets the sweep id (``--sweep-id``; default ``<preset>-<hash of preset and overrides>``,
  so a re-launch keeps its id) as the override ``sweep_id=`` -> tag ``sweep_id``;
- before launching, the planner composes every job, computes its config hash and counts the jobs
  that already FINISHED in the MLflow store (they are skipped by the job itself; FAILED, killed or
  never-started jobs run again, resuming from their checkpoint when one exists);
- the dataset of each protocol is prepared and its MLflow experiment created once, here, so
  parallel jobs never race on either;
- the grids run in this process (``launch_in_process``: Hydra's multirun called directly, so the
  imports, the MLflow store's setup and Hydra's start are paid once per sweep, not once per grid);
  ``--isolate`` runs each grid in its own ``recbench`` process instead (a job that crashes its
  process, e.g. inside a native kernel, then cannot end the sweep);
- parallel jobs (``--jobs N`` > 1: Hydra's joblib launcher) get ``max(1, cores // N)`` torch/OpenMP
  threads each; a failing or infeasible job is recorded and the sweep goes on;
- each job to run is put to its method's budget solver (``method.solve``, no training): the jobs
  it rejects (nothing the method can build fits under the budget) are counted apart (they are
  recorded as infeasible runs in seconds), and so are the jobs whose best configuration under the
  budget lands below (1 - tolerance) x the target (they run, tagged ``under_budget=true``);
- the feasible jobs to run are priced from the store: the median CPU seconds (``run/cpu_seconds``) of the
  finished runs of the same method, protocol and budget (else of the method and protocol at any
  budget); the summary prints the total and the wall time it means at ``--jobs N``;
- ``--export runs.json`` writes the run records of the sweep's experiments to a JSON file every
  ``--export-every`` minutes (default 20) and at the end, atomically: a backup of the store that
  ``python -m recbench.reporting.import_records`` restores (``PeriodicExport``);
- at the end each job's outcome (written by ``recbench`` next to its Hydra log) is counted:
  finished / skipped / infeasible / failed / no outcome (killed).

References: Hydra multirun and BasicSweeper (``hydra.sweeper.params``, ``glob``), hydra-joblib-launcher;
docs/architecture.md ("Sweeps"). The planner is ``recbench.runs.sweep_plan``, the launcher
``recbench.runs.sweep_launch``.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import List, Optional, Sequence

from recbench.cli import OneLineParser, refuse
from recbench.cli.train import tracking_problem
from recbench.datasets.errors import DatasetError
from recbench.gates.settings import override_error
from recbench.runs.config import ConfigError, composition_problem, moved_keys, override_problem
from recbench.tracking.mlflow_tracker import StoreError
from recbench.runs.sweep_plan import _is_sweep, _search_path_overrides, build_plan, check_plan, presets
from recbench.runs.sweep_launch import (PeriodicExport, hydra_command, job_environment, launch_in_subprocess,
                                       run_plan, summary)


def launch_in_process(arguments: List[str], threads: int) -> int:
    """One grid's multirun in this process: ``recbench <arguments>`` through its own entry point
    (``recbench.cli.train.main``: the same checks, Hydra launcher, callbacks and exit status as the
    command). The thread variables of third-party pools are set as for a new process
    (``job_environment``: parallel joblib workers inherit them) and this process's BLAS/OpenMP pools
    are limited to ``threads`` while it runs (``threadpoolctl``); each job sets torch's threads from
    its ``runtime.num_threads``. Everything is restored afterwards."""
    from threadpoolctl import threadpool_limits

    from recbench.cli.train import main as recbench_main

    saved_argv, saved_env = sys.argv, dict(os.environ)
    os.environ.update(job_environment(threads, base={}))
    sys.argv = ["recbench", *arguments]
    try:
        with threadpool_limits(limits=threads):
            return recbench_main()
    except SystemExit as exc:  # Hydra exits on a composition error; its message is already printed
        return exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = saved_argv
        os.environ.clear()
        os.environ.update(saved_env)


def _job_count(value: str) -> int:
    """``--jobs``: a whole number (checked >= 1 in ``main``, with the same message)."""
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number; allowed: 1 or more parallel jobs") from None


def _usage(message: str) -> int:
    """A bad argument, preset, override, value, store or data: one line on stderr, exit status 2."""
    return refuse("recbench-sweep", message)


EXIT_CODES = ("exit status: 0 every job finished, was skipped or infeasible; 1 a job failed or left no outcome "
              "(relaunch the same command to run it again); 2 a bad argument, preset, override, value, tracking URI "
              "or input data, before anything is launched")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = OneLineParser(prog="recbench-sweep", epilog=EXIT_CODES,
                           description="run a sweep preset of recbench/conf/sweep/ (every job a recbench run), "
                                       "with a plan, cost estimate, skip-finished count and periodic exports")
    parser.add_argument("words", nargs="*", metavar="preset [overrides ...]",
                        help="a recbench/conf/sweep/<preset>.yaml name, then extra Hydra overrides (win over the preset's grid)")
    parser.add_argument("--jobs", type=_job_count, default=None,
                        help="parallel local jobs (joblib launcher when > 1; default: the preset's sweep_preset.jobs or 1)")
    parser.add_argument("--sweep-id", default=None,
                        help="the tag sweep_id of every job (default: <preset>-<hash of preset and overrides>, "
                             "stable across re-launches)")
    parser.add_argument("--root", type=Path, default=Path("outputs/sweeps"),
                        help="where the Hydra sweep folders (job logs, outcome.json) go (default outputs/sweeps)")
    parser.add_argument("--dry-run", action="store_true", help="plan and count, launch nothing")
    parser.add_argument("--isolate", action="store_true",
                        help="run each grid in its own recbench process (default: in this process, which pays the "
                             "imports and the store setup once; isolated, a job crashing its process cannot end the sweep)")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the pre-launch count of finished jobs and the budget check (launch at once)")
    parser.add_argument("--list", action="store_true", help="list the presets")
    parser.add_argument("--export", type=Path, default=None, metavar="RUNS_JSON",
                        help="while the sweep runs, write the run records of its experiments to this JSON file "
                             "every --export-every minutes and at the end (import_records restores them)")
    parser.add_argument("--export-every", type=float, default=20.0, metavar="MINUTES",
                        help="minutes between two exports of --export (default 20)")
    args = parser.parse_intermixed_args(argv)  # options may come before, between or after the words
    args.preset, args.overrides = (args.words[0], args.words[1:]) if args.words else (None, [])
    if args.list or not args.preset:
        if args.list:
            print("\n".join(presets()))
            return 0
        return _usage(f"a preset is required; available: {', '.join(presets())} (or --list)")
    if args.preset not in presets() and not _search_path_overrides(args.overrides):
        return _usage(f"unknown preset {args.preset!r}; available: {', '.join(presets())}")
    args.overrides, notes = moved_keys(args.overrides)
    for note in notes:
        print(f"recbench-sweep: note: {note}", file=sys.stderr)
    moved = override_error(args.overrides) or override_problem(args.overrides) or tracking_problem(args.overrides)
    if moved:
        return _usage(moved)
    if args.jobs is not None and args.jobs < 1:
        return _usage(f"--jobs {args.jobs}: needs 1 or more parallel jobs")
    if args.export is not None and (args.no_check or not args.export_every > 0):
        return _usage("--export needs the pre-launch check (drop --no-check) and --export-every > 0 "
                      f"(got {args.export_every})")
    if args.export is not None and not args.export.parent.is_dir():
        return _usage(f"--export {args.export}: folder {args.export.parent} does not exist")
    problem = composition_problem([f"sweep={args.preset}", *(o for o in args.overrides if not _is_sweep(o))])
    if problem:  # a key the preset's config does not have, a value its type refuses
        return _usage(problem)
    try:  # every job is composed and checked here: a bad value, store or data is one line, before any launch
        plan = build_plan(args.preset, args.overrides, args.sweep_id)
        if not args.no_check:
            check_plan(plan)
    except (ConfigError, DatasetError, StoreError) as exc:
        return _usage(str(exc))
    jobs = args.jobs or plan.default_jobs
    print(summary(plan, jobs=jobs), flush=True)
    if args.dry_run:
        for grid in plan.grids:
            print(shlex.join(hydra_command(plan, grid, jobs, args.root / plan.sweep_id / "<time>")))
        return 0
    exporting = PeriodicExport(plan.stores, args.export, args.export_every) if args.export else nullcontext()
    with exporting:
        code, counts = run_plan(plan, jobs, args.root, launch_in_subprocess if args.isolate else launch_in_process)
    print("\n" + summary(plan, counts), flush=True)
    if code:
        print(f"recbench-sweep: the Hydra launcher exited with status {code}", file=sys.stderr)
    lost = counts.get("failed", 0) + counts.get("no outcome (killed?)", 0)
    if lost and not code:
        print(f"recbench-sweep: {counts.get('failed', 0)} job(s) failed and {counts.get('no outcome (killed?)', 0)} "
              "left no outcome; relaunch the same command to run them again", file=sys.stderr)
    return code or (1 if lost else 0)


if __name__ == "__main__":
    sys.exit(main())
