"""The only training loop: stages, hooks, evaluation, early stopping, checkpoints and timing.

A method's ``stages()`` list what to run; ``kind="train"`` stages run this loop,
``kind="search"`` stages call their ``run(context)``. Hooks (``on_step_end``, ``on_eval_end``, ...)
drive schedules and may request the current stage to end. Methods never subclass the trainer.

Stage results and resume. A stage's result is the dict its ``run`` returns (search) or the loop's
summary (train: best val AUC, steps, epochs), updated with the mappings the hooks' ``on_stage_end``
return (masks, thresholds, chosen dims: whatever the next stage needs), plus its wall time
``seconds``. Scalars are logged as ``stage/<name>/<key>`` metrics, the whole result is handed to
``log_stage`` (the job writes it as MLflow artifacts). When a stage ends and another follows, the
method's ``rebuild(module, result)`` builds the next stage's module at once and the checkpoint
written then holds the rebuilt module's state, the next stage index and every stage result. A
resumed run replays the ``rebuild`` chain on the freshly built module (``rebuild`` must derive the
module's structure from the result alone), loads the state and continues: finished stages never
run again. Checkpoints inside a train stage (``checkpoint_every_steps``) resume mid-stage.
Rebuilds go through the process strategy (``parallel.rebuild``: distributed, the model is
released from DMP/DDP, rebuilt and wrapped again), and a finished stage's result and replicated
state are checked to be the same on every rank (``parallel.check_replicas``).

Search stages score many candidates on validation with every parameter frozen;
``context.search_evaluation(split)`` (``recbench.training.search_cache``) evaluates them over batches
and candidate-independent model outputs computed once (within ``search_cache_mb``), with the
scores ``evaluate`` gives. Training and every other evaluation do not use it.

Protocol (docs/architecture.md section 4): exact AUC over the whole split; validation ``evals_per_epoch``
times per epoch; early stopping on validation AUC; the test split is evaluated once, on the best
validation checkpoint, with the embedding's deployable form (``to_inference``).

References: docs/architecture.md sections 3 ("Stages and hooks"), 4 and 6.
"""
from __future__ import annotations

import copy
import logging
import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from recbench.checks import check_number
from recbench.datasets.batching import BatchIterator, RecBatch, make_batch
from recbench.datasets.storage import PreparedDataset
from recbench.methods.blocks.collisions import collision_rates
from recbench.models.common import ModelParamGroups
from recbench.training import memory_split
from recbench.training.checkpoint import checkpointable, load_checkpoint, save_checkpoint
from recbench.training.distributed import SingleProcess
from recbench.training.inference_cost import CostCounter
from recbench.training.evaluation import binary_metrics
from recbench.training.optim import DenseOptimizer, build_optimizers
from recbench.training.search_cache import MB, SearchEvaluation
from recbench.models.tasks import (CLICK, collect_predictions, regression_metrics, split_task_metrics,
                                     training_loss)
from recbench.types import EmbeddingOptimizer, Stage, format_duration

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class TrainerConfig:
    """Training hyperparameters (frozen per protocol; see docs/architecture.md section 4 ("Protocols"))."""

    max_epochs: float = 1.0
    max_steps: Optional[int] = None
    batch_size: int = 256
    eval_batch_size: int = 16384
    evals_per_epoch: int = 2
    patience: int = 3
    min_delta: float = 0.0
    checkpoint_every_steps: int = 0
    log_every_steps: int = 50
    latency_batch_size: int = 4096
    latency_repeats: int = 10
    seed: int = 0
    progress: bool = True
    #: memory cap (MB) of a search stage's stored validation batches and memos (0: never cached)
    search_cache_mb: float = 512.0

    def __post_init__(self) -> None:
        for key in ("batch_size", "eval_batch_size", "evals_per_epoch", "patience", "log_every_steps",
                    "latency_batch_size", "latency_repeats"):
            check_number(f"trainer.{key}", getattr(self, key), integer=True, low=1)
        check_number("trainer.checkpoint_every_steps", self.checkpoint_every_steps, integer=True, low=0)
        check_number("trainer.seed", self.seed, integer=True, low=0)
        check_number("trainer.max_epochs", self.max_epochs, low=0)
        check_number("trainer.min_delta", self.min_delta, low=0)
        check_number("trainer.search_cache_mb", self.search_cache_mb, low=0)
        if self.max_steps is not None:  # None: max_epochs decides; a step count must train at least once
            check_number("trainer.max_steps", self.max_steps, integer=True, low=1)
        elif not self.max_epochs > 0:
            raise ValueError(f"trainer.max_epochs must be > 0 when trainer.max_steps is null, got {self.max_epochs!r}")
        if not isinstance(self.progress, bool):
            raise ValueError(f"trainer.progress must be true or false, got {self.progress!r}")


