"""A sweep's plan: the jobs of a preset's grid (and its reference points), expanded as Hydra's
multirun expands them, then checked against the store before launch: already-FINISHED jobs
counted, each protocol's dataset and experiment prepared once, infeasible and under-budget jobs
found by the method's budget solver, the rest priced from the CPU seconds of finished runs.

References: Hydra multirun and BasicSweeper (``hydra.sweeper.params``, ``glob``); docs/architecture.md
("Sweeps").
"""
from __future__ import annotations

import json
import statistics
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import OmegaConf

from recbench.runs.config import CONFIG_DIR, compose
from recbench.runs.identity import NON_NUMERIC_KEYS, config_hash, protocol_tag
from recbench.runs.job import budget_verdict
from recbench.runs.settings import instantiate_tracker, instantiate_without
from recbench.tracking.mlflow_tracker import with_retries
from recbench.tracking.schema import parse_ratio
from recbench.types import settings_hash

@dataclass
class Grid:
    name: str  # main | reference-<i>
    overrides: List[str]  # command-line overrides of this Hydra multirun (after sweep=<preset>)
    jobs: List[List[str]] = field(default_factory=list)  # per job: its full override list


@dataclass
class SweepPlan:
    preset: str
    sweep_id: str
    grids: List[Grid]
    jobs_total: int = 0
    default_jobs: int = 1  # the preset's ``sweep_preset.jobs``: parallel jobs when --jobs is not given
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
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "sweep").glob("*.yaml"))


def default_sweep_id(preset: str, overrides: Sequence[str]) -> str:
    """<preset>-<hash of the preset and the overrides that can change numbers>: launcher, thread,
    progress, tracking and path overrides (``job.NON_NUMERIC_KEYS``) leave the sweep id alone, so
    re-launching on another launcher or thread count continues the same sweep."""
    def numeric(override: str) -> bool:
        key = override.split("=", 1)[0].lstrip("+~")
        return not any(key == k or key.startswith(k + ".") or key.startswith(k + "/") for k in NON_NUMERIC_KEYS)

    kept = sorted(o for o in overrides if numeric(o))
    return f"{preset}-{settings_hash({'preset': preset, 'overrides': kept}, 8)}"


def _compose(overrides: Sequence[str], hydra: bool = False):
    return compose(overrides, return_hydra_config=hydra)


def _search_path_overrides(overrides: Sequence[str]) -> List[str]:
    return [o for o in overrides if o.startswith("hydra.searchpath")]


def expand(params: Sequence[str], search_overrides: Sequence[str] = ()) -> List[List[str]]:
    """Hydra's own expansion of a grid (BasicSweeper.split_arguments; ``glob`` over config groups).

    Hydra 1.3 has no public API that expands sweep overrides into jobs: the expansion lives in the
    basic sweeper, and ``glob(...)`` needs a config loader that knows the search path to list a
    group's options. Re-implementing it would make the planner's job list drift from what
    ``recbench -m`` really launches, so this calls the same internal code the launcher runs
    (hydra-core is pinned in pyproject.toml).
    Imported here, not at module level: Hydra's internals load only when a sweep is planned."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import create_config_search_path
    from hydra.core.override_parser.overrides_parser import OverridesParser

    search_path = create_config_search_path(CONFIG_DIR)
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


def build_plan(preset: str, overrides: Sequence[str], sweep_id: Optional[str] = None) -> SweepPlan:
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
    plan = SweepPlan(preset, sweep_id or default_sweep_id(preset, overrides), [g for g in grids if g.jobs],
                     default_jobs=int(meta.get("jobs", 1)))
    plan.jobs_total = sum(len(g.jobs) for g in plan.grids)
    return plan


def _selects_config(override: str, groups: Sequence[str]) -> bool:
    """Does ``override`` choose a config (``method=qr``, ``+model=dcn``, ``hydra/launcher=...``,
    ``hydra.searchpath=...``) rather than set a value (``budget.compression_ratio=0.1``, ``seed=1``)?"""
    key = override.split("=", 1)[0].lstrip("+~")
    return key.split("@", 1)[0] in groups or "/" in key or key.startswith("hydra")


def _job_configs(jobs: Sequence[List[str]]):
    """Compose every job: once per set of config choices (method, dataset, model, the preset, ...),
    then each job's value overrides (budget, seed, ...) applied to a copy of that composition by
    Hydra's own code, as Hydra applies them after composing (``ConfigLoaderImpl``: value overrides
    come last, in struct mode, checked against the structured configs). A grid of 6 budgets x 3 seeds
    per method composes once per method (tests/cli/test_sweep.py compares every job with a direct
    composition)."""
    import copy

    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from recbench.runs.config import ConfigError, groups

    names = list(groups())
    parser = OverridesParser.create()
    cache: Dict[Tuple[str, ...], Any] = {}
    for job in jobs:
        chosen = tuple(o for o in job if _selects_config(o, names))
        try:
            if chosen not in cache:
                cache[chosen] = _compose(chosen)
            cfg = copy.deepcopy(cache[chosen])
            ConfigLoaderImpl._apply_overrides_to_config(
                parser.parse_overrides([o for o in job if not _selects_config(o, names)]), cfg)
        except (HydraException, OmegaConfBaseException) as exc:  # a key or value of the grid the configs refuse
            reason = "; ".join(line.strip() for line in str(exc).strip().splitlines() if line.strip())
            raise ConfigError(f"the job `{' '.join(job)}` does not compose: {reason}") from exc
        yield job, cfg


def check_plan(plan: SweepPlan) -> SweepPlan:
    """Prepare each protocol's dataset and MLflow experiment once; count already-FINISHED jobs and
    price the others (``CostBook``)."""
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
                tracker = instantiate_tracker(cfg)
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
    return repr(parse_ratio(ratio))


def _finished_runs(tracker, experiment: str) -> CostBook:
    """The FINISHED runs of ``experiment`` as a ``CostBook`` (creating the experiment if missing)."""
    book = CostBook()
    if not hasattr(tracker, "experiment_id"):
        return book
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
