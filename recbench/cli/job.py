"""One job: prepare the protocol, solve the budget, build, train, evaluate, track.

Everything a Hydra job does lives here so that tests can call ``run_job(cfg)`` on a composed
config without a launcher. The CLI (``recbench``) is a thin Hydra wrapper around it.

References: DESIGN.md sections 2, 4, 5 and 8.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from recbench.checks import check_number
from recbench.install_check import software_versions
from recbench.methods import budget as budget_lib
from recbench.methods.base import InfeasibleBudget
from recbench.tracking.base import FAILED, FINISHED, KILLED, InMemoryTracker, flatten, owner_tags, with_thread_count
from recbench.tracking.stage_artifacts import jsonable, write_stage_result
from recbench.training.inference_cost import inference_cost
from recbench.training import checkpoint, distributed
from recbench.training.optim import DenseOptimizer
from recbench.training.trainer import Trainer, TrainerConfig
from recbench.types import Budget, EmbeddingOptimizer, full_embedding_bytes, settings_hash

log = logging.getLogger("recbench")

#: resolved-config keys that do not change what a run measures (excluded from its config hash).
#: ``trainer.num_threads`` changes the order of float reductions: the first steps differ at float
#: tolerance and training can grow that into a difference of the size of seed noise (synthetic
#: ``tt_rec`` 0.1, seed 1: test AUC 0.7606 with 1 thread, 0.7564 with 2). Runs with other counts are
#: equally valid samples of the same job (so a 1-job and a 2-job sweep share finished runs), and each
#: run records its count (tag ``num_threads``, and in its ``command``) so that it repeats bit for bit.
#: ``dataset.raw_dir`` is where a generated dataset is written (derived from ``paths.data_root``: a
#: relative and an absolute data root gave one configuration two hashes). Adding a key here changes
#: recorded runs' hashes: re-tag them with ``python -m recbench.tracking.rehash``.
NON_NUMERIC_KEYS = ("tracking", "paths", "sweep_id", "sweep_preset", "trainer.progress", "trainer.num_threads",
                    "trainer.resume", "trainer.checkpoint_every_steps", "trainer.log_every_steps",
                    "trainer.search_cache_mb", "dataset.raw_dir", "hydra")
#: keys added after runs were recorded, whose default leaves the numbers unchanged: they enter the
#: config hash only when set to something else, so adding an option never orphans finished runs
#: (a re-launched sweep still recognises them, and the report keeps them in one row)
#: ``dataset.row_order``: runs recorded before the key existed numbered rows by frequency, so a
#: ``row_order=frequency`` run hashes as they do (and its protocol id is theirs)
OPTIONAL_KEYS = {"trainer.distributed": (None, False), "trainer.sharding_types": (None,),
                 "dataset.row_order": ("frequency",),
                 # hashing's per-field layout is the layout its runs had before the key existed
                 # (a method whose numbers change with a new key's default bumps its revision)
                 "method.layout": ("per_field",),
                 # pruned tables were always charged at their compact storage before the key existed
                 "budget.sparse_index": ("compact",)}
#: degenerate-run rule (DESIGN.md section 4)
DEGENERATE_AUC_MARGIN = 0.01


class ConfigError(ValueError):
    """An impossible configuration value (reported before any run is recorded)."""


@dataclass
class JobResult:
    status: str  # finished | infeasible | failed | skipped
    metrics: Dict[str, float]
    run_id: Optional[str]
    reason: str = ""
    under_budget: bool = False  # the solved ratio is below (1 - tolerance) x the requested one (tag ``under_budget``)


def _drop(mapping: Dict[str, Any], dotted: str) -> None:
    head, _, rest = dotted.partition(".")
    if head in mapping:
        if rest:
            if isinstance(mapping[head], dict):
                _drop(mapping[head], rest)
        else:
            del mapping[head]


def _lookup(mapping: Dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        if not isinstance(mapping, dict) or part not in mapping:
            return None
        mapping = mapping[part]
    return mapping


def method_revision(resolved: Dict[str, Any]) -> int:
    """The ``revision`` of the config's method class (1 when it has none or the config has no method)."""
    target = _lookup(resolved, "method._target_")
    if not target:
        return 1
    from hydra.utils import get_class
    return int(getattr(get_class(str(target)), "revision", 1))


