"""``recbench-sweep``: run a sweep preset (``conf/sweep/<preset>.yaml``) as one command.

    recbench-sweep leaderboard_synthetic                 # every method x 6 budgets x 3 seeds + `full`
    recbench-sweep demo --jobs 2                         # two parallel local jobs (Hydra joblib launcher)
    recbench-sweep smoke seed=1 dataset.rows=100000      # extra Hydra overrides win over the preset
    recbench-sweep leaderboard_movielens100k --dry-run   # print the plan (job counts) and the commands
    recbench-sweep --list                                # the presets

A preset is an ordinary Hydra config (``# @package _global_``): its ``hydra.sweeper.params`` hold
the grid, so ``recbench -m sweep=<preset>`` runs the main grid too. ``method: glob(*,exclude=full)``
expands, at launch time, to every file in ``conf/method/`` (the folder is the registry: nothing to
keep in sync). ``sweep_preset.reference`` names extra fixed points launched after the main grid
with the same seeds, e.g. the uncompressed ``full`` model at ratio 1.0 that every leaderboard row is
compared with. ``sweep_preset`` never changes a job's numbers (it is left out of the config hash).

Bookkeeping:
- every job gets the sweep id (``--sweep-id``; default ``<preset>-<hash of preset and overrides>``,
  so a re-launch keeps its id) through ``RECBENCH_SWEEP_ID`` -> tag ``sweep_id``;
- before launching, the planner composes every job, computes its config hash and counts the jobs
  that already FINISHED in the MLflow store (they are skipped by the job itself; FAILED, killed or
  never-started jobs run again, resuming from their checkpoint when one exists);
- the dataset of each protocol is prepared and its MLflow experiment created once, here, so
  parallel jobs never race on either;
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
DESIGN.md sections 5 and 7.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections import Counter, OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from recbench.types import settings_hash

CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
OUTCOMES = ("finished", "skipped", "infeasible", "failed")


@dataclass
class Grid:
    name: str  # main | reference-<i>
    overrides: List[str]  # command-line overrides of this Hydra multirun (after sweep=<preset>)
    jobs: List[List[str]] = field(default_factory=list)  # per job: its full override list


@dataclass
class Plan:
    preset: str
    sweep_id: str
    grids: List[Grid]
    jobs_total: int = 0
    already_finished: int = 0
    orphans_closed: int = 0
    protocols: List[str] = field(default_factory=list)
    checked: bool = False
    # cost of the jobs to run, from the CPU seconds of finished runs of the same method and protocol
    estimated_cpu_seconds: float = 0.0
    estimated_jobs: int = 0
    unestimated: Counter = field(default_factory=Counter)  # method -> jobs with no finished run to go by
    infeasible: Counter = field(default_factory=Counter)  # method -> jobs to run its budget solver rejects
    under_budget: Counter = field(default_factory=Counter)  # method -> jobs to run below (1 - tolerance) x target
    stores: Dict[str, List[str]] = field(default_factory=dict)  # MLflow tracking URI -> the plan's experiments


def presets() -> List[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "sweep").glob("*.yaml"))


def default_sweep_id(preset: str, overrides: Sequence[str]) -> str:
    """<preset>-<hash of the preset and the overrides that can change numbers>: launcher, thread,
    progress, tracking and path overrides (``job.NON_NUMERIC_KEYS``) leave the sweep id alone, so
    re-launching on another launcher or thread count continues the same sweep."""
    from recbench.cli.job import NON_NUMERIC_KEYS

    def numeric(override: str) -> bool:
        key = override.split("=", 1)[0].lstrip("+~")
        return not any(key == k or key.startswith(k + ".") or key.startswith(k + "/") for k in NON_NUMERIC_KEYS)

    kept = sorted(o for o in overrides if numeric(o))
    return f"{preset}-{settings_hash({'preset': preset, 'overrides': kept}, 8)}"


def _compose(overrides: Sequence[str], hydra: bool = False):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=list(overrides), return_hydra_config=hydra)


def _search_path_overrides(overrides: Sequence[str]) -> List[str]:
    return [o for o in overrides if o.startswith("hydra.searchpath")]


def expand(params: Sequence[str], search_overrides: Sequence[str] = ()) -> List[List[str]]:
    """Hydra's own expansion of a grid (BasicSweeper.split_arguments; ``glob`` over config groups)."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    search_path = create_config_search_path(str(CONFIG_DIR))
    for override in search_overrides:  # hydra.searchpath=[file://...] (tests, plugins)
        for item in override.split("=", 1)[1].strip("[]").split(","):
            if item.strip():
                search_path.append("recbench-sweep", item.strip())
    loader = ConfigLoaderImpl(config_search_path=search_path)
    parsed = OverridesParser.create(config_loader=loader).parse_overrides(
        [p for p in params if not p.startswith("hydra.")])
    return BasicSweeper.split_arguments(parsed, None)[0]