@dataclass
class TrainContext:
    """What hooks and search stages see."""

    trainer: "Trainer"
    stage: Stage
    stage_index: int = 0
    global_step: int = 0
    stage_step: int = 0
    epoch: int = 0
    last_loss: float = float("nan")
    last_metrics: Dict[str, float] = field(default_factory=dict)
    stop_requested: bool = False

    @property
    def model(self) -> nn.Module:
        return self.trainer.model

    @property
    def embedding(self) -> nn.Module:
        return self.trainer.model.embedding

    @property
    def dataset(self) -> PreparedDataset:
        return self.trainer.dataset

    def request_stage_end(self) -> None:
        self.stop_requested = True

    def evaluate(self, split: str = "val") -> Dict[str, float]:
        return self.trainer.evaluate(split)

    def search_evaluation(self, split: str = "val") -> SearchEvaluation:
        """Repeated evaluation of ``split`` with frozen parameters (``Trainer.search_evaluation``)."""
        return self.trainer.search_evaluation(split)


@dataclass
class TrainResult:
    metrics: Dict[str, float]
    stage_results: List[Dict[str, Any]]
    history: List[Dict[str, float]]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Trainer:
    """Trains ``model`` (which holds the method's module as ``model.embedding``) on ``dataset``.

    Args:
        config: TrainerConfig.
        model: a model from ``recbench.models`` with an ``embedding`` attribute.
        method: the CompressionMethod (stages, hooks, rebuild).
        dataset: the prepared protocol.
        dense_optimizer / embedding_optimizer: optimizer settings.
        log_metrics: callable(metrics: dict, step: int) (the tracker), or None.
        checkpoint_path: where to save/resume (None: no checkpoints).
        log_stage: callable(stage_index: int, stage_name: str, result: dict) called once per
            finished stage with its full result (the job stores it as artifacts), or None.
        parallel: the process strategy (``recbench.training.distributed``): which rows of each
            batch this process reads, how the loss is scaled, how predictions are gathered.
        cost_clock: ``(time.process_time(), time.perf_counter())`` when the run's work began in this
            process (the job passes its own, taken before it builds the method), or None: when
            ``fit`` begins. Checkpoints carry the CPU and wall seconds spent since then, plus what
            the processes before a resume had spent, so a resumed run's cost counts every process up
            to the checkpoint it resumed from (``cost_before_resume``); the work a killed process did
            after its last checkpoint is lost with it and not counted.
    """

    def __init__(self, config: TrainerConfig, model: nn.Module, method, dataset: PreparedDataset,
                 dense_optimizer: DenseOptimizer, embedding_optimizer: EmbeddingOptimizer,
                 log_metrics: Optional[Callable[[Dict[str, float], int], None]] = None,
                 checkpoint_path: Optional[Path] = None,
                 log_stage: Optional[Callable[[int, str, Dict[str, Any]], None]] = None, parallel=None,
                 cost_clock: Optional[Tuple[float, float]] = None):
        self.config, self.model, self.method, self.dataset = config, model, method, dataset
        self.parallel = parallel or SingleProcess()
        self._log_stage = log_stage or (lambda index, name, result: None)
        self.dense_optimizer, self.embedding_optimizer = dense_optimizer, embedding_optimizer
        self._log = log_metrics or (lambda metrics, step: None)
        self.checkpoint_path = Path(checkpoint_path) if checkpoint_path else None
        self.stages: List[Stage] = list(method.stages())
        if not any(s.kind == "train" for s in self.stages):
            raise ValueError(f"method {method.name!r}: stages() must contain at least one train stage")
        self.hooks = list(method.hooks())
        self.optimizers: Dict[str, torch.optim.Optimizer] = {}
        self.history: List[Dict[str, float]] = []
        self.stage_results: List[Dict[str, Any]] = []
        self._splits: Dict[str, Any] = {}
        self.train_seconds = 0.0
        self.trained_samples = 0
        self._stage_clock = time.perf_counter()  # perf_counter() value at which the current stage began
        self._cost_clock = cost_clock
        self.cost_before_resume = {"cpu_seconds": 0.0, "wall_seconds": 0.0}

    # ------------------------------------------------------------------ data
    def split(self, name: str):
        if name not in self._splits:
            self._splits[name] = self.dataset.split(name)
        return self._splits[name]

    @torch.no_grad()
    def predict_tasks(self, split: str, model: Optional[nn.Module] = None):
        """Click labels (N,), every task's outputs {task: (N,)} and the regression targets {task: (N,)}."""
        model = model or self.model
        iterator = self.parallel.iterate(BatchIterator(self.dataset.spec, self.split(split), self.config.eval_batch_size))
        forwards = ((model(batch.dense_features, batch.sparse_features), batch) for batch in iterator)
        return self.predictions(model, iterator, forwards, split)

    @torch.no_grad()
    def predictions(self, model: nn.Module, iterator, forwards: Iterable[Tuple[Any, Any]], split: str):
        """``predict_tasks``'s arrays from ``forwards``, a lazy sequence of (the model's output, the
        batch's labels and targets) over ``iterator``'s batches, run with ``model`` in eval mode;
        distributed, gathered over the ranks (``parallel.gather``). Search stages feed it the
        outputs of stored memos (``recbench.training.search_cache``)."""
        was_training = model.training
        model.eval()
        labels, outputs, targets = self.parallel.gather(iterator, *collect_predictions(forwards))
        model.train(was_training)
        if not labels:
            raise ValueError(f"split {split!r} of {self.dataset.spec.protocol_id} is empty")
        return (np.concatenate(labels), {k: np.concatenate(v) for k, v in outputs.items()},
                {k: np.concatenate(v) for k, v in targets.items()})

    @staticmethod
    def metrics_of(predictions) -> Dict[str, float]:
        """Metrics of ``predict_tasks``'s (labels, outputs, targets): exact AUC, log loss, task MSEs."""
        labels, outputs, targets = predictions
        return {**binary_metrics(labels, outputs[CLICK]), **regression_metrics(outputs, targets)}

    def evaluate(self, split: str, model: Optional[nn.Module] = None) -> Dict[str, float]:
        return self.metrics_of(self.predict_tasks(split, model))

    def search_evaluation(self, split: str = "val") -> SearchEvaluation:
        """``evaluate(split)`` for a search stage, which changes no parameter between evaluations:
        batches and the model's candidate-independent outputs are computed once and kept (up to
        ``search_cache_mb``; see ``recbench.training.search_cache``). Use it as a context manager."""
        return SearchEvaluation(self, split, int(self.config.search_cache_mb * MB))

    # ------------------------------------------------------------- optimizers
    def _make_optimizers(self) -> None:
        self.optimizers = build_optimizers(self.model, ModelParamGroups(self.model), self.dense_optimizer,
                                           self.embedding_optimizer)

    def _optimizer_states(self) -> Dict[str, Any]:
        states = {name: opt.state_dict() for name, opt in self.optimizers.items()}
        fused = self.model.embedding.fused_optimizer()
        if fused is not None:
            states["fused"] = fused.state_dict()
        return states

    def _load_optimizer_states(self, states: Dict[str, Any]) -> None:
        for name, opt in self.optimizers.items():
            if name in states:
                opt.load_state_dict(states[name])
        fused = self.model.embedding.fused_optimizer()
        if fused is not None and "fused" in states:
            fused.load_state_dict(states["fused"])

    # ------------------------------------------------------------- checkpoints
    def _save(self, progress: Dict[str, Any], best_state: Optional[Dict[str, torch.Tensor]]) -> None:
        if self.checkpoint_path is None:
            return
        save_checkpoint(self.checkpoint_path, {
            "model": self.model.state_dict(),
            "optimizers": self._optimizer_states(),
            "progress": {**progress, "stage_seconds": time.perf_counter() - self._stage_clock},
            "best_state": best_state or {},
            "rng": torch.get_rng_state(),
            "history": self.history,
            "stage_results": self.stage_results,
            "train_seconds": self.train_seconds,
            "trained_samples": self.trained_samples,
            "cost": self.cost_so_far(),
        })

    def cost_so_far(self) -> Dict[str, float]:
        """CPU and wall seconds the run has spent: this process's since ``cost_clock`` plus, for a
        resumed run, what its earlier processes had spent up to the checkpoint it resumed from."""
        cpu_start, wall_start = self._cost_clock or (time.process_time(), time.perf_counter())
        return {"cpu_seconds": self.cost_before_resume["cpu_seconds"] + time.process_time() - cpu_start,
                "wall_seconds": self.cost_before_resume["wall_seconds"] + time.perf_counter() - wall_start}

    def _resume(self) -> Optional[Dict[str, Any]]:
        if self.checkpoint_path is None:
            return None
        payload = load_checkpoint(self.checkpoint_path)
        if payload is None:
            return None
        progress = payload["progress"]
        self.stage_results = list(payload["stage_results"])
        # the module of stage k is rebuild(..rebuild(built, r_0).., r_{k-1}); the last stage is never rebuilt
        for i in range(min(progress["stage_index"], len(self.stages) - 1, len(self.stage_results))):
            self._rebuild(self.stage_results[i])
        self.model.load_state_dict(payload["model"])
        self._make_optimizers()
        self._load_optimizer_states(payload["optimizers"])
        torch.set_rng_state(payload["rng"])
        self.history = list(payload["history"])
        self.train_seconds = float(payload["train_seconds"])
        self.trained_samples = int(payload["trained_samples"])
        cost = payload.get("cost") or {}  # absent from checkpoints written before it was recorded: 0
        self.cost_before_resume = {key: float(cost.get(key, 0.0)) for key in self.cost_before_resume}
        progress["best_state"] = payload["best_state"] or None
        log.info("resumed from %s at stage %d, step %d", self.checkpoint_path, progress["stage_index"],
                 progress["global_step"])
        return progress

    # ------------------------------------------------------------------ hooks
    def _call_hooks(self, name: str, context: TrainContext, *args) -> None:
        for hook in self.hooks:
            if getattr(hook, name)(context, *args):
                context.request_stage_end()

    # -------------------------------------------------------------------- fit
    def fit(self) -> TrainResult:
        torch.manual_seed(self.config.seed)
        if self._cost_clock is None:
            self._cost_clock = (time.process_time(), time.perf_counter())
        progress = self._resume()
        if progress is None:
            self._make_optimizers()
            progress = {"stage_index": 0, "global_step": 0, "stage_step": 0, "epoch": 0, "batch": 0,
                        "best_auc": -math.inf, "bad_evals": 0, "evals": 0, "best_state": None, "stage_done": False}
        best_state = progress.pop("best_state", None)
        last_train_best: Optional[Dict[str, torch.Tensor]] = best_state
        for index in range(progress["stage_index"], len(self.stages)):
            stage = self.stages[index]
            context = TrainContext(self, stage, index, progress["global_step"], progress["stage_step"], progress["epoch"])
            resumed_mid_stage = index == progress["stage_index"] and progress["stage_step"] > 0
            if not resumed_mid_stage:
                if stage.reset_optimizer:
                    self._make_optimizers()
                if stage.reinit:
                    self._reinit_dense()
                    self._make_optimizers()
                progress.update({"stage_step": 0, "epoch": 0, "batch": 0, "best_auc": -math.inf, "bad_evals": 0,
                                 "evals": 0, "stage_seconds": 0.0})
                best_state = None
            self._stage_clock = time.perf_counter() - float(progress.get("stage_seconds", 0.0))
            self._call_hooks("on_stage_start", context)
            if stage.kind == "search":
                result = dict(stage.run(context) or {})
            else:
                best_state, result = self._train_stage(stage, context, progress, best_state)
                last_train_best = best_state
            for hook in self.hooks:  # stage artifacts (masks, thresholds, ...) the next stage needs
                result.update(hook.on_stage_end(context) or {})
            result = checkpointable(result)
            self.parallel.check_replicas(self.model, result, f"stage {index} ({stage.name})")
            result["seconds"] = time.perf_counter() - self._stage_clock
            self.stage_results[index:] = [result]
            self._finish_stage(index, stage, result, context.global_step)
            if index + 1 < len(self.stages):  # the next stage's module; the checkpoint below holds it
                self._rebuild(result)
                self._make_optimizers()
                best_state = last_train_best = None  # states of the previous module's structure
            progress.update({"stage_index": index + 1, "stage_step": 0, "epoch": 0, "batch": 0,
                             "global_step": context.global_step})
            self._save(dict(progress), best_state)
        if last_train_best:
            self.model.load_state_dict(last_train_best)
        self.model = self.parallel.unshard(self.model)  # distributed: rank 0 gathers the whole tables
        metrics = self.parallel.on_main(self._final_metrics_alone)
        return TrainResult(metrics, self.stage_results, self.history)

    def _final_metrics_alone(self) -> Dict[str, float]:
        """``_final_metrics`` computed by this process alone on whole batches (distributed: on rank 0,
        which holds the whole model after ``unshard``; the other ranks receive its metrics)."""
        parallel, self.parallel = self.parallel, SingleProcess()
        try:
            return self._final_metrics()
        finally:
            self.parallel = parallel

    def _rebuild(self, result: Dict[str, Any]) -> None:
        """The next stage's module, ``method.rebuild(embedding, result)``, through the process strategy
        (distributed: the model is released from DMP/DDP, rebuilt and wrapped again)."""
        self.model = self.parallel.rebuild(self.model, lambda embedding: self.method.rebuild(embedding, result))

    def _finish_stage(self, index: int, stage: Stage, result: Dict[str, Any], step: int) -> None:
        """Log a finished stage: its scalars as ``stage/<name>/<key>`` metrics, all of it via ``log_stage``."""
        scalars = {f"stage/{stage.name}/{k}": float(v) for k, v in result.items()
                   if isinstance(v, (int, float, bool, np.number)) and math.isfinite(float(v))}
        self._log(scalars, step)
        self._log_stage(index, stage.name, result)
        log.info("stage %d (%s) finished in %.1fs: %s", index, stage.name, result["seconds"],
                 ", ".join(f"{k.rsplit('/', 1)[1]}={v:.4g}" for k, v in scalars.items()))

    def _reinit_dense(self) -> None:
        """``Stage.reinit``: reset the ``nn.Linear`` layers outside the embedding module (see there)."""
        fused = {id(p) for p in self.model.embedding.parameters()}
        for module in self.model.modules():
            if module is self.model.embedding:
                continue
            if isinstance(module, nn.Linear) and id(module.weight) not in fused:
                module.reset_parameters()

    def _train_stage(self, stage: Stage, context: TrainContext, progress: Dict[str, Any],
                     best_state: Optional[Dict[str, torch.Tensor]]):
        cfg = self.config
        iterator = self.parallel.iterate(BatchIterator(self.dataset.spec, self.split("train"), cfg.batch_size,
                                                       shuffle=True, seed=cfg.seed * 1000 + context.stage_index))
        steps_per_epoch = len(iterator)
        max_epochs = stage.max_epochs if stage.max_epochs is not None else cfg.max_epochs
        max_steps = stage.max_steps or cfg.max_steps or int(math.ceil(max_epochs * steps_per_epoch))
        eval_every = max(1, steps_per_epoch // cfg.evals_per_epoch)
        # with early stopping the step cap is an upper bound (runs stop near a quarter of it on
        # MovieLens), so the bar shows steps done of the cap, elapsed time and speed, and no ETA
        capped = "{desc}: {n_fmt}/{total_fmt} steps at most [{elapsed}, {rate_fmt}{postfix}]"
        bar = tqdm(total=max_steps, initial=progress["stage_step"], desc=f"{self.method.name}:{stage.name}",
                   disable=not cfg.progress or None, leave=False, dynamic_ncols=True,
                   bar_format=capped if stage.early_stopping else None)
        stop = False
        embedding = self.model.embedding
        if stage.evaluate_at_start and progress["stage_step"] == 0 and progress["evals"] == 0:
            best_state = self._evaluate_start(stage, context, progress)
        while progress["stage_step"] < max_steps and not stop:
            start_batch = progress["batch"]
            for batch in iterator.epoch(progress["epoch"], start_batch):
                t0 = time.perf_counter()
                loss = self._step(batch)
                self.train_seconds += time.perf_counter() - t0
                self.trained_samples += self.parallel.samples(batch)
                progress["stage_step"] += 1
                progress["global_step"] += 1
                progress["batch"] += 1
                context.global_step, context.stage_step = progress["global_step"], progress["stage_step"]
                context.epoch, context.last_loss = progress["epoch"], loss
                bar.update(1)
                if progress["global_step"] % cfg.log_every_steps == 0:
                    self._log({"train/loss": loss}, progress["global_step"])
                self._call_hooks("on_step_end", context)
                if self.model.embedding is not embedding:  # a hook swapped the module
                    embedding = self.model.embedding
                    self._make_optimizers()
                at_end = progress["stage_step"] >= max_steps
                if progress["stage_step"] % eval_every == 0 or at_end or context.stop_requested:
                    metrics = self.evaluate("val")
                    # distributed: replicas that drift apart stop the run at the first evaluation, not at the stage end
                    self.parallel.check_replicas(self.model, {}, f"stage {context.stage_index} ({stage.name}), "
                                                                 f"step {progress['global_step']}")
                    progress["evals"] += 1
                    record = {"val/auc": metrics["auc"], "val/logloss": metrics["logloss"],
                              "train/loss": loss, "epoch": progress["epoch"] + progress["batch"] / steps_per_epoch,
                              **split_task_metrics(metrics, "val")}
                    self.history.append({"step": progress["global_step"], "stage": context.stage_index, **record})
                    self._log({k: v for k, v in record.items()}, progress["global_step"])
                    context.last_metrics = metrics
                    if metrics["auc"] > progress["best_auc"] + cfg.min_delta:
                        progress["best_auc"] = metrics["auc"]
                        progress["bad_evals"] = 0
                        best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                    else:
                        progress["bad_evals"] += 1
                    bar.set_postfix(loss=f"{loss:.4f}", val_auc=f"{metrics['auc']:.4f}",
                                    best=f"{progress['best_auc']:.4f}",
                                    **({"no_gain": f"{progress['bad_evals']}/{cfg.patience}"} if stage.early_stopping else {}))
                    if bar.disable:  # no bar (a pipe, nohup, a cluster log, progress=false): one line per evaluation
                        self._log_progress(stage, context, progress, max_steps, steps_per_epoch, metrics)
                    self._call_hooks("on_eval_end", context, metrics)
                    if stage.early_stopping and progress["bad_evals"] >= cfg.patience:
                        log.info("early stop at step %d (no val AUC gain in %d evals)", progress["global_step"], cfg.patience)
                        stop = True
                if context.stop_requested or at_end:
                    stop = True
                if cfg.checkpoint_every_steps and progress["global_step"] % cfg.checkpoint_every_steps == 0:
                    self._save(dict(progress), best_state)
                if stop:
                    break
            else:
                progress["epoch"] += 1
                progress["batch"] = 0
        bar.close()
        result = {"best_val_auc": progress["best_auc"], "steps": progress["stage_step"],
                  "epochs": progress["epoch"] + progress["batch"] / max(steps_per_epoch, 1)}
        return best_state, result

    def _log_progress(self, stage: Stage, context: TrainContext, progress: Dict[str, Any], max_steps: int,
                      steps_per_epoch: int, metrics: Mapping[str, float]) -> None:
        """One line per evaluation when no progress bar shows: step, epoch, val AUC, the best, the
        evaluations without gain, elapsed time, and the time left at most (the step cap; early
        stopping can end the stage sooner, so no exact ETA is claimed)."""
        done = progress["stage_step"]
        elapsed = time.perf_counter() - self._stage_clock
        left = elapsed / max(done, 1) * max(max_steps - done, 0)
        patience = f" of {self.config.patience}" if stage.early_stopping else ""
        log.info("%s:%s step %d/%d (epoch %.2f): val AUC %.4f, best %.4f (%d eval(s) without gain%s), %s elapsed, "
                 "at most %s left", self.method.name, stage.name, done, max_steps,
                 progress["epoch"] + progress["batch"] / max(steps_per_epoch, 1), metrics["auc"], progress["best_auc"],
                 progress["bad_evals"], patience, format_duration(elapsed), format_duration(left))

    def _evaluate_start(self, stage: Stage, context: TrainContext, progress: Dict[str, Any]) -> Dict[str, torch.Tensor]:
        """Validation of the model a stage starts from: its first checkpoint (``Stage.evaluate_at_start``)."""
        metrics = self.evaluate("val")
        progress["evals"] += 1
        progress["best_auc"], progress["bad_evals"] = metrics["auc"], 0
        record = {"val/auc": metrics["auc"], "val/logloss": metrics["logloss"], **split_task_metrics(metrics, "val")}
        self.history.append({"step": progress["global_step"], "stage": context.stage_index, **record})
        self._log(record, progress["global_step"])
        context.last_metrics = metrics
        log.info("stage %d (%s) starts at val AUC %.4f (its first checkpoint)", context.stage_index, stage.name, metrics["auc"])
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _step(self, batch: RecBatch) -> float:
        if not all(m.training for m in self.model.modules()):  # train() re-sets every module's flag: only when needed
            self.model.train()
        with self.parallel.placement(batch):  # distributed: per-sample draws and batch sums equal one process's
            output = self.model(batch.dense_features, batch.sparse_features)
            extra = self.model.embedding.extra_loss()
        loss = training_loss(self.model, output, batch, self.parallel.row_scale(batch)) + extra
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=True)
        loss.backward()  # fused tables are updated here, inside FBGEMM's backward
        for opt in self.optimizers.values():
            opt.step()
        value = self.parallel.reduce_value(loss)
        if not math.isfinite(value):
            raise TrainingDiverged(f"loss is {value} at a training step of method {self.method.name!r}")
        return value

    # ----------------------------------------------------------------- final
    def _final_metrics(self) -> Dict[str, float]:
        """Validation and test on the best checkpoint, with the deployable embedding form; the test
        pass also counts the inference cost per sample. Computed once, here: the job adds no pass."""
        training_embedding = self.model.embedding
        train_memory = training_embedding.memory_report()
        train = self.split("train")  # weights, optimizer state, buffers and one training step's IO (bytes)
        step = make_batch(self.dataset.spec, train, np.arange(min(self.config.batch_size, len(train)))).sparse_features
        train_split = memory_split.training_memory_split(training_embedding, self.optimizers.values(), step,
                                                         training_embedding.dim)
        val_training_form = self.evaluate("val")
        inference_embedding = training_embedding.to_inference()
        #: the deployable embedding the final metrics measured (the job keeps it: ``deployable_model``)
        self.deployable_embedding = inference_embedding
        self.model.embedding = inference_embedding
        try:
            val = self.evaluate("val")
            test, cost = self._evaluate_counting_cost("test")
            latency_batch, latency_single = self._latency()
        finally:
            self.model.embedding = training_embedding
        metrics = {
            "val/auc": val["auc"], "val/logloss": val["logloss"],
            "val/auc_training_form": val_training_form["auc"],
            "test/auc": test["auc"], "test/logloss": test["logloss"], "test/ne": test["ne"],
            "test/mean_prediction": test["mean_prediction"], "test/positive_rate": test["positive_rate"],
            "test/calibration": test["calibration"],
            **split_task_metrics(val, "val"), **split_task_metrics(test, "test"),
            "train/samples_per_s": self.trained_samples / self.train_seconds if self.train_seconds else float("nan"),
            "train/seconds": self.train_seconds,
            "train/samples": float(self.trained_samples),
            "infer/latency_ms": latency_batch,
            "infer/latency_ms_single": latency_single,
            "sys/peak_rss_mb": _peak_rss_mb(),
        }
        metrics.update(train_memory.as_metrics())
        metrics.update(memory_split.as_metrics(train_split))
        metrics.update(collision_rates(training_embedding))  # id-rewriting table methods: ids sharing a row
        metrics.update(cost)
        return metrics

    def deployable_model(self) -> nn.Module:
        """The evaluated model with its deployable embedding (after ``fit``): what the test metrics
        measured. Shares its dense parameters with the trained model."""
        deployable = copy.copy(self.model)  # a shallow copy: the same dense modules, another embedding slot
        deployable._modules = dict(self.model._modules)
        deployable.embedding = self.deployable_embedding
        return deployable

    def _evaluate_counting_cost(self, split: str) -> Tuple[Dict[str, float], Dict[str, float]]:
        """``evaluate(split)`` of the current model, whose forwards also count the inference cost
        per sample (``recbench.training.inference_cost``): one pass over the split for both."""
        counter = CostCounter(self.model)
        iterator = self.parallel.iterate(BatchIterator(self.dataset.spec, self.split(split), self.config.eval_batch_size))
        forwards = ((counter.forward(batch), batch) for batch in iterator)
        metrics = self.metrics_of(self.predictions(self.model, iterator, forwards, split))
        return metrics, counter.per_sample(self.parallel.concat_ranks)

    @torch.no_grad()
    def _latency(self) -> Tuple[float, float]:
        """Median ms of one forward on a batch of ``latency_batch_size`` test rows and on one row."""
        cfg = self.config
        split = self.split("test")
        n = len(split)

        big = make_batch(self.dataset.spec, split, np.arange(min(cfg.latency_batch_size, n)))
        one = make_batch(self.dataset.spec, split, np.arange(1))
        self.model.eval()
        out = []
        for batch in (big, one):
            self.model(batch.dense_features, batch.sparse_features)  # warm-up
            times = []
            for _ in range(cfg.latency_repeats):
                t0 = time.perf_counter()
                self.model(batch.dense_features, batch.sparse_features)
                times.append((time.perf_counter() - t0) * 1000.0)
            out.append(float(np.median(times)))
        return out[0], out[1]