def config_hash(resolved: Dict[str, Any], ignore: tuple = (), revision: Optional[int] = None) -> str:
    """Hash of the settings that change a run's numbers, including the method's code revision
    when it is above 1 (``CompressionMethod.revision``): runs of an older revision are not "finished".
    ``revision`` overrides the current code's (re-hashing a recorded run: the revision it ran with)."""
    trimmed = json.loads(json.dumps(resolved, default=str))
    for key in NON_NUMERIC_KEYS + tuple(ignore):
        _drop(trimmed, key)
    for key, defaults in OPTIONAL_KEYS.items():
        if _lookup(trimmed, key) in defaults:
            _drop(trimmed, key)
    if revision is None:
        revision = method_revision(resolved)
    if revision > 1:
        trimmed["method_revision"] = revision
    return settings_hash(trimmed, length=16)


def group_hash(resolved: Dict[str, Any], revision: Optional[int] = None) -> str:
    """The config hash without the seed: runs sharing it are seeds of one leaderboard row."""
    return config_hash(resolved, ignore=("seed",), revision=revision)


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def instantiate_without(cfg: DictConfig, drop=("protocol", "name"), **kwargs: Any) -> Any:
    """Instantiate a component config, leaving out keys that are not constructor arguments."""
    container = OmegaConf.to_container(cfg, resolve=True)
    for key in drop:
        container.pop(key, None)
    return instantiate(container, **kwargs)


def instantiate_dataset(cfg: DictConfig):
    """The dataset protocol of ``cfg``; a bad setting is the protocol's own one-line error
    (``DatasetError``/``ConfigError``), not Hydra's wrapping of it."""
    from hydra.errors import InstantiationException

    from recbench.datasets.base import DatasetError

    try:
        return instantiate_without(cfg.dataset)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, DatasetError):
            raise cause from None
        if isinstance(cause, (ValueError, TypeError)):
            raise ConfigError(f"dataset {cfg.dataset.get('name')!r}: {cause}") from None
        raise


def configure_threads(cfg: DictConfig) -> int:
    threads = cfg.trainer.get("num_threads") or int(os.environ.get("RECBENCH_NUM_THREADS", 0)) or os.cpu_count() or 1
    torch.set_num_threads(int(threads))
    return int(threads)


def command_with_threads(command: str, threads: int) -> str:
    """``command`` with the torch thread count the job ran with, unless it sets one already (the
    count is not in the config hash, see ``NON_NUMERIC_KEYS``)."""
    return shlex.join(with_thread_count(shlex.split(command), threads))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


def protocol_tag(dataset_protocol_id: str, resolved: Dict[str, Any]) -> str:
    """Dataset protocol id + hash of the frozen training protocol (model, trainer, optimizer, and
    the MoE gate when the model has one)."""
    training = {k: resolved.get(k) for k in ("model", "trainer", "optimizer")}
    if "gate" in resolved:
        training["gate"] = resolved["gate"]
    trimmed = json.loads(json.dumps(training, default=str))
    # the keys that never change a run's numbers (one list: NON_NUMERIC_KEYS), and how a run is
    # parallelised (a 2-rank run of the protocol is the same protocol)
    for key in (*NON_NUMERIC_KEYS, *OPTIONAL_KEYS):
        _drop(trimmed, key)
    return f"{dataset_protocol_id}/{settings_hash(trimmed, 8)}"


def gate_tags(cfg: DictConfig) -> Dict[str, str]:
    """Tags of a mixture-of-experts run's gate (none for models without one)."""
    if cfg.get("gate") is None:
        return {}
    return {"gate": str(cfg.gate.name), "gate_k": str(cfg.gate.get("k")),
            "gate_local_search": str(bool(cfg.gate.get("local_search", False))).lower()}


def model_label(cfg: DictConfig) -> str:
    """The model's name in run names: ``dcn``, or ``dcn_moe[comet+ls]`` with its gate."""
    name = cfg.model.get("name", "model")
    if cfg.get("gate") is None:
        return name
    return f"{name}[{cfg.gate.name}{'+ls' if cfg.gate.get('local_search', False) else ''}]"


