"""``autosrh``: AutoSrh — frequency-grouped, dimension-wise soft selection, pruned to the budget.

References: Kong, Cheng, Shen, Huang, "AutoSrh: An Embedding Dimensionality Search Framework for
Tabular Data Prediction", IEEE TKDE 35(7), 2023 (doi:10.1109/TKDE.2022.3186387); Hsword/Hetu
``tools/EmbeddingMemoryCompression/methods/layers/autosrh.py``, ``methods/scheduler/autosrh.py``,
``models/load_data.py`` (``get_whole_frequency_grouping``) and ``run_compressed.py`` (nsplit 6,
alpha_l1 1e-5, alpha_lr 1e-3), commit a1cb1bcaf236c9f1d452733b105997d50c16c9df.

Mechanism (``schedule: hetu``, the default, as Hetu's ``AutoSrhOverallTrainer``). The compressed
rows of every field are split, over the whole feature space, into ``num_groups`` frequency groups
(``grouping: global``: ascending training count, group boundaries on count changes). Every group g
has a selection vector alpha_g in R^D (init 1). Three stages, each starting from the previous
stage's best validation checkpoint with fresh optimizer state:

* ``warmup``: the plain table and the dense layers train as ``full`` does.
* ``search``: the embedding of id x in group g is e_x * alpha_g. Each step is one training batch
  that updates the embedding table only (dense layers frozen), then one validation batch (in
  order, cycling) that updates alpha only: g = dL_val/dalpha + ``selection_l1`` * sign(alpha),
  normalised per group by its mean |g| over the D dims (+1e-8), an SGD step of
  ``selection_learning_rate``, then alpha clipped to [0, 1].
* ``retrain``: alpha frozen, table and dense layers train on e_x * alpha_g. The deployable table is
  then one magnitude prune of e_x * alpha_g: the ``nnz`` largest |entries| are kept.

``schedule: joint`` is a single-level variant: alpha joins the table and dense
layers on the training loss (its own Adam group, unclipped, no warm-up), then the (group, dim) pairs
with the smallest |alpha| are removed until the kept entries fit (the pair at the cut keeps its ids
with the largest |e_x alpha_g|) and the masked table retrains (``retrain_init``). ``grouping:
per_field`` is its grouping: each field's ids by descending count in ``num_groups`` equal parts.

Budget: the deployable table is the pruned (R, D) table in the cheapest sparse format
(``sparse_storage``: dense, CSR, COO or bitmap, index bytes counted), at exactly ``nnz`` entries
(``PruningFamily``); alpha is training-only (folded into the table).

Shapes: KJT (F keys, B bags) -> per-id (N, D) * alpha (N, D) -> KeyedTensor (B, F * D); alpha (G, D).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from recbench.datasets.batching import BatchIterator
from recbench.methods.base import Hook, ParamGroup
from recbench.methods.blocks.restore_best import RestoreBest
from recbench.methods.mixed_dim import frequency_order
from recbench.methods.families.pruning import (MaskHook, PrunedEmbedding, PruningFamily, PruningSettings,
                                               pruning_stage_result, top_k_mask)
from recbench.models.tasks import training_loss
from recbench.types import FP32_BYTES, EmbeddingOptimizer, MemoryReport, Stage, TableSpec

SCHEDULES = ("hetu", "joint")
GROUPINGS = ("global", "per_field")
RETRAIN_INITS = ("inherit", "scratch")
WARMUP, SEARCH, RETRAIN = 0, 1, 2
#: Hetu adds 1e-8 to the per-group mean |gradient| before dividing by it
NORMALISATION_EPS = 1e-8


def whole_space_groups(counts: np.ndarray, num_groups: int) -> np.ndarray:
    """(R,) int64 group of every row from its training count (R,): Hetu's
    ``get_whole_frequency_grouping``. Rows by ascending count; group g takes the next
    ``(rows left) / (groups left)`` rows, its end moved to the nearer edge of the run of equal counts
    it falls in (the upper edge on a tie), or the whole run of the smallest count left when that run
    alone is at least as long; rows left after the last group join it. Group 0 is the rarest. Ties
    never straddle a boundary, so the tie order of the sort does not matter; fewer groups are used
    when the rows run out first (Hetu asserts instead)."""
    counts = np.asarray(counts)
    n = counts.size
    order = np.argsort(counts, kind="stable")
    ranked = counts[order]
    group = np.zeros(n, dtype=np.int64)
    start = 0
    for g in range(num_groups):
        if start >= n:
            break
        share = (n - start) / (num_groups - g)
        run_end = int(np.searchsorted(ranked, ranked[start], side="right"))
        if run_end - start >= share:
            end = run_end
        else:
            cut = start + int(share) - 1
            low = int(np.searchsorted(ranked, ranked[cut], side="left"))
            high = int(np.searchsorted(ranked, ranked[cut], side="right"))
            end = high if high - cut <= cut - low + 1 else low
        group[order[start:end]] = g
        start = end
    group[order[start:]] = num_groups - 1
    return group


def frequency_groups(tables: Sequence[TableSpec], num_groups: int, grouping: str = "global") -> Tuple[torch.Tensor, int]:
    """((R,) int64 group of every stacked row, number of groups G): ``global`` — Hetu's groups over
    the stacked rows of every field (``whole_space_groups``, G = ``num_groups``); ``per_field`` — per
    field, ids by descending training count split into ``min(num_groups, n_f)`` equal-size groups,
    numbered field after field."""
    for t in tables:
        if t.counts is None:
            raise ValueError(f"method 'autosrh' groups ids by training frequency, but field {t.name!r} has no "
                             "counts (TableSpec.counts)")
    if not tables:
        return torch.zeros(0, dtype=torch.int64), 0
    if grouping == "global":
        counts = np.concatenate([np.asarray(t.counts) for t in tables])
        return torch.from_numpy(whole_space_groups(counts, num_groups)), int(num_groups)
    groups, offset = [], 0
    for t in tables:
        k = min(num_groups, t.num_embeddings)
        group = np.empty(t.num_embeddings, dtype=np.int64)
        for g, ids in enumerate(np.array_split(frequency_order(t), k)):
            group[ids] = offset + g
        groups.append(group)
        offset += k
    return torch.from_numpy(np.concatenate(groups)), offset


def group_count(tables: Sequence[TableSpec], num_groups: int, grouping: str = "global") -> int:
    if grouping == "global":
        return int(num_groups) if tables else 0
    return int(sum(min(num_groups, t.num_embeddings) for t in tables))


@torch.no_grad()
def normalised_clipped_sgd_(alpha: torch.Tensor, grad: torch.Tensor, learning_rate: float) -> None:
    """Hetu's alpha update in place, alpha and grad (G, D): alpha -= lr * grad / (mean_d |grad| + 1e-8)
    per group (row), then alpha clipped to [0, 1]."""
    scale = grad.abs().mean(dim=-1, keepdim=True) + NORMALISATION_EPS
    alpha.sub_(learning_rate * (grad / scale)).clamp_(0.0, 1.0)


class AutoSrhEmbedding(PrunedEmbedding):
    """Table with a per-(group, dim) selection; phases warmup / search / retrain. forward: KJT -> (B, F * D)."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any]):
        super().__init__(tables, dim, hparams["kept"], hparams["nnz"])
        compressed = [t for t in self.tables if t.name not in self.kept_names]
        self.schedule, self.retrain_init = hparams["schedule"], hparams["retrain_init"]
        row_group, groups = frequency_groups(compressed, int(hparams["num_groups"]), hparams["grouping"])
        self.register_buffer("row_group", row_group, persistent=False)
        # hetu: alpha is stepped by ``SelectionStep`` only (never by an optimizer); joint: its own Adam group
        self.selection = nn.Parameter(torch.full((groups, dim), float(hparams["selection_init"])),
                                      requires_grad=self.schedule == "joint")
        self.register_buffer("phase", torch.tensor(WARMUP if self.schedule == "hetu" else SEARCH, dtype=torch.int8))
        self.selection_l1 = float(hparams["selection_l1"])
        self.selection_learning_rate = float(hparams["selection_learning_rate"])

    @property
    def retraining(self) -> bool:
        return int(self.phase) == RETRAIN

    def masked_retrain(self) -> bool:
        """joint's retrain: the table under its pair mask, alpha no longer used."""
        return self.schedule == "joint" and self.retraining

    def effective(self, rows, fields, values):
        """(N,) rows -> (N, D): e_x, e_x * alpha_g (gathered by ``index_select``) or joint's masked e_x."""
        if int(self.phase) == WARMUP:
            return values
        if self.masked_retrain():
            return values * self.mask.index_select(0, rows)
        return values * self.selection.index_select(0, self.row_group.index_select(0, rows))

    @torch.no_grad()
    def effective_table(self) -> torch.Tensor:
        if int(self.phase) == WARMUP or self.masked_retrain():
            return self.weight * self.mask
        return self.weight * self.selection[self.row_group]

    @torch.no_grad()
    def keep_scores(self) -> torch.Tensor:
        """(R, D) float64 ranking of the deployable entries. hetu: |e_x alpha_g| (Hetu's magnitude
        prune). joint: the rank of the entry's (group, dim) pair by |alpha| (ascending), plus
        |e_x alpha_g| scaled into [0, 1) to order the ids within a pair; |weight| once retraining."""
        if self.schedule == "hetu":
            return self.effective_table().abs().double()
        if self.retraining:
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
    def advance(self) -> None:
        """The next phase. Into retrain: joint freezes its pair mask (exactly ``nnz`` entries, the
        largest-|alpha| pairs); ``retrain_init=scratch`` re-draws the table (DLRM init per field),
        ``inherit`` keeps it (joint: with alpha folded in)."""
        phase = int(self.phase)
        if phase == RETRAIN:
            return
        if phase + 1 == RETRAIN and self.schedule == "joint":
            mask = top_k_mask(self.keep_scores(), self.nnz)
            if self.retrain_init == "inherit":
                self.weight.copy_(self.effective_table() * mask)
            self.mask.copy_(mask)
        self.phase.fill_(phase + 1)
        if phase + 1 != RETRAIN:
            return
        if self.retrain_init == "scratch":
            start = 0
            for size in self.compressed_sizes():
                bound = 1.0 / size ** 0.5
                self.weight[start:start + size].uniform_(-bound, bound)
                start += size
            self.weight.mul_(self.mask)

    def compressed_sizes(self) -> List[int]:
        return [t.num_embeddings for t in self.tables if t.name not in self.kept_names]

    def selection_step(self, data_loss: Callable[[], torch.Tensor],
                       reduce: Callable[[torch.Tensor], torch.Tensor] = lambda grad: grad) -> None:
        """One alpha step of Hetu's search (``AutoSrhTrainer``'s ``alpha`` node): the gradient (G, D) of
        ``data_loss()`` (a scalar computed through this module; ``reduce`` averages it over ranks)
        plus ``selection_l1`` * sign(alpha), then ``normalised_clipped_sgd_``. Only alpha changes."""
        alpha, trained = self.selection, self.selection.requires_grad
        alpha.requires_grad_(True)
        try:
            (grad,) = torch.autograd.grad(data_loss(), [alpha])
        finally:
            alpha.requires_grad_(trained)
        grad = reduce(grad) + self.selection_l1 * torch.sign(alpha.detach())
        normalised_clipped_sgd_(alpha.data, grad, self.selection_learning_rate)

    def extra_loss(self) -> torch.Tensor:
        """``selection_l1`` * sum |alpha| during the search (hetu: a constant of the table's step,
        logged with the loss as in Hetu; alpha's step adds its gradient itself)."""
        if int(self.phase) != SEARCH or self.selection_l1 == 0:
            return torch.zeros(())
        return self.selection_l1 * self.selection.abs().sum()

    def param_groups(self) -> List[ParamGroup]:
        groups = [g for g in super().param_groups() if g.name != "decoder"]
        if self.schedule == "joint":
            groups.append(ParamGroup("selection", [self.selection], learning_rate=self.selection_learning_rate))
        return groups

    def memory_report(self) -> MemoryReport:
        report = super().memory_report()
        if not self.selection.requires_grad:  # hetu: alpha is a parameter stepped outside any optimizer
            report.parameters += self.selection.numel()
        return report


