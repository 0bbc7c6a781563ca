"""deeplight against its reference, Hsword/Hetu ``tools/EmbeddingMemoryCompression`` (commit
a1cb1bcaf236c9f1d452733b105997d50c16c9df): the schedule of ``methods/layers/deeplight.py``
(``make_adaptive_rate``: ``prune_rate * (1 - 0.99 ** (n_iter / 100.))`` when ``n_iter % 10 == 0
or n_iter % batch_num == 0``) and the stop of ``methods/scheduler/deeplight.py``
(``stop_niter = log(stop_deviation, 0.99) * 100`` with ``stop_deviation = 1e-3``)."""
import math
import types

import pytest
import torch

from recbench.methods.deeplight import UNCAPPED_EPOCHS, DeepLight, ScheduleHook
from recbench.models.dlrm import DLRM
from recbench.training.optim import DenseOptimizer
from recbench.training.trainer import Trainer, TrainerConfig
from recbench.types import Budget, EmbeddingOptimizer, Stage
from solve_build import solve_and_build

DIM = 8


def hetu_rate(prune_rate, batch_num, n_iter):
    """Independent port of Hetu's ``make_adaptive_rate`` updater (ignore_iter = 0)."""
    if n_iter <= 0:
        return 0.0
    if n_iter % 10 == 0 or n_iter % batch_num == 0:
        return prune_rate * (1 - 0.99 ** (n_iter / 100.0))
    return 0.0


class Recorder:
    """Stands in for the embedding: records the sparsities the hook asks for."""

    def __init__(self, target):
        self.target, self.calls = target, []

    def target_sparsity(self):
        return self.target

    def prune_to(self, sparsity):
        self.calls.append(sparsity)


def drive(method, target, steps, samples=80_000, batch_size=256):
    """Run the hook over ``steps`` prune-stage steps; returns {step: sparsity} and the step it ended at."""
    embedding = Recorder(target)
    hook = ScheduleHook(method)
    trainer = types.SimpleNamespace(config=types.SimpleNamespace(batch_size=batch_size), split=lambda name: range(samples))
    pruned, end = {}, None
    for step in steps:
        context = types.SimpleNamespace(trainer=trainer, stage=Stage("prune"), stage_step=step, embedding=embedding)
        count = len(embedding.calls)
        stop = hook.on_step_end(context)
        if len(embedding.calls) > count:
            pruned[step] = embedding.calls[-1]
        if stop:
            end = step
            break
    return pruned, end


def test_schedule_is_hetus_adaptive_rate_every_10_steps_and_at_epoch_ends():
    """Fails on the earlier default (time constant rescaled so the schedule ends within 0.5 epoch)."""
    target, batch_num = 0.93, 313  # MovieLens-100K: 80k samples / 256
    method = DeepLight(warmup_epochs=0.0)
    pruned, _ = drive(method, target, range(1, 3001))
    expected = {n: hetu_rate(target, batch_num, n) for n in range(1, 3001) if hetu_rate(target, batch_num, n) > 0}
    assert pruned.keys() == expected.keys() and 313 in pruned and 626 in pruned  # epoch ends too
    assert all(pruned[n] == pytest.approx(expected[n], rel=1e-12) for n in expected)
    assert pruned[100] == pytest.approx(target * 0.01)


def test_pruning_stage_ends_at_hetus_stop_deviation():
    stop_niter = math.log(1e-3, 0.99) * 100  # 68,732.4 steps, whatever the dataset
    method = DeepLight(warmup_epochs=0.0)
    _, end = drive(method, 0.93, range(68_000, 69_000))
    assert end == 68_740  # the first pruning step (a multiple of 10; no epoch end in between) past stop_niter
    assert end - 10 < stop_niter <= end
    # the stage has no epoch cap of its own: the schedule, given in steps, decides its length
    prune, finetune = method.stages()
    assert prune.max_epochs == UNCAPPED_EPOCHS and not prune.early_stopping and finetune.evaluate_at_start
    # the earlier variant: rescaled to end within pruning_epochs, capped at warm-up + pruning + 0.5 epochs
    earlier = DeepLight(time_constant="auto", warmup_epochs=0.0, pruning_epochs=1.5)
    assert earlier.stages()[0].max_epochs == 2.0
    pruned, end = drive(earlier, 0.93, range(1, 1000))
    assert end in (470, 480) and 313 not in pruned  # 1.5 epochs = 470 steps (+ float rounding); every 10 steps only


@pytest.mark.slow
def test_reference_schedule_trains_to_the_target(toy_dataset):
    """A fixed time constant on a toy run: the stage ends within the relative tolerance, the mask
    holds exactly nnz entries in the finetune stage and pruned weights stay zero."""
    torch.manual_seed(0)
    emb_opt = EmbeddingOptimizer(learning_rate=0.1)
    method = DeepLight(warmup_epochs=0.0, time_constant=3.0, damping=0.5, prune_every=2)  # ends at step 30
    emb = solve_and_build(method, toy_dataset.spec.tables, DIM, Budget(compression_ratio=0.1), emb_opt)
    model = DLRM(emb, toy_dataset.spec.num_dense, len(toy_dataset.spec.tables), DIM, [16, DIM], [16, 1])
    config = TrainerConfig(max_epochs=1, max_steps=40, batch_size=64, progress=False, latency_repeats=1,
                           evals_per_epoch=2)
    trainer = Trainer(config, model, method, toy_dataset, DenseOptimizer(), emb_opt)
    trainer.fit()
    assert trainer.hooks[1].reached
    assert int(emb.mask.sum()) == emb.nnz and int(((emb.weight != 0) & ~emb.mask).sum()) == 0


def test_bad_time_constant_names_the_key():
    with pytest.raises(ValueError, match="time_constant"):
        DeepLight(time_constant=0)
    with pytest.raises(ValueError, match="time_constant"):
        DeepLight(time_constant="fast")