def _is_sweep(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    if override.startswith("hydra."):
        return False
    return OverridesParser.create().parse_override(override).is_sweep_override()


def build_plan(preset: str, overrides: Sequence[str], sweep_id: Optional[str] = None) -> Plan:
    overrides = list(overrides)
    # a sweep override (method=a,b / glob(...) / range(...)) replaces the preset's axis; only the
    # plain ones may take part in composing the preset itself
    cfg = _compose([f"sweep={preset}", *(o for o in overrides if not _is_sweep(o))], hydra=True)
    params = OrderedDict((str(k), str(v)) for k, v in (cfg.hydra.sweeper.params or {}).items())
    meta = cfg.get("sweep_preset") or {}
    base = [f"{k}={v}" for k, v in params.items()]
    grids = [Grid("main", list(overrides))]
    references = meta.get("reference") or []
    if hasattr(references, "items"):  # one reference point given as a mapping
        references = [references]
    for i, ref in enumerate(references):
        kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ref]  # the reference point wins
        grids.append(Grid(f"reference-{i}", [*kept, *(f"{k}={v}" for k, v in ref.items())]))
    seen = set()
    search = _search_path_overrides(overrides)
    for grid in grids:
        for job in expand(base + grid.overrides, search):
            key = tuple(sorted(job))
            if key not in seen:  # a reference point already in the main grid runs once
                seen.add(key)
                grid.jobs.append([f"sweep={preset}", *search, *job])
    plan = Plan(preset, sweep_id or default_sweep_id(preset, overrides), [g for g in grids if g.jobs])
    plan.jobs_total = sum(len(g.jobs) for g in plan.grids)
    return plan


def _job_configs(jobs: Sequence[List[str]]):
    """Compose every job (once per seed-free override set: seeds only change ``seed``)."""
    from omegaconf import OmegaConf

    cache: Dict[Tuple[str, ...], Any] = {}
    for job in jobs:
        seed = next((o.split("=", 1)[1] for o in job if o.startswith("seed=")), None)
        rest = tuple(o for o in job if not o.startswith("seed="))
        if rest not in cache:
            cache[rest] = _compose(rest)
        cfg = OmegaConf.to_container(cache[rest])
        if seed is not None:
            cfg["seed"] = int(seed) if seed.lstrip("-").isdigit() else seed
        yield job, OmegaConf.create(cfg)


