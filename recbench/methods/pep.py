"""``pep``: Plug-in Embedding Pruning — learnable soft thresholds, then lottery-ticket retraining.

References: Liu, Li, Guo, Ren, Tang, Li, "Learnable Embedding Sizes for Recommender Systems",
ICLR 2021 (arXiv:2101.07577).

Mechanism (paper Eq. 4-6): the embedding actually used is the soft-thresholded weight
``w_hat = sign(w) * relu(|w| - g(s))`` with ``g = sigmoid`` and a learnable threshold ``s`` whose
granularity is ``global`` (one scalar), ``dimension`` (D), ``field`` (one per compressed field) or
``field_dimension`` (F_c, D). ``s`` starts at ``threshold_init`` (the paper's -15: g(s) ~ 3e-7) and
is trained jointly with the table by the task loss plus ``threshold_weight_decay`` * ||s||^2 / 2
(the reference code's L2 on every parameter: it pulls s towards 0, raising the threshold); the
thresholds are their own parameter group (Adam, ``threshold_learning_rate``). Adam moves s by at
most its learning rate per step, so ``threshold_learning_rate="auto"`` is ``|threshold_init| /
(search_epochs * steps per epoch)``: the step count in which that pull can carry s from its
initial value to 0 (g = 0.5, every usual entry pruned) — the target is reached inside the search
whatever the dataset's size (the reference's fixed 1e-3 assumes Criteo's ~40k steps per epoch).
An optional ``embedding_weight_decay`` * ||batch entries||^2 / 2 (a sum over the batch's
lookups, so a row is decayed once per occurrence) is off by default: on ``synthetic`` it shrank
the most frequent rows' entries ~100-fold, lowering the search model and dropping those fields
from the mask (methods/pep.md, Revisions).
Stage ``search`` ends as soon as the sparsity of ``w_hat`` reaches the target (a hook checks it
every ``sparsity_check_interval`` steps and requests the stage end). Then ``rebuild`` freezes the
mask — the ``nnz`` entries with the largest margin ``|w| - g(s)``, i.e. every surviving entry plus
the closest-to-surviving ones if the last step overshot — rewinds the table to its saved initial
weights (lottery ticket, ``initial_weight`` buffer) and stage ``retrain`` trains ``w * mask`` with
the dense layers re-initialised and fresh optimizer state.

Budget: ``nnz`` is the largest number of kept entries whose cheapest sparse storage (values +
indices, ``sparse_storage``) fits the target; the target sparsity is ``1 - nnz / (R D)``.

Shapes: KJT (F keys, B bags) -> per-id (N, D) -> KeyedTensor (B, F * D); s broadcast to (N, D).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from recbench.methods import batch_part
from recbench.methods.base import Hook, ParamGroup
from recbench.methods.pruning import (MaskHook, PrunedEmbedding, PruningMethod, mask_artifacts, pruning_stage_result,
                                      top_k_mask)
from recbench.types import FP32_BYTES, Stage, TableSpec

GRANULARITIES = ("global", "dimension", "field", "field_dimension")


def threshold_shape(granularity: str, num_fields: int, dim: int):
    return {"global": (1, 1), "dimension": (1, dim), "field": (num_fields, 1),
            "field_dimension": (num_fields, dim)}[granularity]


class PEPEmbedding(PrunedEmbedding):
    """Soft-thresholded table (search) / masked rewound table (retrain). forward: KJT -> (B, F * D)."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any]):
        super().__init__(tables, dim, hparams["kept"], hparams["nnz"])
        self.granularity = hparams["granularity"]
        self.threshold_learning_rate = float(hparams["threshold_learning_rate"])
        self.threshold_weight_decay = float(hparams["threshold_weight_decay"])
        self.embedding_weight_decay = float(hparams["embedding_weight_decay"])
        self._batch_values: Optional[torch.Tensor] = None  # the last training batch's gathered rows
        fields = len(self.tables) - len(self.kept_names)
        self.threshold = nn.Parameter(torch.full(threshold_shape(self.granularity, fields, dim),
                                                 float(hparams["threshold_init"])))
        self.register_buffer("initial_weight", self.weight.detach().clone())
        self.register_buffer("retraining", torch.zeros((), dtype=torch.bool))
        # per stacked row: its compressed field's position (for field thresholds)
        self.register_buffer("row_field", torch.repeat_interleave(
            torch.arange(fields), torch.tensor([t.num_embeddings for t in self.tables if t.name not in self.kept_names])),
            persistent=False)

    def gate(self, fields_of_rows: torch.Tensor) -> torch.Tensor:
        """g(s) broadcast to (N, D) for the given compressed-field positions (N,)."""
        g = torch.sigmoid(self.threshold)
        return g[fields_of_rows] if g.shape[0] > 1 else g.expand(fields_of_rows.numel(), -1)

    def effective(self, rows, fields, values):
        if self.training:
            self._batch_values = values
        if bool(self.retraining):
            return values * self.mask[rows]
        return torch.sign(values) * torch.relu(values.abs() - self.gate(self.compressed_position[fields]))

    @torch.no_grad()
    def margin(self) -> torch.Tensor:
        """(R, D) |w| - g(s): positive where an entry survives the soft threshold."""
        return self.weight.abs() - self.gate(self.row_field)

    @torch.no_grad()
    def effective_table(self) -> torch.Tensor:
        if bool(self.retraining):
            return self.weight * self.mask
        return torch.sign(self.weight) * torch.relu(self.margin())

    @torch.no_grad()
    def keep_scores(self) -> torch.Tensor:
        return self.weight.abs() if bool(self.retraining) else self.margin()

    @torch.no_grad()
    def sparsity(self) -> float:
        """Fraction of compressed entries zeroed by the soft threshold (search) or the mask."""
        if bool(self.retraining):
            return 1.0 - self.density()
        return float((self.margin() <= 0).sum()) / self.weight.numel()

    def target_sparsity(self) -> float:
        return 1.0 - self.nnz / self.weight.numel()

    @torch.no_grad()
    def start_retraining(self) -> None:
        """Freeze the mask (the nnz largest margins) and rewind the table to its initial weights."""
        self.mask.copy_(top_k_mask(self.margin(), self.nnz))
        self.weight.copy_(self.initial_weight * self.mask)
        self.retraining.fill_(True)

    def extra_loss(self) -> torch.Tensor:
        """Search: L2 on s and on the batch's table entries (the reference code's weight decay)."""
        loss = torch.zeros(())
        if bool(self.retraining):
            return loss
        if self.threshold_weight_decay:
            loss = loss + 0.5 * self.threshold_weight_decay * (self.threshold ** 2).sum()
        if self.embedding_weight_decay and self._batch_values is not None:
            # a sum over the batch: distributed, this rank's rows weighted so that ranks add up to it
            loss = loss + 0.5 * self.embedding_weight_decay * (self._batch_values ** 2).sum() * batch_part.batch_sum_scale()
            self._batch_values = None
        return loss

    def param_groups(self) -> List[ParamGroup]:
        groups = [g for g in super().param_groups() if g.name != "decoder"]
        return groups + [ParamGroup("thresholds", [self.threshold], learning_rate=self.threshold_learning_rate)]


