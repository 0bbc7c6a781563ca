"""One job: check the settings, prepare the protocol, solve the budget, build, train, evaluate,
track. ``run_job(cfg)`` runs a composed config without a launcher; ``recbench`` (the CLI) and
``recbench-sweep`` are thin Hydra shells around it.

References: docs/architecture.md ("Layers", "Budget rule", "Evaluation", "Tracking schema and protocols").
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import fcntl
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from recbench.install_check import software_versions
from recbench.methods.base import InfeasibleBudget
from recbench.runs.identity import (config_hash, gate_tags, git_commit, git_sha, group_hash, method_revision, model_label,
                                     protocol_tag)
from recbench.runs.result import JobResult
from recbench.runs.run_plots import (CURVES_PNG, MEMORY_PNG, PLOTS_DIR, CurveRecorder, learning_curves,
                                     memory_breakdown)
from recbench.runs.settings import (JobSettings, check_against_data, instantiate_dataset, instantiate_tracker,
                                     instantiate_without, settings_of)
from recbench.tracking.base import (FAILED, FINISHED, KILLED, NOTE_TAG, RUN_NAME_TAG, InMemoryTracker, flatten,
                                    owner_tags, with_thread_count)
from recbench.tracking.inputs import dataset_record
from recbench.tracking.schema import ratio_tag
from recbench.types import format_bytes
from recbench.tracking.stage_artifacts import jsonable, write_stage_result
from recbench.training import checkpoint, distributed
from recbench.training.trainer import Trainer

log = logging.getLogger("recbench")

#: degenerate-run rule (docs/architecture.md section 4)
DEGENERATE_AUC_MARGIN = 0.01


def configure_threads(cfg: DictConfig) -> int:
    threads = cfg.runtime.get("num_threads") or usable_cores()
    torch.set_num_threads(int(threads))
    return int(threads)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), the default torch thread count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


def command_with_threads(command: str, threads: int) -> str:
    """``command`` with the torch thread count the job ran with, unless it sets one already (the
    count is not in the config hash, see ``NON_NUMERIC_KEYS``)."""
    return shlex.join(with_thread_count(shlex.split(command), threads))


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))


#: the artifact holding a run's deployable model (``tracking.keep_model=deployable``)
MODEL_ARTIFACT = "model.pt"


def run_job(cfg: DictConfig, tracker=None, extra_tags: Optional[Dict[str, str]] = None,
            keep_model: bool = False) -> JobResult:
    """Run one job end to end; never raises for a bad method/budget/training failure once the
    tracker run exists (the run is recorded as FAILED with its reason and the error re-raised
    only for configuration errors before tracking starts). ``extra_tags`` (e.g. the Hydra
    overrides and the command that reproduces the job) are added to the run's tags.
    ``keep_model``: the result carries the trained model (``JobResult.model``; the Python API)."""
    settings = settings_of(cfg)  # every value in range before anything is prepared or recorded
    threads = configure_threads(cfg)
    parallel = distributed.current()  # one process, or this rank of a torchrun job (runtime.distributed)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    chash = config_hash(resolved)
    protocol = instantiate_dataset(cfg)
    prepared = parallel.first(lambda: protocol.prepare(Path(cfg.paths.data_root)))  # rank 0 builds the cache
    spec = prepared.spec
    check_against_data(cfg, prepared)
    experiment = spec.protocol_id
    tracker = tracker if tracker is not None else instantiate_tracker(cfg)
    if not parallel.is_main:  # rank 0 records the run
        tracker = InMemoryTracker()
    run_dir = Path(cfg.paths.run_root) / chash
    run_dir.mkdir(parents=True, exist_ok=True)
    # one process per job: a second launch of the same job waits here until the first ends, then
    # finds its FINISHED run (skip) or its checkpoint (resume); rank 0 holds it for a distributed job
    with (job_lock(run_dir, chash) if parallel.is_main else nullcontext()):
        if parallel.is_main:  # half-written checkpoints of killed processes (this job's lock is held)
            for stale in run_dir.glob("checkpoint*.tmp-*"):
                stale.unlink(missing_ok=True)
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
        result = _run_locked(cfg, settings, prepared, tracker, run_dir, resolved, chash, threads, extra_tags)
        if not keep_model:
            result.model = None  # the model's memory goes with the job unless the caller asked for it
        return result


@contextmanager
def job_lock(run_dir: Path, chash: str) -> Iterator[None]:
    """An exclusive lock on ``run_dir/job.lock`` for one job (config hash ``chash``); waits, saying
    so once, while another process holds it. The lock dies with its process (flock)."""
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


def _run_locked(cfg: DictConfig, settings: JobSettings, prepared, tracker, run_dir: Path, resolved: Dict[str, Any],
                chash: str, threads: int, extra_tags: Optional[Dict[str, str]]) -> JobResult:
    """``run_job`` once the job's lock is held: resume or start the run, train, record."""
    spec = prepared.spec
    experiment = spec.protocol_id
    parallel = distributed.current()
    checkpoint_path = distributed.rank_checkpoint(run_dir / "checkpoint.pt")  # one file per rank when distributed
    run_id_file = run_dir / "run_id.txt"
    resume_id = None
    if cfg.runtime.get("resume", True) and checkpoint_path.is_file() and run_id_file.is_file():
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
                tracker.set_tags({"status": "killed", "status_reason": f"killed, and {reason}",
                                  NOTE_TAG: f"Killed, and {reason}."})
                tracker.end_run(KILLED)
            resume_id = None
    elif checkpoint_path.exists():
        checkpoint_path.unlink()

    method_name = cfg.method.name
    model_name = cfg.model.get("name", "model")
    ratio = float(cfg.budget.compression_ratio)
    tags = {
        "method": method_name, "model": model_name, "dataset": spec.name, "protocol": protocol_tag(spec.protocol_id, resolved),
        "dataset_protocol_id": spec.protocol_id, "compression_ratio": ratio_tag(ratio), "seed": str(cfg.seed),
        "sweep_id": str(cfg.sweep_id), "git_commit": git_commit(), "software": software_versions(), "config_hash": chash,
        "group_hash": group_hash(resolved), "method_revision": str(method_revision(resolved)), "status": "running", **gate_tags(cfg), **(extra_tags or {}),
    }
    sha = git_sha()
    if sha:  # MLflow's own source tags: the UI shows the commit and where the run came from
        tags.update({"mlflow.source.git.commit": sha, "mlflow.source.name": "recbench", "mlflow.source.type": "JOB"})
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
        if parallel.is_main:  # what the run reads (the UI's "Datasets used"), and this machine's load while it runs
            tracker.log_dataset(dataset_record(spec, prepared.directory, prepared.manifest.get("settings", {})))
            tracker.start_system_metrics(resumed=bool(resume_id))  # until end_run
        result = _train_and_evaluate(cfg, settings, prepared, tracker, checkpoint_path, resolved, run_name)
    except InfeasibleBudget as exc:
        # an infeasible budget is a completed measurement, so the run stays FINISHED: a re-launched
        # sweep skips it (find_finished), and the leaderboard reads its status tag; the UI, which
        # shows FINISHED in green, gets the verdict in the run's name and its description
        tracker.set_tags({"status": "infeasible", "status_reason": str(exc), RUN_NAME_TAG: f"INFEASIBLE {run_name}",
                          NOTE_TAG: f"Infeasible budget (recorded as FINISHED, tag status=infeasible): {exc}"})
        tracker.log_metrics({"budget/requested_ratio": ratio, "budget/min_reachable_ratio": exc.min_ratio,
                             "budget/max_reachable_ratio": exc.max_ratio})
        tracker.end_run(FINISHED)
        log.warning("infeasible: %s", exc)
        return JobResult("infeasible", {}, run_id, str(exc))
    except BaseException as exc:  # recorded, then re-raised so the launcher sees the failure
        reason = f"{type(exc).__name__}: {exc}"
        tracker.set_tags({"status": "failed", "status_reason": reason[:5000], NOTE_TAG: f"Failed: {reason[:5000]}"})
        _log_text_artifact(tracker, "traceback.txt", traceback.format_exc())
        tracker.end_run(FAILED)
        raise
    metrics, reason, under, model = result
    status = "failed" if reason else "finished"
    tracker.set_tags({"status": status, "status_reason": reason,
                      "achieved_ratio": f"{metrics.get('emb/compression_ratio', float('nan')):.6g}",
                      NOTE_TAG: f"Failed: {reason}" if reason else summary_note(metrics, ratio)})
    tracker.end_run(FAILED if reason else FINISHED)
    if checkpoint_path.exists():
        checkpoint_path.unlink()  # the run is complete; its checkpoint is no longer needed
    return JobResult(status, metrics, run_id, reason, under, model)


