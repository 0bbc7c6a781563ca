"""``magnitude``: one-shot magnitude pruning of the trained embedding table, then fine-tuning.

References: Tran, Chen, Nguyen, Huang, Cui, Yin, "A Thorough Performance Benchmarking on Lightweight
Embedding-based Recommender Systems" (LERS), ACM TOIS (arXiv:2406.17335), its magnitude-pruning
baseline; code chenxing1999/recsys-benchmark at commit 31dc3095e358db1da858d78308ac4184fa703315:
``src/utils.py`` (``prune``), ``scripts/deepfm/run_l2_benchmark.py`` (CTR: the best validation
checkpoint of ``scripts/deepfm/train_deepfm.py`` pruned with ``num_min_item = 0``),
``scripts/cf_train/run_mag_prune.py`` and ``scripts/lightgcn/run_mag_prune.py`` (``num_min_item``).

Mechanism (the reference's ``prune``): element-wise, one global threshold over the whole stacked
embedding table: score every entry by ``|w|`` (with ``min_per_row > 0``, each row's
``min_per_row`` largest ``|w|`` score +inf, the reference's ``num_min_item``), zero the
lowest-scored entries and keep exactly ``nnz`` (the reference's ``int(R D p)`` pruned entries,
here ``R D - nnz`` from the budget). Schedule: stage ``dense`` trains the unpruned table with the
trainer's early stopping and ends on its best validation checkpoint (the checkpoint the reference
prunes); ``rebuild`` prunes it once; stage ``finetune`` trains at the fixed mask with early
stopping, its first checkpoint being the pruned model itself (``evaluate_at_start``), so when
fine-tuning only lowers validation AUC the reference's result (pruned, not retrained) is what is
tested. ``finetune: false`` is the reference exactly: stage ``pruned`` only records the mask and
the pruned model is tested. Pruned weights stay zero: the lookup multiplies by the mask (no
gradient reaches them) and the mask is re-applied to the touched rows after every optimizer step.

Budget (the pruning family, ``recbench.methods.families.pruning``): ``nnz`` is the largest number
of kept entries whose cheapest sparse storage (values + indices) fits the target.

Shapes: KJT (F keys, B bags) -> per-id (N, D) -> KeyedTensor (B, F * D); weight/mask (R, D).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from recbench.methods.blocks.restore_best import RestoreBest
from recbench.methods.base import Hook
from recbench.methods.blocks import sparse_storage
from recbench.methods.blocks.budget import kept_bytes, split_tables
from recbench.methods.families.pruning import (MaskHook, PrunedEmbedding, PruningFamily, PruningSettings,
                                               pruning_stage_result, top_k_mask)
from recbench.types import Budget, InfeasibleBudget, Stage, TableSpec, full_embedding_bytes


@torch.no_grad()
def magnitude_scores(table: torch.Tensor, min_per_row: int = 0) -> torch.Tensor:
    """(R, D) ranking of the entries of ``table``: ``|w|``, each row's ``min_per_row`` largest set to +inf."""
    scores = table.abs()
    if min_per_row:
        scores.scatter_(1, scores.topk(min_per_row, dim=1).indices, float("inf"))
    return scores