def run_job(cfg: DictConfig, tracker=None, extra_tags: Optional[Dict[str, str]] = None) -> JobResult:
    """Run one job end to end; never raises for a bad method/budget/training failure once the
    tracker run exists (the run is recorded as FAILED with its reason and the error re-raised
    only for configuration errors before tracking starts). ``extra_tags`` (e.g. the Hydra
    overrides and the command that reproduces the job) are added to the run's tags."""
    settings_of(cfg)  # every value in range before anything is prepared or recorded
    threads = configure_threads(cfg)
    parallel = distributed.current()  # one process, or this rank of a torchrun job (trainer.distributed)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    chash = config_hash(resolved)
    protocol = instantiate_dataset(cfg)
    prepared = parallel.first(lambda: protocol.prepare(Path(cfg.paths.data_root)))  # rank 0 builds the cache
    spec = prepared.spec
    check_against_data(cfg, spec)
    experiment = spec.protocol_id
    tracker = tracker if tracker is not None else instantiate_without(cfg.tracking, drop=("skip_finished",))
    if not parallel.is_main:  # rank 0 records the run
        tracker = InMemoryTracker()
    run_dir = Path(cfg.paths.run_root) / chash
    run_dir.mkdir(parents=True, exist_ok=True)
    # one process per job: a second launch of the same job waits here until the first ends, then
    # finds its FINISHED run (skip) or its checkpoint (resume); rank 0 holds it for a distributed job
    with (job_lock(run_dir, chash) if parallel.is_main else nullcontext()):
        if parallel.is_main:
            closed = tracker.close_orphans(experiment)
            if closed:
                log.info("closed %d run(s) of %s left RUNNING by killed processes (now KILLED, with the reason)",
                         closed, experiment)
        if cfg.tracking.get("skip_finished", False):
            done = parallel.broadcast(tracker.find_finished(experiment, chash) if parallel.is_main else None)
            if done:
                log.info("skipping: a FINISHED run with config hash %s exists (%s)", chash, done)
                return JobResult("skipped", {}, done, "already finished with the same resolved config")
        return _run_locked(cfg, prepared, tracker, run_dir, resolved, chash, threads, extra_tags)


