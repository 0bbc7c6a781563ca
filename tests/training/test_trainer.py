"""The training loop: stages and hooks with a toy two-stage method, early stopping, resume."""
from __future__ import annotations

import pytest
import torch

from recbench.methods.base import Hook
from recbench.methods.full import Full
from recbench.models.dlrm import DLRM
from recbench.training.optim import DenseOptimizer
from recbench.training.trainer import Trainer, TrainerConfig
from recbench.types import Budget, EmbeddingOptimizer, Stage
from solve_build import solve_and_build

EMB = EmbeddingOptimizer(learning_rate=0.1)


class Recorder(Hook):
    def __init__(self, stop_stage_at=None, crash_at=None):
        self.events, self.stop_stage_at, self.crash_at = [], stop_stage_at, crash_at

    def on_stage_start(self, ctx):
        self.events.append(("start", ctx.stage.name))

    def on_step_end(self, ctx):
        if self.crash_at is not None and ctx.global_step == self.crash_at:
            raise KeyboardInterrupt("simulated kill")
        if self.stop_stage_at and ctx.stage.name == "warmup" and ctx.stage_step == self.stop_stage_at:
            return True
        return None

    def on_eval_end(self, ctx, metrics):
        self.events.append(("eval", ctx.stage.name))

    def on_stage_end(self, ctx):
        self.events.append(("end", ctx.stage.name, ctx.stage_step))


class TwoStage(Full):
    """warmup (train) -> pick (search) -> final (train, optimizer reset)."""

    def __init__(self, hook):
        super().__init__()
        self.hook, self.rebuilt = hook, []

    def stages(self):
        return [Stage("warmup", max_steps=30), Stage("pick", kind="search", run=self._search),
                Stage("final", max_steps=20, reset_optimizer=True)]

    def _search(self, ctx):
        return {"val_auc_seen": ctx.evaluate("val")["auc"], "choice": 3}

    def hooks(self):
        return [self.hook]

    def rebuild(self, module, result):
        self.rebuilt.append(dict(result))
        return module


def _model(dataset, method, seed=0):
    torch.manual_seed(seed)
    emb = solve_and_build(method, dataset.spec.tables, 8, Budget(), EMB)
    return DLRM(emb, dataset.spec.num_dense, len(dataset.spec.tables), 8, [16, 8], [16, 1])


def _trainer(dataset, method, path=None, **cfg):
    config = TrainerConfig(**{"max_epochs": 2, "batch_size": 64, "progress": False, "latency_repeats": 2,
                              "evals_per_epoch": 2, **cfg})
    return Trainer(config, _model(dataset, method), method, dataset, DenseOptimizer(), EMB, checkpoint_path=path)


def test_two_stage_method_runs_stages_hooks_and_rebuild(toy_dataset):
    hook = Recorder(stop_stage_at=12)
    method = TwoStage(hook)
    result = _trainer(toy_dataset, method).fit()
    starts = [e[1] for e in hook.events if e[0] == "start"]
    assert starts == ["warmup", "pick", "final"]
    ends = [e for e in hook.events if e[0] == "end"]
    assert ends[0] == ("end", "warmup", 12)  # the hook requested the stage end at step 12
    assert ends[2] == ("end", "final", 20)
    assert [r.get("choice") for r in result.stage_results] == [None, 3, None]
    assert method.rebuilt[0]["steps"] == 12 and method.rebuilt[1]["choice"] == 3
    assert result.metrics["test/auc"] > 0.6


def test_early_stopping_and_best_checkpoint(toy_dataset):
    method = Full()
    trainer = _trainer(toy_dataset, method, max_epochs=50, patience=2, evals_per_epoch=1)
    result = trainer.fit()
    evals = [h for h in result.history]
    assert len(evals) < 50  # stopped early
    best = max(h["val/auc"] for h in evals)
    assert result.metrics["val/auc"] == pytest.approx(best, abs=1e-6)  # test used the best val checkpoint