def check_plan(plan: Plan) -> Plan:
    """Prepare each protocol's dataset and MLflow experiment once; count already-FINISHED jobs and
    price the others (``CostBook``)."""
    from omegaconf import OmegaConf

    from recbench.cli.job import budget_verdict, config_hash, instantiate_without, protocol_tag

    def key_of(node) -> str:
        return json.dumps(OmegaConf.to_container(node, resolve=True), sort_keys=True, default=str)

    prepared: Dict[str, Any] = {}  # dataset config json -> the prepared dataset's spec
    stores: Dict[Tuple[str, str], "CostBook"] = {}
    verdicts: Dict[Tuple[str, ...], Tuple[Optional[str], bool]] = {}  # the budget solver's, per (dataset, method, budget, dim)
    for grid in plan.grids:
        for job, cfg in _job_configs(grid.jobs):
            dataset_key = key_of(cfg.dataset)
            if dataset_key not in prepared:
                protocol = instantiate_without(cfg.dataset)
                prepared[dataset_key] = protocol.prepare(Path(cfg.paths.data_root)).spec
            spec = prepared[dataset_key]
            protocol_id = spec.protocol_id
            store_key = (OmegaConf.to_yaml(cfg.tracking), protocol_id)
            if store_key not in stores:
                tracker = instantiate_without(cfg.tracking, drop=("skip_finished",))
                stores[store_key] = _finished_runs(tracker, protocol_id)
                plan.orphans_closed += tracker.close_orphans(protocol_id)  # killed earlier: will re-run
                if hasattr(tracker, "tracking_uri"):
                    plan.stores.setdefault(tracker.tracking_uri, []).append(protocol_id)
            book = stores[store_key]
            resolved = OmegaConf.to_container(cfg, resolve=True)
            if cfg.tracking.get("skip_finished", False) and config_hash(resolved) in book.hashes:
                plan.already_finished += 1
                continue
            method = str(cfg.method.get("name") or "")
            verdict_key = (dataset_key, key_of(cfg.method), key_of(cfg.budget), str(cfg.model.embedding_dim))
            if verdict_key not in verdicts:
                try:
                    verdicts[verdict_key] = budget_verdict(cfg, spec)
                except Exception:  # noqa: BLE001 - any other error is the job's to record (FAILED, with
                    verdicts[verdict_key] = (None, False)  # its reason): one bad job must not stop the launch
            reason, under = verdicts[verdict_key]
            if reason is not None:  # recorded as an infeasible run in seconds: not priced
                plan.infeasible[method] += 1
                continue
            if under:
                plan.under_budget[method] += 1
            seconds = book.estimate(protocol_tag(protocol_id, resolved), method, cfg.budget.get("compression_ratio"))
            if seconds is None:
                plan.unestimated[method] += 1
            else:
                plan.estimated_cpu_seconds += seconds
                plan.estimated_jobs += 1
    plan.protocols = sorted({spec.protocol_id for spec in prepared.values()})
    plan.checked = True
    return plan


@dataclass
class CostBook:
    """What the store knows before a launch: the config hashes of its FINISHED runs and the CPU
    seconds of its finished (not infeasible) runs, per (protocol tag, method, compression ratio)."""
    hashes: set = field(default_factory=set)
    cpu_seconds: Dict[Tuple[str, str, str], List[float]] = field(default_factory=dict)

    def add(self, tags: Dict[str, str], metrics: Dict[str, float]) -> None:
        self.hashes.add(tags.get("config_hash", ""))
        seconds = metrics.get("run/cpu_seconds")
        if tags.get("status") == "finished" and seconds is not None:
            key = (tags.get("protocol", ""), tags.get("method", ""), _ratio_key(tags.get("compression_ratio")))
            self.cpu_seconds.setdefault(key, []).append(float(seconds))

    def estimate(self, protocol: str, method: str, ratio: Any) -> Optional[float]:
        """Median CPU seconds of the same method and protocol at this budget, else at any budget."""
        same = self.cpu_seconds.get((protocol, method, _ratio_key(ratio)))
        if not same:
            same = [s for (p, m, _), values in self.cpu_seconds.items() if (p, m) == (protocol, method) for s in values]
        return float(statistics.median(same)) if same else None


def _ratio_key(ratio: Any) -> str:
    try:
        return repr(float(ratio))
    except (TypeError, ValueError):
        return str(ratio)


