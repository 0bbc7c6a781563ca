"""``autosrh``: AutoSrh — frequency-grouped, dimension-wise soft selection, pruned to the budget.

References: Kong, Cheng, Shen, Huang, "AutoSrh: An Embedding Dimensionality Search Framework for
Tabular Data Prediction", IEEE TKDE 35(7), 2023 (doi:10.1109/TKDE.2022.3186387); its conference
predecessor Cheng, Shen, Huang, "Differentiable Neural Input Search for Recommender Systems"
(DNIS), arXiv:2006.04466.

Mechanism. Each compressed field's ids are sorted by training frequency (ties by id) and split
into ``num_groups`` groups of equal size (fewer when the field has fewer rows), so ids of similar
frequency share a group. Every group g has a soft selection vector alpha_g in R^D (init
``selection_init``); during stage ``search`` the embedding of id x in group g is e_x * alpha_g, and
the loss adds ``selection_l1`` * sum |alpha| so that unimportant (group, dim) pairs shrink. Then
``rebuild`` prunes: the (group, dim) pairs with the smallest |alpha| are removed for every id of
the group, until the kept entries fit the budget — the pair at the cut is kept for its ids with the
largest |e_x alpha_g| (so exactly ``nnz`` entries remain) — and stage ``retrain`` trains the masked
table (``retrain_init``: ``scratch`` re-draws the table and re-initialises the dense layers,
``inherit`` keeps the searched weights with alpha folded in), with fresh optimizer state; the mask
is re-applied after every step.

Budget: the deployable table is the pruned (R, D) table in the cheapest sparse format
(``sparse_storage``: dense, CSR, COO or bitmap, index bytes counted), at exactly ``nnz`` entries
(``PruningMethod``); the selection weights are training-only (folded into the table).

Deviation (see methods/autosrh.md): the paper updates alpha on validation batches (bi-level,
first-order alternating); here alpha is trained jointly with the table on the training loss
(single-level), so the validation split stays reserved for early stopping and model selection.

Shapes: KJT (F keys, B bags) -> per-id (N, D) * alpha (N, D) -> KeyedTensor (B, F * D); alpha (G, D).
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from recbench.methods.base import Hook, ParamGroup
from recbench.methods.mixed_dim import frequency_order
from recbench.methods.pruning import MaskHook, PrunedEmbedding, PruningMethod, pruning_stage_result, top_k_mask
from recbench.types import FP32_BYTES, EmbeddingOptimizer, MemoryReport, Stage, TableSpec

RETRAIN_INITS = ("scratch", "inherit")


def frequency_groups(tables: Sequence[TableSpec], num_groups: int) -> torch.Tensor:
    """(R,) int64 group of every stacked row: per field, ids by descending training count split
    into ``min(num_groups, n_f)`` equal-size groups; group ids are global (field after field)."""
    groups, offset = [], 0
    for t in tables:
        if t.counts is None:
            raise ValueError(f"method 'autosrh' groups ids by training frequency, but field {t.name!r} has no "
                             "counts (TableSpec.counts)")
        k = min(num_groups, t.num_embeddings)
        group = np.empty(t.num_embeddings, dtype=np.int64)
        for g, ids in enumerate(np.array_split(frequency_order(t), k)):
            group[ids] = offset + g
        groups.append(group)
        offset += k
    return torch.from_numpy(np.concatenate(groups)) if groups else torch.zeros(0, dtype=torch.int64)


def group_count(tables: Sequence[TableSpec], num_groups: int) -> int:
    return int(sum(min(num_groups, t.num_embeddings) for t in tables))


class AutoSrhEmbedding(PrunedEmbedding):
    """Soft-selected table (search) / masked table (retrain). forward: KJT -> (B, F * D)."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any]):
        super().__init__(tables, dim, hparams["kept"], hparams["nnz"])
        compressed = [t for t in self.tables if t.name not in self.kept_names]
        self.register_buffer("row_group", frequency_groups(compressed, int(hparams["num_groups"])), persistent=False)
        groups = group_count(compressed, int(hparams["num_groups"]))
        self.selection = nn.Parameter(torch.full((groups, dim), float(hparams["selection_init"])))
        self.register_buffer("retraining", torch.zeros((), dtype=torch.bool))
        self.selection_l1 = float(hparams["selection_l1"])
        self.selection_learning_rate = float(hparams["selection_learning_rate"])
        self.retrain_init = hparams["retrain_init"]

    def effective(self, rows, fields, values):
        if bool(self.retraining):
            return values * self.mask[rows]
        return values * self.selection[self.row_group[rows]]

    @torch.no_grad()
    def effective_table(self) -> torch.Tensor:
        if bool(self.retraining):
            return self.weight * self.mask
        return self.weight * self.selection[self.row_group]

    @torch.no_grad()
    def keep_scores(self) -> torch.Tensor:
        """(R, D) float64: the rank of the entry's (group, dim) pair by |alpha| (ascending), plus
        |e_x alpha_g| scaled into [0, 1) to order the ids within a pair."""
        if bool(self.retraining):
            return self.weight.abs()
        strength = self.selection.abs().double().flatten()
        pair_rank = torch.empty_like(strength)
        pair_rank[torch.argsort(strength, stable=True)] = torch.arange(strength.numel(), dtype=torch.float64)
        magnitude = self.effective_table().abs().double()
        within = magnitude / (float(magnitude.max()) + 1.0) if magnitude.numel() else magnitude
        return pair_rank.view_as(self.selection)[self.row_group] + within

    @torch.no_grad()
    def pruned_pairs(self) -> torch.Tensor:
        """(G, D) bool: (group, dim) pairs the deployable mask removes for every id of the group."""
        mask = self.deployable_mask()
        kept = torch.zeros_like(self.selection, dtype=torch.bool)
        kept.index_put_((self.row_group.unsqueeze(1).expand_as(mask)[mask],
                         torch.arange(self.dim).expand_as(mask)[mask]), torch.tensor(True))
        return ~kept

    @torch.no_grad()
    def start_retraining(self) -> None:
        """Freeze the mask (exactly ``nnz`` entries: the largest-|alpha| pairs) and reset the table."""
        mask = top_k_mask(self.keep_scores(), self.nnz)
        if self.retrain_init == "inherit":
            self.weight.copy_(self.effective_table() * mask)
        else:
            for position, size in enumerate(self.compressed_sizes()):
                start = self.field_start(position)
                bound = 1.0 / size ** 0.5
                self.weight[start:start + size].uniform_(-bound, bound)
            self.weight.mul_(mask)
        self.mask.copy_(mask)
        self.retraining.fill_(True)

    def compressed_sizes(self) -> List[int]:
        return [t.num_embeddings for t in self.tables if t.name not in self.kept_names]

    def field_start(self, position: int) -> int:
        return int(sum(self.compressed_sizes()[:position]))

    def extra_loss(self) -> torch.Tensor:
        if bool(self.retraining) or self.selection_l1 == 0:
            return torch.zeros(())
        return self.selection_l1 * self.selection.abs().sum()

    def param_groups(self) -> List[ParamGroup]:
        groups = [g for g in super().param_groups() if g.name != "decoder"]
        return groups + [ParamGroup("selection", [self.selection], learning_rate=self.selection_learning_rate)]