# --------------------------------------------------------------------------------------------- hooks
class FrozenDense(Hook):
    """Stage ``search``: only the embedding module's parameters train (Hetu's ``embed`` step holds
    the table's update alone); the model's other parameters get no gradient, so no optimizer moves them."""

    def __init__(self):
        self.frozen: List[nn.Parameter] = []

    def on_stage_start(self, context: Any) -> None:
        if context.stage.name == "search":
            own = {id(p) for p in context.embedding.parameters()}
            self.frozen = [p for p in context.model.parameters() if p.requires_grad and id(p) not in own]
            for p in self.frozen:
                p.requires_grad_(False)

    def on_stage_end(self, context: Any) -> Optional[Mapping[str, Any]]:
        for p in self.frozen:
            p.requires_grad_(True)
        self.frozen = []
        return None


class SelectionStep(Hook):
    """Stage ``search`` (hetu): after every training step, one alpha step on the next validation batch
    (in order, ``trainer.batch_size`` rows, the incomplete last batch dropped, cycling; the position
    follows the stage step, so a resumed stage continues where it was)."""

    def __init__(self):
        self.batches = None

    def on_stage_start(self, context: Any) -> None:
        self.batches = None

    def validation_batch(self, context: Any):
        trainer = context.trainer
        split = trainer.split("val")
        size = trainer.config.batch_size
        iterator = trainer.parallel.iterate(BatchIterator(trainer.dataset.spec, split, size,
                                                          drop_last=len(split) >= size))
        count = len(iterator)
        step = context.stage_step - 1
        if self.batches is None or step % count == 0:
            self.batches = iterator.epoch(step // count, step % count)
        return next(self.batches)

    def on_step_end(self, context: Any) -> Optional[bool]:
        module = context.embedding
        if context.stage.name != "search" or not isinstance(module, AutoSrhEmbedding) or int(module.phase) != SEARCH:
            return None
        batch = self.validation_batch(context)
        model = getattr(context.model, "inner", None) or context.model  # distributed: outside DDP
        parallel = context.trainer.parallel

        def validation_loss() -> torch.Tensor:
            with parallel.placement(batch):
                output = model(batch.dense_features, batch.sparse_features)
            return training_loss(model, output, batch, parallel.row_scale(batch))

        def rank_mean(grad: torch.Tensor) -> torch.Tensor:  # one process: grad itself
            return torch.stack(parallel.concat_ranks([grad])[0].split(grad.shape[0])).mean(0)

        module.selection_step(validation_loss, rank_mean)
        return None


class SelectionReport(Hook):
    """Stage artifacts of the search: alpha and its range; joint adds the pruned (group, dim) pairs
    and the mask's density."""

    def on_stage_end(self, context: Any) -> Optional[Mapping[str, Any]]:
        module = context.embedding
        if context.stage.name != "search" or not isinstance(module, AutoSrhEmbedding):
            return None
        alpha = module.selection.detach()
        result = {"selection": alpha.clone(), "selection_abs_mean": float(alpha.abs().mean()),
                  "selection_min": float(alpha.min()), "selection_max": float(alpha.max()),
                  "selection_zero_fraction": float((alpha == 0).float().mean())}
        if module.schedule == "joint":
            pruned = module.pruned_pairs()
            result.update({**pruning_stage_result(module, True), "pruned_pairs": pruned,
                           "pruned_pair_fraction": float(pruned.float().mean())})
        return result


@dataclass
class AutoSrhSettings(PruningSettings):
    """Hyperparameters of ``autosrh`` (defaults: Hetu's autosrh, VLDB 2024 artifact, commit a1cb1bc;
    recbench's earlier regime (revision 1): schedule=joint grouping=per_field num_groups=10
    selection_l1=1e-4 retrain_init=scratch)."""

    #: hetu (warmup -> search: table on train batches, dense frozen, alpha by normalised clipped SGD on val
    #: batches -> retrain -> magnitude prune) | joint (alpha by Adam on the train loss with everything,
    #: pairs pruned, masked retrain)
    schedule: str = "hetu"
    #: global (Hetu: frequency groups over the whole feature space) | per_field (equal-size groups per field)
    grouping: str = "global"
    num_groups: int = 6  #: frequency groups (Hetu's nsplit)
    selection_init: float = 1.0  #: alpha at the start (Hetu: ones)
    selection_l1: float = 1.0e-5  #: L1 strength on alpha (Hetu's alpha_l1)
    #: alpha's step (hetu: SGD on the normalised gradient, Hetu's alpha_lr; joint: Adam)
    selection_learning_rate: float = 1.0e-3
    #: inherit (Hetu: the searched table) | scratch (re-drawn table, dense layers re-initialised)
    retrain_init: str = "inherit"
    warmup_max_epochs: Optional[float] = None  #: cap of the warm-up stage (hetu; null: trainer.max_epochs)
    search_max_epochs: Optional[float] = None  #: cap of the search stage (null: trainer.max_epochs)
    retrain_max_epochs: Optional[float] = None  #: cap of the retrain stage (null: trainer.max_epochs)


class AutoSrh(PruningFamily):
    """AutoSrh; hyperparameters: ``AutoSrhSettings`` (and ``methods/autosrh.md``)."""

    name = "autosrh"
    module_class = AutoSrhEmbedding
    settings_class = AutoSrhSettings
    #: see the card's "Revisions"
    revision = 2

    def check_settings(self) -> None:
        super().check_settings()
        num_groups, selection_l1 = self.num_groups, self.selection_l1
        selection_learning_rate = self.selection_learning_rate
        for key, value, allowed in (("schedule", self.schedule, SCHEDULES), ("grouping", self.grouping, GROUPINGS),
                                    ("retrain_init", self.retrain_init, RETRAIN_INITS)):
            if value not in allowed:
                raise ValueError(f"method 'autosrh': {key}={value!r}; allowed: {', '.join(allowed)}")
        if isinstance(num_groups, bool) or int(num_groups) != num_groups or int(num_groups) < 1:
            raise ValueError(f"method 'autosrh': num_groups={num_groups!r}; allowed: an integer >= 1")
        if not selection_l1 >= 0:
            raise ValueError(f"method 'autosrh': selection_l1={selection_l1!r}; allowed: a number >= 0")
        if not selection_learning_rate > 0:
            raise ValueError(f"method 'autosrh': selection_learning_rate={selection_learning_rate!r}; "
                             "allowed: a number > 0")
        self.num_groups = int(num_groups)
        self.selection_init, self.selection_l1 = float(self.selection_init), float(selection_l1)
        self.selection_learning_rate = float(selection_learning_rate)

    def method_hparams(self) -> Dict[str, Any]:
        return {"schedule": self.schedule, "grouping": self.grouping, "num_groups": self.num_groups,
                "selection_init": self.selection_init, "selection_l1": self.selection_l1,
                "selection_learning_rate": self.selection_learning_rate, "retrain_init": self.retrain_init}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        report = super().memory(tables, dim, hparams, optimizer)
        compressed = [t for t in tables if t.name not in set(hparams["kept"])]
        selection = group_count(compressed, int(hparams["num_groups"]), hparams["grouping"]) * dim
        # alpha (joint: + Adam's 2 moments; hetu: plain SGD, no state) + the int8 phase; training-only
        copies = 3 if hparams["schedule"] == "joint" else 1
        report.training_bytes += copies * selection * FP32_BYTES + 1
        report.parameters += selection
        return report

    def stages(self) -> List[Stage]:
        retrain = Stage("retrain", max_epochs=self.retrain_max_epochs, reset_optimizer=True,
                        reinit=self.retrain_init == "scratch")
        if self.schedule == "joint":
            return [Stage("search", max_epochs=self.search_max_epochs), retrain]
        return [Stage("warmup", max_epochs=self.warmup_max_epochs),
                Stage("search", max_epochs=self.search_max_epochs, reset_optimizer=True), retrain]

    def hooks(self) -> List[Hook]:
        if self.schedule == "joint":
            return [MaskHook(), SelectionReport()]
        return [RestoreBest(), FrozenDense(), SelectionStep(), SelectionReport()]

    def rebuild(self, module: AutoSrhEmbedding, stage_result: Mapping[str, Any]) -> AutoSrhEmbedding:
        if isinstance(module, AutoSrhEmbedding):
            module.advance()
        return module