def _finished_runs(tracker, experiment: str) -> CostBook:
    """The FINISHED runs of ``experiment`` as a ``CostBook`` (creating the experiment if missing)."""
    book = CostBook()
    if not hasattr(tracker, "experiment_id"):
        return book
    from recbench.tracking.mlflow_tracker import with_retries

    experiment_id = tracker.experiment_id(experiment)  # created once here, before parallel jobs start
    token = None
    while True:
        page = with_retries(tracker.client.search_runs, [experiment_id], "attributes.status = 'FINISHED'",
                            max_results=1000, page_token=token)
        for run in page:
            book.add(run.data.tags, run.data.metrics)
        token = page.token
        if not token:
            return book


class PeriodicExport:
    """While a sweep runs, export the run records of its MLflow experiments (every run in them: this
    sweep's, and the runs of other sweeps it skips as already FINISHED) to one JSON file every
    ``minutes``, and once more when the launch ends, however it ends. The file is what
    ``python -m recbench.reporting.import_records`` puts back into a new store, so a store lost
    mid-sweep costs at most ``minutes`` of it. A failed export (store busy, disk full) is reported
    and tried again at the next tick; it never stops the sweep.

    Usage: ``with PeriodicExport(plan.stores, path, minutes): run_plan(...)``.
    """

    def __init__(self, stores: Dict[str, List[str]], path: Path, minutes: float, log=None):
        import threading

        self.stores, self.path, self.interval = stores, Path(path), 60.0 * minutes
        self.log = log or (lambda line: print(line, flush=True))
        self.exports = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="recbench-export", daemon=True)

    def export(self) -> bool:
        from recbench.reporting.runs import load_mlflow_runs, save_records

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

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.export()

    def __enter__(self) -> "PeriodicExport":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()
        self.export()


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def job_environment(sweep_id: str, jobs: int, base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Environment of the Hydra process: sweep id and per-job thread counts (no oversubscription)."""
    env = dict(os.environ if base is None else base)
    env["RECBENCH_SWEEP_ID"] = sweep_id
    if jobs > 1 or not env.get("RECBENCH_NUM_THREADS"):  # a user's choice stands for sequential sweeps
        env["RECBENCH_NUM_THREADS"] = str(max(1, usable_cores() // max(1, jobs)))
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[name] = env["RECBENCH_NUM_THREADS"]
    return env


def recbench_command() -> List[str]:
    script = Path(sys.executable).parent / "recbench"
    return [str(script)] if script.is_file() else [sys.executable, "-c", "from recbench.cli.train import main; main()"]


def hydra_command(plan: Plan, grid: Grid, jobs: int, sweep_dir: Path) -> List[str]:
    launcher = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={jobs}"] if jobs > 1 else []
    return [*recbench_command(), "-m", f"sweep={plan.preset}", *grid.overrides, *launcher,
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


def run_plan(plan: Plan, jobs: int, root: Path) -> Tuple[int, Counter]:
    # one folder per launch, even for two launches of one sweep in the same second
    sweep_dir = Path(root) / plan.sweep_id / f"{time.strftime('%Y-%m-%d_%H-%M-%S')}_{os.getpid()}"
    env = job_environment(plan.sweep_id, jobs)
    code = 0
    for grid in plan.grids:
        command = hydra_command(plan, grid, jobs, sweep_dir)
        print(f"\n[recbench-sweep] {grid.name}: {len(grid.jobs)} jobs\n  RECBENCH_SWEEP_ID={plan.sweep_id} "
              f"RECBENCH_NUM_THREADS={env['RECBENCH_NUM_THREADS']} {shlex.join(command)}", flush=True)
        code = subprocess.run(command, env=env).returncode or code
    return code, count_outcomes(sweep_dir, plan.jobs_total)


def summary(plan: Plan, counts: Optional[Counter] = None, jobs: int = 1) -> str:
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


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def cost_line(plan: Plan, jobs: int) -> str:
    """The estimated cost of the feasible jobs to run (those the budget solver rejects end in
    seconds), and the jobs the store has no finished run to price by."""
    parts = []
    if plan.estimated_jobs:
        parallel = max(1, min(jobs, usable_cores()))
        parts.append(f"estimated {_duration(plan.estimated_cpu_seconds)} CPU for {plan.estimated_jobs} job(s), "
                     f"about {_duration(plan.estimated_cpu_seconds / parallel)} wall at {parallel} parallel job(s) "
                     "(median CPU seconds of finished runs of the same method and protocol)")
    if plan.unestimated:
        methods = ", ".join(f"{m or '?'} x{n}" for m, n in sorted(plan.unestimated.items()))
        parts.append(f"not estimated (no finished run of the method on this protocol): {methods}")
    return "; ".join(parts)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="recbench-sweep", description="run a sweep preset of conf/sweep/")
    parser.add_argument("words", nargs="*", metavar="preset [overrides ...]",
                        help="a conf/sweep/<preset>.yaml name, then extra Hydra overrides (win over the preset's grid)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="parallel local jobs (joblib launcher when > 1; default: the preset's sweep_preset.jobs or 1)")
    parser.add_argument("--sweep-id", default=None, help="default: <preset>-<hash of preset and overrides>")
    parser.add_argument("--root", type=Path, default=Path("outputs/sweeps"), help="Hydra sweep folders")
    parser.add_argument("--dry-run", action="store_true", help="plan and count, launch nothing")
    parser.add_argument("--no-check", action="store_true", help="skip the pre-launch count of finished jobs")
    parser.add_argument("--list", action="store_true", help="list the presets")
    parser.add_argument("--export", type=Path, default=None, metavar="RUNS_JSON",
                        help="while the sweep runs, write the run records of its experiments to this JSON file "
                             "every --export-every minutes and at the end (import_records restores them)")
    parser.add_argument("--export-every", type=float, default=20.0, metavar="MINUTES",
                        help="minutes between two exports of --export (default 20)")
    args = parser.parse_intermixed_args(argv)  # options may come before, between or after the words
    args.preset, args.overrides = (args.words[0], args.words[1:]) if args.words else (None, [])
    if args.list or not args.preset:
        print("\n".join(presets()))
        return 0 if args.list else 2
    if args.preset not in presets() and not _search_path_overrides(args.overrides):
        print(f"recbench-sweep: unknown preset {args.preset!r}; available: {', '.join(presets())}", file=sys.stderr)
        return 2
    if args.jobs is not None and args.jobs < 1:
        print(f"recbench-sweep: --jobs {args.jobs}: needs 1 or more parallel jobs", file=sys.stderr)
        return 2
    if args.export is not None and (args.no_check or not args.export_every > 0):
        print("recbench-sweep: --export needs the pre-launch check (drop --no-check) and --export-every > 0 "
              f"(got {args.export_every})", file=sys.stderr)
        return 2
    if args.export is not None and not args.export.parent.is_dir():
        print(f"recbench-sweep: --export {args.export}: folder {args.export.parent} does not exist", file=sys.stderr)
        return 2
    plan = build_plan(args.preset, args.overrides, args.sweep_id)
    if not args.no_check:
        check_plan(plan)
    jobs = args.jobs or int((_compose([f"sweep={args.preset}", *(o for o in args.overrides if not _is_sweep(o))]).get("sweep_preset") or {})
                            .get("jobs", 1))
    print(summary(plan, jobs=jobs), flush=True)
    if args.dry_run:
        for grid in plan.grids:
            print(shlex.join(hydra_command(plan, grid, jobs, args.root / plan.sweep_id / "<time>")))
        return 0
    exporting = PeriodicExport(plan.stores, args.export, args.export_every) if args.export else nullcontext()
    with exporting:
        code, counts = run_plan(plan, jobs, args.root)
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