def summary_note(metrics: Dict[str, float], ratio: float) -> str:
    """A finished run's description (the top of its page in the MLflow UI): its headline numbers, and
    where its curves are (the UI draws every one-point metric as a chart of its own)."""
    value = lambda key: metrics.get(key, float("nan"))  # noqa: E731
    return (f"Test AUC {value('test/auc'):.4f}, log loss {value('test/logloss'):.4f}; embedding "
            f"{format_bytes(value('emb/bytes_inference'))} at compression ratio "
            f"{value('emb/compression_ratio'):.4g} (budget {ratio:g}). Learning curves and memory breakdown: "
            f"artifacts {PLOTS_DIR}/{CURVES_PNG} and {PLOTS_DIR}/{MEMORY_PNG}.")


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


def _log_plots(tracker, folder: Path, history, losses, plan, tables, dim: int, metrics: Dict[str, float],
               title: str) -> None:
    """The run's learning curves and memory breakdown as ``plots/*.png`` (``recbench.runs.run_plots``).
    A figure that cannot be drawn does not fail a trained run: it is a warning and the tag ``plots_error``."""
    try:
        learning_curves(history, losses, folder / CURVES_PNG, title, metrics.get("test/auc"))
        memory_breakdown(plan.memory, tables, dim, plan.requested_ratio, metrics, folder / MEMORY_PNG, title)
    except Exception as exc:  # noqa: BLE001 - reported, and the run's numbers are unaffected
        log.warning("the run's figures could not be drawn (%s: %s); its metrics are recorded", type(exc).__name__, exc)
        tracker.set_tags({"plots_error": f"{type(exc).__name__}: {exc}"[:5000]})
        return
    for name in (CURVES_PNG, MEMORY_PNG):
        tracker.log_artifact(folder / name, PLOTS_DIR)