class SparsityHook(Hook):
    """Ends stage ``search`` when the soft threshold's sparsity reaches the target."""

    def __init__(self, interval: int, method: Optional["PEP"] = None):
        self.interval = int(interval)
        self.method = method
        self.reached = False
        self.learning_rate: Optional[float] = None  # the thresholds' learning rate of the last search

    def on_stage_start(self, context: Any) -> None:
        if context.stage.name != "search":
            return
        self.reached = False
        if self.method is not None:  # the thresholds' learning rate for this dataset's steps per epoch
            steps_per_epoch = math.ceil(len(context.trainer.split("train")) / context.trainer.config.batch_size)
            rate = self.method.search_threshold_learning_rate(steps_per_epoch)
            for optimizer in context.trainer.optimizers.values():
                for group in optimizer.param_groups:
                    if group.get("name") == "thresholds":
                        group["lr"] = rate
            self.learning_rate = rate

    def on_step_end(self, context: Any) -> Optional[bool]:
        module = context.embedding
        if context.stage.name != "search" or context.stage_step % self.interval:
            return None
        sparsity = module.sparsity()
        if sparsity >= module.target_sparsity():
            self.reached = True
            return True
        return None

    def on_stage_end(self, context: Any) -> Optional[Mapping[str, Any]]:
        module = context.embedding
        if context.stage.name == "retrain":
            return mask_artifacts(module)  # the frozen mask the deployable form uses
        if context.stage.name != "search":
            return None
        return {**pruning_stage_result(module, self.reached), "sparsity": module.sparsity(),
                "target_sparsity": module.target_sparsity(),
                "threshold_mean": float(torch.sigmoid(module.threshold.detach()).mean()),
                **({"threshold_learning_rate": self.learning_rate} if self.learning_rate is not None else {})}


