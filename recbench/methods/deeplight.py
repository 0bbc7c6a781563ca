"""``deeplight``: DeepLight — progressive magnitude pruning of the embedding to a target sparsity.

References: Deng, Pan, Zhou, Kong, Flores, Lin, "DeepLight: Deep Lightweight Feature Interactions
for Accelerating CTR Predictions in Ad Serving", WSDM 2021 (arXiv:2002.06987); Hsword/Hetu
``tools/EmbeddingMemoryCompression/methods/layers/deeplight.py`` and ``methods/scheduler/deeplight.py``
(commit a1cb1bcaf236c9f1d452733b105997d50c16c9df).

Mechanism: after ``warmup_epochs`` of dense training, every ``prune_every`` steps (and at
every epoch boundary of the pruning phase, as the reference) the table keeps only its
largest-magnitude entries (one global threshold over all compressed fields, as the paper's
stacked-embedding threshold) at the damped schedule

    s_t = S * (1 - damping^(t / time_constant)),   t = steps since the warm-up ended,

with the reference's ``damping = 0.99``, ``time_constant = 100`` and ``prune_every = 10``
(Hsword/Hetu ``tools/EmbeddingMemoryCompression/methods/layers/deeplight.py``: ``prune_rate *
(1 - 0.99 ** (n_iter / 100.))`` when ``n_iter % 10 == 0 or n_iter % batch_num == 0``). The
hook ends stage ``prune`` at the first pruning step whose relative deviation 1 - s_t / S is
within ``tolerance`` (1e-3, Hetu's ``stop_deviation``: t = 100 log_0.99(1e-3) ~ 68,700 steps,
whatever the dataset). ``time_constant: auto`` is recbench's earlier variant: the time constant
is rescaled so that the schedule ends after ``pruning_epochs`` (T steps) within an absolute
``tolerance`` of S, ``time_constant = T ln(damping) / ln(tolerance / S)``, pruning every
``prune_every`` steps only. ``rebuild`` then fixes the mask at exactly ``nnz`` entries (the
largest magnitudes among the surviving ones: at most ``tolerance * R * D`` more entries pruned)
and stage ``finetune`` keeps training with that mask (early stopping on validation AUC; the test
checkpoint is always at the target). Pruned weights stay zero: the lookup multiplies by the mask
(so they get no gradient) and the mask is re-applied to the touched rows after every optimizer
step.

Budget: ``nnz`` is the largest number of kept entries whose cheapest sparse storage (values +
indices, ``sparse_storage``) fits the target; S = 1 - nnz / (R D).

Shapes: KJT (F keys, B bags) -> per-id (N, D) -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Mapping, Optional, Sequence

import torch

from recbench.methods.base import Hook
from recbench.methods.families.pruning import (MaskHook, PrunedEmbedding, PruningFamily, PruningSettings,
                                               mask_artifacts, pruning_stage_result, top_k_mask)
from recbench.types import Stage, TableSpec

#: epoch cap of a prune stage whose schedule is given in steps (the hook ends the stage)
UNCAPPED_EPOCHS = 1e6


def damped_sparsity(step: int, target: float, damping: float, time_constant: float) -> float:
    """DeepLight's schedule s_t = S (1 - damping^(t / time_constant)) (0 for t <= 0)."""
    if step <= 0:
        return 0.0
    return target * (1.0 - damping ** (step / time_constant))


def time_constant_for(steps: int, target: float, damping: float, tolerance: float) -> float:
    """The time constant at which s_steps = target - tolerance (``time_constant: auto``'s end)."""
    if target <= tolerance:
        return 1.0  # already within tolerance at the first pruning step
    return steps * math.log(damping) / math.log(tolerance / target)


class DeepLightEmbedding(PrunedEmbedding):
    """Masked table pruned by magnitude on a schedule. forward: KJT -> (B, F * D)."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any]):
        super().__init__(tables, dim, hparams["kept"], hparams["nnz"])

    def target_sparsity(self) -> float:
        return 1.0 - self.nnz / self.mask.numel()

    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Keep the round((1 - sparsity) R D) largest |w| (never fewer than nnz); zero the rest."""
        keep = max(self.nnz, int(round((1.0 - sparsity) * self.mask.numel())))
        if keep < int(self.mask.sum()):
            scores = self.weight.abs().masked_fill(~self.mask, -float("inf"))
            self.mask.copy_(top_k_mask(scores, keep))
            self.reapply_mask()