class SpoilFinetune(Full):
    """train -> finetune (evaluate_at_start); a hook ruins the top MLP at every finetune step."""

    def stages(self):
        return [Stage("train", max_steps=40), Stage("finetune", max_steps=30, evaluate_at_start=True)]

    def hooks(self):
        class Spoil(Hook):
            def on_step_end(self, ctx):
                if ctx.stage.name == "finetune":
                    with torch.no_grad():
                        for p in ctx.trainer.model.over.parameters():
                            p.add_(torch.randn_like(p))
        return [Spoil()]


def test_a_stage_evaluated_at_its_start_keeps_its_start_when_it_only_gets_worse(toy_dataset):
    """``Stage.evaluate_at_start``: the model a stage starts from is its first checkpoint, so a
    fine-tune that only lowers validation AUC ends with the model it started from."""
    trainer = _trainer(toy_dataset, SpoilFinetune(), patience=2, evals_per_epoch=4)
    result = trainer.fit()
    finetune = [h for h in result.history if h["stage"] == 1]
    start_step = result.stage_results[0]["steps"]
    assert finetune[0]["step"] == start_step and "train/loss" not in finetune[0]  # evaluated before any step
    assert all(h["val/auc"] < finetune[0]["val/auc"] for h in finetune[1:])  # the spoiling worked
    assert result.stage_results[1]["best_val_auc"] == pytest.approx(finetune[0]["val/auc"])
    assert result.metrics["val/auc"] == pytest.approx(finetune[0]["val/auc"], abs=1e-6)


def test_resume_after_kill_matches_uninterrupted_run(toy_dataset, tmp_path):
    reference = _trainer(toy_dataset, TwoStage(Recorder()), checkpoint_every_steps=7).fit()
    path = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        _trainer(toy_dataset, TwoStage(Recorder(crash_at=40)), path, checkpoint_every_steps=7).fit()
    assert path.is_file()
    resumed = _trainer(toy_dataset, TwoStage(Recorder()), path, checkpoint_every_steps=7).fit()
    for key in ("val/auc", "test/auc", "test/logloss"):
        assert resumed.metrics[key] == pytest.approx(reference.metrics[key], abs=1e-5), key
    assert [h["step"] for h in resumed.history] == [h["step"] for h in reference.history]


def test_a_resumed_run_counts_the_cost_of_the_process_it_resumed_from(toy_dataset, tmp_path):
    """The checkpoint carries the CPU and wall seconds spent so far; the resuming trainer starts
    its count from them instead of from zero (what ``run/cpu_seconds`` of a resumed job reports)."""
    path = tmp_path / "ckpt.pt"
    with pytest.raises(KeyboardInterrupt):
        _trainer(toy_dataset, TwoStage(Recorder(crash_at=40)), path, checkpoint_every_steps=7).fit()
    spent = torch.load(path, weights_only=True)["cost"]
    assert spent["cpu_seconds"] > 0 and spent["wall_seconds"] > 0
    resumed = _trainer(toy_dataset, TwoStage(Recorder()), path, checkpoint_every_steps=7)
    resumed.fit()
    assert resumed.cost_before_resume == spent
    total = resumed.cost_so_far()
    assert total["cpu_seconds"] > spent["cpu_seconds"] and total["wall_seconds"] > spent["wall_seconds"]
    fresh = _trainer(toy_dataset, Full(), max_steps=3)
    fresh.fit()
    assert fresh.cost_before_resume == {"cpu_seconds": 0.0, "wall_seconds": 0.0}


def test_checkpoint_loads_with_weights_only(toy_dataset, tmp_path):
    path = tmp_path / "c.pt"
    _trainer(toy_dataset, Full(), path, max_steps=10, checkpoint_every_steps=5).fit()
    payload = torch.load(path, weights_only=True)
    assert {"model", "optimizers", "progress", "rng"} <= set(payload)


def test_nan_loss_is_reported(toy_dataset):
    from recbench.training.trainer import TrainingDiverged

    method = Full()
    trainer = _trainer(toy_dataset, method, max_steps=5)
    with torch.no_grad():
        for p in trainer.model.over.parameters():
            p.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="loss is nan"):
        trainer.fit()