class PEP(PruningMethod):
    """Hyperparameters: see ``conf/method/pep.yaml`` and ``methods/pep.md``."""

    name = "pep"
    module_class = PEPEmbedding

    #: 2: threshold learning rate scaled to the protocol's steps ("auto") and no L2 on the batch's
    #: table entries by default (methods/pep.md, Revisions)
    revision = 2

    def __init__(self, name: Optional[str] = None, nnz: Any = "auto", granularity: str = "field_dimension",
                 threshold_init: float = -15.0, threshold_learning_rate: Any = "auto", search_epochs: float = 1.0,
                 threshold_weight_decay: float = 1e-2, embedding_weight_decay: float = 0.0,
                 sparsity_check_interval: int = 10,
                 search_max_epochs: Optional[float] = None):
        super().__init__(name, nnz=nnz, granularity=granularity, threshold_init=threshold_init,
                         threshold_learning_rate=threshold_learning_rate, search_epochs=search_epochs,
                         threshold_weight_decay=threshold_weight_decay, embedding_weight_decay=embedding_weight_decay,
                         sparsity_check_interval=sparsity_check_interval, search_max_epochs=search_max_epochs)
        from recbench.methods.budget import check_auto

        check_auto(self.name, "nnz", nnz)
        if granularity not in GRANULARITIES:
            raise ValueError(f"method 'pep': granularity={granularity!r} is not supported; allowed: "
                             f"{', '.join(GRANULARITIES)}")
        if isinstance(threshold_learning_rate, str):
            check_auto(self.name, "threshold_learning_rate", threshold_learning_rate)
        elif not threshold_learning_rate > 0:
            raise ValueError(f"method 'pep': threshold_learning_rate must be > 0 or 'auto', got {threshold_learning_rate}")
        if not search_epochs > 0:
            raise ValueError(f"method 'pep': search_epochs must be > 0, got {search_epochs}")
        if not threshold_init < 0:
            raise ValueError(f"method 'pep': threshold_init must be < 0 (g(s) = sigmoid(s) < 0.5 at the start), "
                             f"got {threshold_init}")
        for key, value in (("threshold_weight_decay", threshold_weight_decay), ("embedding_weight_decay", embedding_weight_decay)):
            if value < 0:
                raise ValueError(f"method 'pep': {key} must be >= 0, got {value}")
        if int(sparsity_check_interval) < 1:
            raise ValueError(f"method 'pep': sparsity_check_interval must be >= 1, got {sparsity_check_interval}")
        self.granularity, self.threshold_init = granularity, float(threshold_init)
        self.auto_threshold_learning_rate = isinstance(threshold_learning_rate, str)
        # "auto": a placeholder until the search stage knows its steps per epoch (SparsityHook)
        self.threshold_learning_rate = 0.01 if self.auto_threshold_learning_rate else float(threshold_learning_rate)
        self.search_epochs, self.threshold_weight_decay = float(search_epochs), float(threshold_weight_decay)
        self.embedding_weight_decay = float(embedding_weight_decay)
        self.sparsity_check_interval = int(sparsity_check_interval)
        self.search_max_epochs = None if search_max_epochs is None else float(search_max_epochs)

    def method_hparams(self) -> Dict[str, Any]:
        return {"granularity": self.granularity, "threshold_init": self.threshold_init,
                "threshold_learning_rate": self.threshold_learning_rate,
                "threshold_weight_decay": self.threshold_weight_decay,
                "embedding_weight_decay": self.embedding_weight_decay}

    def dense_parameters(self, rows: int, dim: int, num_compressed_fields: int) -> int:
        shape = threshold_shape(self.granularity, num_compressed_fields, dim)
        return shape[0] * shape[1]

    def extra_state(self, rows: int, dim: int, num_compressed_fields: int) -> int:
        # thresholds + the saved initial table (lottery-ticket rewind) + the phase flag
        return self.dense_parameters(rows, dim, num_compressed_fields) * FP32_BYTES + rows * dim * FP32_BYTES + 1

    def stages(self) -> List[Stage]:
        return [Stage("search", max_epochs=self.search_max_epochs, early_stopping=False),
                Stage("retrain", reset_optimizer=True, reinit=True)]

    def hooks(self) -> List[Hook]:
        return [MaskHook(), SparsityHook(self.sparsity_check_interval, self)]

    def search_threshold_learning_rate(self, steps_per_epoch: int) -> float:
        """The thresholds' Adam learning rate in the search: the configured one, or ("auto") the
        rate at which Adam's at-most-lr steps carry s from ``threshold_init`` to 0 in ``search_epochs``."""
        if not self.auto_threshold_learning_rate:
            return self.threshold_learning_rate
        return abs(self.threshold_init) / max(1.0, self.search_epochs * steps_per_epoch)

    def rebuild(self, module: PEPEmbedding, stage_result: Mapping[str, Any]) -> PEPEmbedding:
        if not bool(module.retraining):
            module.start_retraining()
        return module