def budget_verdict(cfg: DictConfig, spec) -> Tuple[Optional[str], bool]:
    """The method's budget solver's verdict on a job, without building or training anything:
    ``(reason, under_budget)``. ``reason`` is the ``InfeasibleBudget`` message when nothing the
    method can build fits under the budget on the dataset ``spec``'s tables, else None;
    ``under_budget`` says that the solution lands below (1 - tolerance) x the target (the job runs
    it, flagged). The job itself reaches the same verdict in ``_train_and_evaluate`` (same
    ``method.solve`` call) and records a ``status=infeasible`` run or an ``under_budget`` one."""
    settings = settings_of(cfg)
    method, budget, tables, dim = settings.method, settings.budget, list(spec.tables), int(cfg.model.embedding_dim)
    try:
        plan = method.solve(tables, dim, budget)
    except InfeasibleBudget as exc:
        return str(exc), False
    return None, plan.under_budget


def _train_and_evaluate(cfg: DictConfig, settings: JobSettings, prepared, tracker, checkpoint_path: Path,
                        resolved: Dict[str, Any], run_name: str = ""):
    # the run's cost, robust to machine load: CPU seconds (every thread) and wall seconds from building
    # the method to the final metrics; a resumed run adds what its killed processes had spent up to the
    # checkpoint it resumed from (carried in the checkpoint; see Trainer's ``cost_clock``)
    cpu_start, wall_start = time.process_time(), time.perf_counter()
    spec = prepared.spec
    method, budget, embedding_optimizer = settings.method, settings.budget, settings.embedding_optimizer
    dim = int(cfg.model.embedding_dim)
    tables = list(spec.tables)
    plan = method.solve(tables, dim, budget, embedding_optimizer)  # the job's one call to the budget solver
    hparams, closed_form = plan.hparams, plan.memory
    tracker.log_metrics({"budget/requested_ratio": plan.requested_ratio,
                         "budget/solved_ratio": plan.achieved_ratio})
    # the method's best configuration under the budget lands below (1 - tolerance) x the target:
    # the run goes ahead at the ratio it reaches, flagged (docs/architecture.md section 3, "Budget and memory")
    under = plan.under_budget
    tracker.set_tags({"under_budget": str(under).lower()})
    if under:
        log.warning("under budget: %s's best configuration under ratio %g reaches %.4g (< %g x the target)",
                    method.name, budget.compression_ratio, closed_form.compression_ratio, 1 - budget.tolerance)
    if hparams:
        tracker.set_tags({f"hparam.{k}": v for k, v in flatten(hparams).items()})

    seed_everything(int(cfg.seed))
    parallel = distributed.current()
    with parallel.building():  # distributed: tables on the meta device; wrap allocates this rank's shards
        embedding = method.build(tables, dim, plan, embedding_optimizer)
    injected = {"gate": instantiate_without(cfg.gate, drop=(), _partial_=True)} if cfg.get("gate") is not None else {}
    model = instantiate_without(cfg.model, embedding=embedding, num_dense=spec.num_dense, num_sparse=len(tables),
                                **injected)
    model = parallel.wrap(model, method, cfg.runtime.get("sharding_types"))  # DMP + DDP when distributed
    curves = CurveRecorder(tracker.log_metrics)  # the training loss it passes on, for the learning-curve figure
    trainer = Trainer(settings.trainer, model, method, prepared,
                      settings.dense_optimizer, embedding_optimizer, log_metrics=curves,
                      checkpoint_path=checkpoint_path,
                      log_stage=lambda *stage: _log_stage(tracker, *stage), parallel=parallel,
                      cost_clock=(cpu_start, wall_start))
    result = trainer.fit()
    # what the test metrics measured (distributed: the model gathered on rank 0; the other ranks hold shards)
    model = trainer.deployable_model() if parallel.is_main else None
    metrics = dict(result.metrics)
    # the trainer's final evaluation measured the memory of the module it evaluated (emb/bytes_inference)
    metrics["emb/closed_form_matches"] = float(metrics["emb/bytes_inference"] == closed_form.inference_bytes)
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
        if parallel.is_main:
            _log_plots(tracker, Path(tmp), result.history, curves.losses, plan, tables, dim, metrics, run_name)
        if cfg.tracking.get("keep_model", "deployable") == "deployable" and parallel.is_main:
            # the whole deployable model (a pickle: recbench.load_run reads it back, as
            # mlflow.pytorch.load_model would; load only runs you trust)
            torch.save(model, Path(tmp) / MODEL_ARTIFACT)
            tracker.log_artifact(Path(tmp) / MODEL_ARTIFACT)
    return metrics, reason, under, model