@contextmanager
def job_lock(run_dir: Path, chash: str) -> Iterator[None]:
    """An exclusive lock on ``run_dir/job.lock`` for one job (config hash ``chash``); waits, saying
    so once, while another process holds it. The lock dies with its process (flock)."""
    import fcntl

    with open(run_dir / "job.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            log.warning("job %s is running in %s; waiting for it to end", chash, owner)
            fcntl.flock(handle, fcntl.LOCK_EX)
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_locked(cfg: DictConfig, prepared, tracker, run_dir: Path, resolved: Dict[str, Any], chash: str,
                threads: int, extra_tags: Optional[Dict[str, str]]) -> JobResult:
    """``run_job`` once the job's lock is held: resume or start the run, train, record."""
    spec = prepared.spec
    experiment = spec.protocol_id
    parallel = distributed.current()
    checkpoint_path = distributed.rank_checkpoint(run_dir / "checkpoint.pt")  # one file per rank when distributed
    if parallel.is_main:  # half-written checkpoints of killed processes (this job's lock is held)
        for stale in run_dir.glob("checkpoint*.tmp-*"):
            stale.unlink(missing_ok=True)
    run_id_file = run_dir / "run_id.txt"
    resume_id = None
    if cfg.trainer.get("resume", True) and checkpoint_path.is_file() and run_id_file.is_file():
        resume_id = run_id_file.read_text().strip() or None
        if resume_id and parallel.is_main and not tracker.has_run(resume_id):
            # the store lost the run (replaced, restored from an export): the checkpoint resumes
            # into a new run that names the old id; its metric history starts at the checkpoint
            log.warning("run %s named by %s is not in the store; its checkpoint resumes into a new run",
                        resume_id, run_id_file)
            extra_tags = {**(extra_tags or {}), "resumed": "true", "resumed_from_run_id": resume_id}
            resume_id = None
        problem = checkpoint.unreadable(checkpoint_path)
        if problem:  # damaged: the run restarts (a new MLflow run); the killed one is closed with the reason
            aside = checkpoint.set_aside(checkpoint_path)
            reason = f"its checkpoint {checkpoint_path} is unreadable ({problem}); moved to {aside.name}; restarted"
            log.warning("cannot resume: %s", reason)
            if resume_id and parallel.is_main:
                tracker.start_run(experiment, "", {}, {}, resume_run_id=resume_id)
                tracker.set_tags({"status": "killed", "status_reason": f"killed, and {reason}"})
                tracker.end_run(KILLED)
            resume_id = None
    elif checkpoint_path.exists():
        checkpoint_path.unlink()

    method_name = cfg.method.name
    model_name = cfg.model.get("name", "model")
    ratio = float(cfg.budget.compression_ratio)
    tags = {
        "method": method_name, "model": model_name, "dataset": spec.name, "protocol": protocol_tag(spec.protocol_id, resolved),
        "dataset_protocol_id": spec.protocol_id, "compression_ratio": f"{ratio:g}", "seed": str(cfg.seed),
        "sweep_id": str(cfg.sweep_id), "git_commit": git_commit(), "software": software_versions(), "config_hash": chash,
        "group_hash": group_hash(resolved), "method_revision": str(method_revision(resolved)), "status": "running", **gate_tags(cfg), **(extra_tags or {}),
    }
    run_name = f"{method_name}@{ratio:g}/{model_label(cfg)}/{spec.name}/s{cfg.seed}"
    tags.update(owner_tags())  # host/pid: a run left RUNNING by a killed process is recognisable
    tags["num_threads"] = str(threads)
    if "command" in tags:
        tags["command"] = command_with_threads(tags["command"], threads)
    tags["world_size"] = str(parallel.world_size)
    run_id = tracker.start_run(experiment, run_name, tags, flatten(resolved), resume_run_id=resume_id)
    if resume_id:
        tracker.set_tags({**owner_tags(), "status": "running", "resumed": "true"})
        tracker.skip_steps = tracker.logged_steps(run_id) if parallel.is_main else {}
    if parallel.is_main:
        run_id_file.write_text(str(run_id))
    try:
        result = _train_and_evaluate(cfg, prepared, tracker, checkpoint_path, resolved)
    except InfeasibleBudget as exc:
        tracker.set_tags({"status": "infeasible", "status_reason": str(exc)})
        tracker.log_metrics({"budget/requested_ratio": ratio, "budget/min_reachable_ratio": exc.min_ratio,
                             "budget/max_reachable_ratio": exc.max_ratio})
        tracker.end_run(FINISHED)
        log.warning("infeasible: %s", exc)
        return JobResult("infeasible", {}, run_id, str(exc))
    except BaseException as exc:  # recorded, then re-raised so the launcher sees the failure
        reason = f"{type(exc).__name__}: {exc}"
        tracker.set_tags({"status": "failed", "status_reason": reason[:5000]})
        _log_text_artifact(tracker, "traceback.txt", traceback.format_exc())
        tracker.end_run(FAILED)
        raise
    metrics, reason, under = result
    status = "failed" if reason else "finished"
    tracker.set_tags({"status": status, "status_reason": reason,
                      "achieved_ratio": f"{metrics.get('emb/compression_ratio', float('nan')):.6g}"})
    tracker.end_run(FAILED if reason else FINISHED)
    if checkpoint_path.exists():
        checkpoint_path.unlink()  # the run is complete; its checkpoint is no longer needed
    return JobResult(status, metrics, run_id, reason, under)


def _log_stage(tracker, index: int, name: str, result: Dict[str, Any]) -> None:
    """A finished stage's result (masks, chosen dims, thresholds, ...) as artifacts of the run."""
    with tempfile.TemporaryDirectory() as tmp:
        for path in write_stage_result(Path(tmp), index, name, result):
            tracker.log_artifact(path)


def _log_text_artifact(tracker, name: str, text: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(text)
        tracker.log_artifact(path)


def settings_of(cfg: DictConfig):
    """Validated (Budget, EmbeddingOptimizer, DenseOptimizer, TrainerConfig) of a job's config.

    Called before anything is prepared or tracked, so an impossible value (a ratio outside (0, 1],
    an unknown optimizer kind, a zero batch size) is a clear error and no half-recorded run."""
    try:
        budget = Budget(**OmegaConf.to_container(cfg.budget, resolve=True))
        embedding_optimizer = EmbeddingOptimizer(**OmegaConf.to_container(cfg.optimizer.embedding, resolve=True))
        dense_optimizer = DenseOptimizer(**OmegaConf.to_container(cfg.optimizer.dense, resolve=True))
        trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
        for key in ("resume", "num_threads", "distributed", "sharding_types"):
            trainer_kwargs.pop(key, None)
        check_number("seed", cfg.seed, integer=True, low=0)
        trainer_config = TrainerConfig(seed=cfg.seed, **trainer_kwargs)
        if cfg.trainer.get("num_threads") is not None:
            check_number("trainer.num_threads", cfg.trainer.num_threads, integer=True, low=1)
        check_number("model.embedding_dim", cfg.model.embedding_dim, integer=True, low=4)
        if cfg.model.embedding_dim % 4:
            raise ValueError(f"model.embedding_dim must be a multiple of 4 (FBGEMM tables), got {cfg.model.embedding_dim}")
        _check_gate(cfg)
    except TypeError as exc:  # an unknown key in a config group
        raise ConfigError(f"unknown setting: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    try:  # hyperparameters only: cheap, and an unknown or ill-typed method setting fails here
        instantiate(cfg.method)
    except Exception as exc:
        cause = exc.__cause__ or exc
        raise ConfigError(f"method {cfg.method.get('name')!r}: {type(cause).__name__}: {cause}") from exc
    distributed.check_settings(bool(cfg.trainer.get("distributed", False)), cfg.trainer.get("sharding_types"))
    return budget, embedding_optimizer, dense_optimizer, trainer_config


def _check_gate(cfg: DictConfig) -> None:
    """A gate only with a mixture-of-experts model, and its k within the model's experts."""
    model = cfg.model.get("name", "model")
    experts = cfg.model.get("num_experts")
    if cfg.get("gate") is None:
        return
    if experts is None:
        raise ValueError(f"gate={cfg.gate.get('name')} needs a mixture-of-experts model (model=dcn_moe or "
                         f"model=dlrm_moe); model={model} has no gate")
    check_number("model.num_experts", experts, integer=True, low=1)
    if cfg.gate.get("k") is not None:
        check_number("gate.k", cfg.gate.k, integer=True, low=1, high=experts)


def check_against_data(cfg: DictConfig, spec) -> None:
    """Settings that can only be checked against the prepared dataset (before any run is recorded):
    the model's tasks are targets the dataset has, and the full tables fit in this machine's memory."""
    from recbench.training.tasks import CLICK

    tasks = list(cfg.model.get("tasks") or [CLICK])
    unknown = [t for t in tasks if t != CLICK and t not in spec.extra_targets]
    if unknown:
        raise ConfigError(f"model.tasks names {unknown}, which {spec.name} does not have; allowed: "
                          f"{[CLICK, *spec.extra_targets]}")
    # a lower bound of what any method's job holds at once: the uncompressed tables (every method
    # starts from or is charged against them) and the pooled embeddings (B, F, D) of one eval batch
    dim = int(cfg.model.embedding_dim)
    pooled = int(cfg.trainer.eval_batch_size) * len(spec.tables) * dim * 4
    needed = full_embedding_bytes(spec.tables, dim) + pooled
    available = _physical_memory()
    if available and needed > available:
        raise ConfigError(f"model.embedding_dim={dim}: {spec.name}'s uncompressed tables plus one evaluation batch "
                          f"(trainer.eval_batch_size={cfg.trainer.eval_batch_size}) need at least "
                          f"{needed / 2**30:,.1f} GiB, more than this machine's {available / 2**30:,.1f} GiB of memory")


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def budget_verdict(cfg: DictConfig, spec) -> Tuple[Optional[str], bool]:
    """The method's budget solver's verdict on a job, without building or training anything:
    ``(reason, under_budget)``. ``reason`` is the ``InfeasibleBudget`` message when nothing the
    method can build fits under the budget on the dataset ``spec``'s tables, else None;
    ``under_budget`` says that the solution lands below (1 - tolerance) x the target (the job runs
    it, flagged). The job itself reaches the same verdict in ``_train_and_evaluate`` (same
    ``method.solve`` call) and records a ``status=infeasible`` run or an ``under_budget`` one."""
    budget = settings_of(cfg)[0]
    method, tables, dim = instantiate(cfg.method), list(spec.tables), int(cfg.model.embedding_dim)
    try:
        hparams = method.solve(tables, dim, budget)
    except InfeasibleBudget as exc:
        return str(exc), False
    return None, budget_lib.under_budget(method.memory(tables, dim, hparams).compression_ratio, budget)


def _train_and_evaluate(cfg: DictConfig, prepared, tracker, checkpoint_path: Path, resolved: Dict[str, Any]):
    # the run's cost, robust to machine load: CPU seconds (every thread) and wall seconds from building
    # the method to the final metrics; a resumed run adds what its killed processes had spent up to the
    # checkpoint it resumed from (carried in the checkpoint; see Trainer's ``cost_clock``)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    spec = prepared.spec
    method = instantiate(cfg.method)
    reason = method.compatible_with(cfg.model.get("name", ""))
    if reason:
        raise ValueError(f"method {method.name!r} cannot be used with model {cfg.model.get('name')!r}: {reason}")
    budget, embedding_optimizer, dense_optimizer, trainer_config = settings_of(cfg)
    dim = int(cfg.model.embedding_dim)
    tables = list(spec.tables)
    hparams = method.solve(tables, dim, budget)
    closed_form = method.memory(tables, dim, hparams, embedding_optimizer)
    tracker.log_metrics({"budget/requested_ratio": budget.compression_ratio,
                         "budget/solved_ratio": closed_form.compression_ratio})
    # the method's best configuration under the budget lands below (1 - tolerance) x the target:
    # the run goes ahead at the ratio it reaches, flagged (DESIGN.md section 3, "Budget and memory")
    under = budget_lib.under_budget(closed_form.compression_ratio, budget)
    tracker.set_tags({"under_budget": str(under).lower()})
    if under:
        log.warning("under budget: %s's best configuration under ratio %g reaches %.4g (< %g x the target)",
                    method.name, budget.compression_ratio, closed_form.compression_ratio, 1 - budget.tolerance)
    if hparams:
        tracker.set_tags({f"hparam.{k}": v for k, v in flatten(hparams).items()})

    seed_everything(int(cfg.seed))
    embedding = method.build(tables, dim, budget, embedding_optimizer)
    injected = {"gate": instantiate_without(cfg.gate, drop=(), _partial_=True)} if cfg.get("gate") is not None else {}
    model = instantiate_without(cfg.model, embedding=embedding, num_dense=spec.num_dense, num_sparse=len(tables),
                                **injected)
    parallel = distributed.current()
    model = parallel.wrap(model, method, cfg.trainer.get("sharding_types"))  # DMP + DDP when distributed
    trainer = Trainer(trainer_config, model, method, prepared,
                      dense_optimizer, embedding_optimizer, log_metrics=tracker.log_metrics,
                      checkpoint_path=checkpoint_path,
                      log_stage=lambda *stage: _log_stage(tracker, *stage), parallel=parallel,
                      cost_clock=(cpu_start, wall_start))
    result = trainer.fit()
    model = trainer.model  # after a distributed run: the unsharded model the final evaluation used
    metrics = dict(result.metrics)
    measured = model.embedding.memory_report()
    metrics["emb/closed_form_matches"] = float(measured.inference_bytes == closed_form.inference_bytes)
    metrics["budget/requested_ratio"] = budget.compression_ratio
    metrics.update(inference_cost(model, prepared, trainer_config.eval_batch_size))
    for key, value in spec.extras.items():
        if key.startswith("bayes_") and isinstance(value, (int, float)):
            metrics[f"bayes/{key[len('bayes_'):]}"] = float(value)
    # what the cache was built from, kept with the run: sources (sha256), data lines and the malformed
    # lines a text build skipped (count + the first ones with file:line), positive rates, split rule
    for key in ("data_lines", "malformed_lines"):
        if isinstance(spec.extras.get(key), (int, float)):
            metrics[f"data/{key}"] = float(spec.extras[key])
    if spec.extras:
        _log_text_artifact(tracker, "dataset_facts.json", json.dumps(jsonable(dict(spec.extras)), indent=1))
    if "bayes/test_auc" in metrics:
        metrics["test/auc_gap_to_bayes"] = metrics["bayes/test_auc"] - metrics["test/auc"]
    metrics.update({f"run/{key}": value for key, value in trainer.cost_so_far().items()})
    if trainer.cost_before_resume["cpu_seconds"]:
        metrics["run/cpu_seconds_before_resume"] = trainer.cost_before_resume["cpu_seconds"]
    tracker.log_metrics(metrics, step=result.history[-1]["step"] if result.history else 0)
    reason = ""
    auc = metrics["test/auc"]
    if not np.isfinite(auc):
        reason = "test AUC is NaN after training"
    elif abs(auc - 0.5) < DEGENERATE_AUC_MARGIN:
        reason = f"test AUC {auc:.4f} is within {DEGENERATE_AUC_MARGIN} of 0.5 (degenerate model)"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True))
        (Path(tmp) / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
        (Path(tmp) / "stages.json").write_text(json.dumps(jsonable(result.stage_results), indent=2))
        (Path(tmp) / "solved_hparams.json").write_text(json.dumps(hparams, indent=2, default=str))
        for name in ("metrics.json", "config.yaml", "stages.json", "solved_hparams.json"):
            tracker.log_artifact(Path(tmp) / name)
    return metrics, reason, under


RESULT_KEYS = [
    ("val/auc", "val AUC", "{:.4f}"), ("test/auc", "test AUC", "{:.4f}"), ("test/logloss", "test log loss", "{:.4f}"),
    ("bayes/test_auc", "Bayes-optimal test AUC", "{:.4f}"), ("test/auc_gap_to_bayes", "gap to Bayes AUC", "{:.4f}"),
    ("emb/compression_ratio", "compression ratio", "{:.4g}"), ("emb/bytes_inference", "embedding bytes (inference)", "{:,.0f}"),
    ("emb/bytes_training", "embedding bytes (training)", "{:,.0f}"), ("train/samples_per_s", "train samples/s", "{:,.0f}"),
    ("test/rating_mse", "test rating MSE", "{:.4f}"), ("infer/flops_per_sample", "FLOPs per sample", "{:,.0f}"),
    ("moe/experts_computed_per_sample", "experts computed per sample", "{:.2f}"),
    ("infer/latency_ms", "latency, batch 4096 (ms)", "{:.2f}"), ("infer/latency_ms_single", "latency, 1 request (ms)", "{:.3f}"),
    ("sys/peak_rss_mb", "peak RSS (MB)", "{:,.0f}"),
]


def format_result(cfg: DictConfig, result: JobResult) -> str:
    """A plain-text result table for the end of a run."""
    title = f"{cfg.method.name} @ ratio {float(cfg.budget.compression_ratio):g} | {cfg.model.get('name')} | seed {cfg.seed}"
    lines = [title, "-" * len(title), f"{'status':<30} {result.status}"]
    if result.under_budget:
        lines.append(f"{'under budget':<30} yes: the best configuration under the budget lands below "
                     f"{1 - float(cfg.budget.tolerance):g} x the requested ratio")
    if result.reason:
        lines.append(f"{'reason':<30} {result.reason}")
    for key, label, fmt in RESULT_KEYS:
        if key in result.metrics:
            lines.append(f"{label:<30} {fmt.format(result.metrics[key])}")
    if result.run_id:
        lines.append(f"{'MLflow run':<30} {result.run_id}")
    return "\n".join(lines)