class ScheduleHook(Hook):
    """Prunes on the damped schedule during stage ``prune`` and ends it within tolerance."""

    def __init__(self, method: "DeepLight"):
        self.method = method
        self.reached = False

    def on_stage_start(self, context: Any) -> None:
        if context.stage.name == "prune":
            self.reached = False

    def on_step_end(self, context: Any) -> Optional[bool]:
        if context.stage.name != "prune":
            return None
        m, module = self.method, context.embedding
        steps_per_epoch = math.ceil(len(context.trainer.split("train")) / context.trainer.config.batch_size)
        warmup = int(round(m.warmup_epochs * steps_per_epoch))
        t = context.stage_step - warmup
        rescaled = m.time_constant == "auto"
        if t <= 0 or (t % m.prune_every and (rescaled or t % steps_per_epoch)):
            return None
        target = module.target_sparsity()
        if rescaled:
            horizon = max(1, int(round(m.pruning_epochs * steps_per_epoch)))
            sparsity = damped_sparsity(t, target, m.damping, time_constant_for(horizon, target, m.damping, m.tolerance))
            deviation = target - sparsity
        else:
            sparsity = damped_sparsity(t, target, m.damping, m.time_constant)
            deviation = m.damping ** (t / m.time_constant)  # 1 - s_t / S (Hetu's stop_deviation)
        module.prune_to(sparsity)
        if deviation <= m.tolerance:
            self.reached = True
            return True
        return None

    def on_stage_end(self, context: Any) -> Optional[Mapping[str, Any]]:
        if context.stage.name == "finetune":
            return mask_artifacts(context.embedding)  # the fixed mask the deployable form uses
        if context.stage.name != "prune":
            return None
        return pruning_stage_result(context.embedding, self.reached)


@dataclass
class DeepLightSettings(PruningSettings):
    """Hyperparameters of ``deeplight`` (defaults: Hsword/Hetu's deeplight, the reference's schedule)."""

    warmup_epochs: float = 0.5  #: dense training before pruning starts
    #: s_t = S (1 - damping^(t / time_constant)), t in steps (the reference's 100); a number of steps > 0 or
    #: auto = recbench's earlier variant: rescaled so the schedule ends after pruning_epochs
    time_constant: Any = 100.0
    #: time_constant=auto only: the schedule reaches target - tolerance after this many epochs
    pruning_epochs: float = 0.5
    #: steps between pruning events (the reference's 10 iterations; plus every epoch boundary)
    prune_every: int = 10
    damping: float = 0.99  #: the reference's 0.99
    #: the pruning stage ends when 1 - s_t / S <= tolerance (Hetu's stop_deviation; auto: S - s_t)
    tolerance: float = 1.0e-3


class DeepLight(PruningFamily):
    """DeepLight; hyperparameters: ``DeepLightSettings`` (and ``methods/deeplight.md``)."""

    name = "deeplight"
    module_class = DeepLightEmbedding
    settings_class = DeepLightSettings

    #: 2: schedule inside the first epoch by default (0.5 + 0.5, was 1 + 2) and the fine-tune keeps
    #: the pruned model when fine-tuning only lowers validation AUC; 3: the reference's time constant
    #: 100 and relative stop deviation (methods/deeplight.md, Revisions)
    revision = 3

    def check_settings(self) -> None:
        super().check_settings()
        warmup_epochs, pruning_epochs, prune_every = self.warmup_epochs, self.pruning_epochs, self.prune_every
        damping, tolerance, time_constant = self.damping, self.tolerance, self.time_constant
        if warmup_epochs < 0:
            raise ValueError(f"method 'deeplight': warmup_epochs must be >= 0, got {warmup_epochs}")
        if not pruning_epochs > 0:
            raise ValueError(f"method 'deeplight': pruning_epochs must be > 0, got {pruning_epochs}")
        if int(prune_every) < 1:
            raise ValueError(f"method 'deeplight': prune_every must be >= 1, got {prune_every}")
        if not 0 < damping < 1:
            raise ValueError(f"method 'deeplight': damping must be in (0, 1), got {damping}")
        if not 0 < tolerance < 1:
            raise ValueError(f"method 'deeplight': tolerance must be in (0, 1), got {tolerance}")
        if time_constant != "auto" and (isinstance(time_constant, (bool, str)) or not time_constant > 0):
            raise ValueError(f"method 'deeplight': time_constant must be 'auto' (rescaled from pruning_epochs) "
                             f"or a number of steps > 0, got {time_constant!r}")
        self.time_constant = time_constant if time_constant == "auto" else float(time_constant)
        self.warmup_epochs, self.pruning_epochs = float(warmup_epochs), float(pruning_epochs)
        self.prune_every, self.damping, self.tolerance = int(prune_every), float(damping), float(tolerance)

    def stages(self) -> List[Stage]:
        # the hook ends the stage at the schedule's end; the cap leaves room for the last pruning step
        # (a fixed time constant's schedule is in steps: its stage has no epoch cap of its own, only
        # trainer.max_steps); the finetune's first checkpoint is the pruned model itself
        # (evaluate_at_start): when fine-tuning only over-fits (data seen again), early stopping
        # keeps the pruned model
        cap = self.pruning_epochs + 0.5 if self.time_constant == "auto" else UNCAPPED_EPOCHS
        return [Stage("prune", max_epochs=self.warmup_epochs + cap, early_stopping=False),
                Stage("finetune", evaluate_at_start=True)]

    def hooks(self) -> List[Hook]:
        return [MaskHook(), ScheduleHook(self)]

    def rebuild(self, module: DeepLightEmbedding, stage_result: Mapping[str, Any]) -> DeepLightEmbedding:
        module.prune_to(1.0)  # exactly nnz entries: the largest magnitudes among the survivors
        return module
