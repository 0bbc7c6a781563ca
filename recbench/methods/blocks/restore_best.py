"""``RestoreBest``: a search stage ends on its best validation checkpoint (Hetu loads it for the
next stage); shared by autosrh, autodim and magnitude.

References: Hsword/Hetu tools/EmbeddingMemoryCompression methods/scheduler (the best-checkpoint
load between stages); recbench.methods.base (``Hook``).
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

from recbench.methods.base import Hook


class RestoreBest(Hook):
    """Stages ``warmup`` and ``search`` end on their best validation checkpoint (the trainer's rule:
    val AUC above the best + ``min_delta``), which Hetu loads for the next stage. After a resume
    inside such a stage the snapshot is gone and the last weights are used."""

    STAGES = ("warmup", "search")

    def __init__(self):
        self.best_auc, self.best_state = -math.inf, None

    def on_stage_start(self, context: Any) -> None:
        self.best_auc, self.best_state = -math.inf, None

    def on_eval_end(self, context: Any, metrics: Mapping[str, float]) -> Optional[bool]:
        if context.stage.name in self.STAGES and metrics["auc"] > self.best_auc + context.trainer.config.min_delta:
            self.best_auc = metrics["auc"]
            self.best_state = {k: v.detach().clone() for k, v in context.model.state_dict().items()}
        return None

    def on_stage_end(self, context: Any) -> Optional[Mapping[str, Any]]:
        if context.stage.name not in self.STAGES:
            return None
        restored = self.best_state is not None
        if restored:
            context.model.load_state_dict(self.best_state)
        self.best_state = None
        return {"restored_best": float(restored)}