class SelectionReport(Hook):
    """Stage artifacts of the search: the selection weights, the pruned (group, dim) pairs, the mask's density."""

    def on_stage_end(self, context: Any) -> Optional[Mapping[str, Any]]:
        module = context.embedding
        if context.stage.name != "search" or not isinstance(module, AutoSrhEmbedding):
            return None
        pruned = module.pruned_pairs()
        return {**pruning_stage_result(module, True), "selection": module.selection.detach().clone(),
                "pruned_pairs": pruned, "pruned_pair_fraction": float(pruned.float().mean()),
                "selection_abs_mean": float(module.selection.abs().mean())}


class AutoSrh(PruningMethod):
    """Hyperparameters: see ``conf/method/autosrh.yaml`` and ``methods/autosrh.md``."""

    name = "autosrh"
    module_class = AutoSrhEmbedding

    def __init__(self, name: Optional[str] = None, nnz: Any = "auto", num_groups: int = 10,
                 selection_init: float = 1.0, selection_l1: float = 1e-4, selection_learning_rate: float = 1e-3,
                 retrain_init: str = "scratch", search_max_epochs: Optional[float] = None,
                 retrain_max_epochs: Optional[float] = None):
        super().__init__(name, nnz=nnz, num_groups=num_groups, selection_init=selection_init,
                         selection_l1=selection_l1, selection_learning_rate=selection_learning_rate,
                         retrain_init=retrain_init, search_max_epochs=search_max_epochs,
                         retrain_max_epochs=retrain_max_epochs)
        from recbench.methods.budget import check_auto

        check_auto(self.name, "nnz", nnz)
        if int(num_groups) < 1:
            raise ValueError(f"method 'autosrh': num_groups must be >= 1, got {num_groups}")
        if selection_l1 < 0 or not selection_learning_rate > 0:
            raise ValueError(f"method 'autosrh': selection_l1 must be >= 0 and selection_learning_rate > 0, got "
                             f"{selection_l1} and {selection_learning_rate}")
        if retrain_init not in RETRAIN_INITS:
            raise ValueError(f"method 'autosrh': retrain_init={retrain_init!r}; allowed: {', '.join(RETRAIN_INITS)}")
        self.num_groups, self.selection_init = int(num_groups), float(selection_init)
        self.selection_l1, self.selection_learning_rate = float(selection_l1), float(selection_learning_rate)
        self.retrain_init = retrain_init
        self.search_max_epochs, self.retrain_max_epochs = search_max_epochs, retrain_max_epochs

    def method_hparams(self) -> Dict[str, Any]:
        return {"num_groups": self.num_groups, "selection_init": self.selection_init,
                "selection_l1": self.selection_l1, "selection_learning_rate": self.selection_learning_rate,
                "retrain_init": self.retrain_init}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        report = super().memory(tables, dim, hparams, optimizer)
        compressed = [t for t in tables if t.name not in set(hparams["kept"])]
        selection = group_count(compressed, int(hparams["num_groups"])) * dim
        # alpha (Adam: 2 moments) + the phase flag; training-only, folded into the deployable table
        report.training_bytes += 3 * selection * FP32_BYTES + 1
        report.parameters += selection
        return report

    def stages(self) -> List[Stage]:
        return [Stage("search", max_epochs=self.search_max_epochs),
                Stage("retrain", max_epochs=self.retrain_max_epochs, reset_optimizer=True,
                      reinit=self.retrain_init == "scratch")]

    def hooks(self) -> List[Hook]:
        return [MaskHook(), SelectionReport()]

    def rebuild(self, module: AutoSrhEmbedding, stage_result: Mapping[str, Any]) -> AutoSrhEmbedding:
        if isinstance(module, AutoSrhEmbedding) and not bool(module.retraining):
            module.start_retraining()
        return module