class MagnitudeEmbedding(PrunedEmbedding):
    """Stacked (R, D) table pruned once to its ``nnz`` largest magnitudes. forward: KJT -> (B, F * D)."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any]):
        super().__init__(tables, dim, hparams["kept"], hparams["nnz"])
        self.min_per_row = int(hparams.get("min_per_row", 0))

    @torch.no_grad()
    def keep_scores(self) -> torch.Tensor:
        return magnitude_scores(self.effective_table(), self.min_per_row)

    @torch.no_grad()
    def prune_once(self) -> None:
        """Keep exactly ``nnz`` entries, the highest ``keep_scores``; zero the rest."""
        self.mask.copy_(top_k_mask(self.keep_scores(), self.nnz))
        self.reapply_mask()

    @torch.no_grad()
    def threshold(self) -> float:
        """The smallest kept magnitude (the global threshold the pruning met)."""
        kept = self.weight.abs()[self.mask]
        return float(kept.min()) if kept.numel() else 0.0


class DenseBest(RestoreBest):
    """Stage ``dense`` ends on its best validation checkpoint (the trainer's rule), the one pruned."""

    STAGES = ("dense",)


class PrunedResult(Hook):
    """The stage after pruning reports the mask (``pruning_stage_result``) and the threshold it met."""

    STAGES = ("finetune", "pruned")

    def __init__(self):
        self.threshold = float("nan")

    def on_stage_start(self, context: Any) -> None:
        if context.stage.name in self.STAGES:
            self.threshold = context.embedding.threshold()

    def on_stage_end(self, context: Any) -> Optional[Mapping[str, Any]]:
        if context.stage.name not in self.STAGES:
            return None
        return {**pruning_stage_result(context.embedding, True), "threshold": self.threshold}


def _pruned(context: Any) -> Dict[str, Any]:
    """Stage ``pruned`` (``finetune: false``): nothing to train; the pruned model is tested as is."""
    return {}


@dataclass
class MagnitudeSettings(PruningSettings):
    """Hyperparameters of ``magnitude`` (defaults: LERS's CTR magnitude pruning, then a fine-tune)."""

    #: true: train at the fixed mask after pruning (early stopping; the first checkpoint is the pruned
    #: model); false: the reference exactly (the pruned best checkpoint is tested, not retrained)
    finetune: bool = True
    #: entries each row keeps whatever its magnitudes (the reference's num_min_item; 0, its CTR default:
    #: one global threshold)
    min_per_row: int = 0


class Magnitude(PruningFamily):
    """LERS's magnitude pruning; hyperparameters: ``MagnitudeSettings`` (and ``methods/magnitude.md``)."""

    name = "magnitude"
    module_class = MagnitudeEmbedding
    settings_class = MagnitudeSettings

    def check_settings(self) -> None:
        super().check_settings()
        if not isinstance(self.finetune, bool):
            raise ValueError(f"method 'magnitude': finetune must be true or false, got {self.finetune!r}")
        if isinstance(self.min_per_row, bool) or not isinstance(self.min_per_row, int) or self.min_per_row < 0:
            raise ValueError(f"method 'magnitude': min_per_row must be an integer >= 0, got {self.min_per_row!r}")

    def method_hparams(self) -> Dict[str, Any]:
        return {"min_per_row": self.min_per_row}

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        if self.min_per_row > dim:
            raise ValueError(f"method 'magnitude': min_per_row must be <= the embedding dim {dim}, got {self.min_per_row}")
        hparams = super().solve_hparams(tables, dim, budget)
        floor = self.min_per_row * hparams["rows"]
        if floor > hparams["nnz"]:  # the rows' guaranteed entries alone exceed the budget
            _, kept = split_tables(tables, budget)
            lowest = kept_bytes(kept, dim) + sparse_storage.stored_bytes(hparams["rows"], dim, floor, budget.sparse_index)
            full = full_embedding_bytes(tables, dim)
            raise InfeasibleBudget(self.name, budget.compression_ratio, lowest / full, 1.0,
                                   f"min_per_row={self.min_per_row} keeps {floor} entries of {hparams['rows']} rows "
                                   f"but the budget allows {hparams['nnz']}; lower min_per_row")
        return hparams

    def stages(self) -> List[Stage]:
        after = Stage("finetune", evaluate_at_start=True) if self.finetune else Stage("pruned", kind="search", run=_pruned)
        return [Stage("dense"), after]

    def hooks(self) -> List[Hook]:
        return [MaskHook(), DenseBest(), PrunedResult()]

    def rebuild(self, module: MagnitudeEmbedding, stage_result: Mapping[str, Any]) -> MagnitudeEmbedding:
        module.prune_once()
        return module
