"""``pep``: Plug-in Embedding Pruning — learnable soft thresholds, then lottery-ticket retraining.

References: Liu, Gao, Chen, Jin, Li, "Learnable Embedding Sizes for Recommender Systems", ICLR 2021
(arXiv:2101.07577); code ssui-liu/learnable-embed-sizes-for-RecSys@e4d07d2 (``models/pep_embedding.py``,
``engine.py``, ``train_ml-1m.py``, ``utils/train.py``); Hsword/Hetu@a1cb1bc
``tools/EmbeddingMemoryCompression/methods/layers/pep.py``, ``methods/scheduler/pep.py``.

Mechanism (paper Eq. 4-6): the embedding used in stage ``search`` is the soft-thresholded weight
``w_hat = sign(w) * relu(|w| - g(s))`` with ``g = sigmoid`` and a learnable threshold ``s`` of
granularity ``feature_dim`` (one per id and dimension, (R, D): the reference's default),
``feature`` (R, 1), ``field_dim`` (F_c, D), ``field`` (F_c, 1), ``dimension`` (1, D) or ``global``
(1, 1). ``s`` starts at ``threshold_init`` (-15 in the reference's MovieLens config, -150 on
Criteo/Avazu and in Hetu). The reference trains everything with one Adam (lr 1e-3) whose coupled
weight decay 1e-5 is what pulls ``s`` towards 0 (raising the threshold) and shrinks rarely seen
rows. Here:

* thresholds: their own group, Adam at ``threshold_learning_rate`` with coupled weight decay
  ``threshold_weight_decay``. ``threshold_optimizer=adam`` keeps per-id thresholds dense (every
  row's ``s`` is decayed at every step, as in the reference; a dense (R, D) gradient per step);
  ``sparse_adam`` gathers them with row-sparse gradients (lazy Adam, the L2 of the batch's rows in
  the loss: only rows a batch touches move, as in Hetu). ``threshold_learning_rate="auto"`` is
  ``|threshold_init| / (search_epochs * steps per epoch)`` (a ramp of ``s`` to 0 within the search).
* table: ``table_optimizer=adam`` (dense Adam, ``table_learning_rate``, coupled ``table_weight_decay``
  on every row each step: the reference), ``sparse_adam`` (lazy Adam on the batch's rows, their L2
  in the loss) or ``protocol`` (the protocol's row-sparse embedding optimizer, Adagrad, L2 of the
  batch's rows in the loss). Uncompressed (kept) fields always use the protocol's optimizer.

Stage ``search`` ends as soon as the sparsity of ``w_hat`` reaches the target (a hook checks it
every ``sparsity_check_interval`` steps) or at its epoch cap. ``rebuild`` freezes the mask — the
``nnz`` entries with the largest margin ``|w| - g(s)`` — rewinds the table to its saved initial
weights (lottery ticket, ``initial_weight`` buffer) and stage ``retrain`` trains ``w * mask`` with
the dense layers re-initialised and fresh optimizer state.

Budget: ``nnz`` is the largest number of kept entries whose cheapest sparse storage (values +
indices, ``sparse_storage``) fits the target; the target sparsity is ``1 - nnz / (R D)``. The
thresholds, their Adam state and the initial table are training-only bytes.

Shapes: KJT (F keys, B bags) -> per-id (N, D) -> KeyedTensor (B, F * D); thresholds gathered to
(N, D) or (N, 1) / (1, D) broadcast against the (N, D) weights.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from recbench.methods.blocks import batch_part
from recbench.methods.base import Hook, ParamGroup
from recbench.methods.blocks.budget import check_auto
from recbench.methods.families.pruning import (MaskHook, PrunedEmbedding, PruningFamily, PruningSettings,
                                               mask_artifacts, pruning_stage_result, top_k_mask)
from recbench.types import FP32_BYTES, EmbeddingOptimizer, MemoryReport, Stage, TableSpec

#: the reference's threshold types (models/pep_embedding.py); ``field_dimension`` is the old name of field_dim
GRANULARITIES = ("feature_dim", "feature", "field_dim", "field", "dimension", "global")
ALIASES = {"field_dimension": "field_dim"}
PER_ID = ("feature_dim", "feature")
THRESHOLD_OPTIMIZERS = ("adam", "sparse_adam")
TABLE_OPTIMIZERS = ("adam", "sparse_adam", "protocol")


def threshold_shape(granularity: str, rows: int, num_fields: int, dim: int):
    """Shape of ``s`` for ``rows`` stacked compressed rows of ``num_fields`` fields."""
    return {"feature_dim": (rows, dim), "feature": (rows, 1), "field_dim": (num_fields, dim),
            "field": (num_fields, 1), "dimension": (1, dim), "global": (1, 1)}[granularity]


def _bad(key: str, value: Any, allowed: Sequence[str]) -> ValueError:
    return ValueError(f"method 'pep': {key}={value!r} is not supported; allowed: {', '.join(allowed)}")


def row_l2(table: nn.Parameter, rows: torch.Tensor) -> torch.Tensor:
    """0.5 * sum of squares of the distinct ``rows`` of ``table`` (row-sparse gradient ``table[rows]``):
    the coupled weight decay of the rows a batch touches. Distributed, each row is counted once over
    the ranks and scaled by W against the gradient average (``batch_part``)."""
    unique = torch.unique(rows)
    unique = unique[batch_part.first_holder(unique, batch_part.world_size())]
    return 0.5 * F.embedding(unique, table, sparse=True).pow(2).sum() * batch_part.batch_sum_scale()


class PEPEmbedding(PrunedEmbedding):
    """Soft-thresholded table (search) / masked rewound table (retrain). forward: KJT -> (B, F * D)."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any]):
        super().__init__(tables, dim, hparams["kept"], hparams["nnz"])
        self.granularity = hparams["granularity"]
        self.threshold_optimizer = hparams["threshold_optimizer"]
        self.threshold_learning_rate = float(hparams["threshold_learning_rate"])
        self.threshold_weight_decay = float(hparams["threshold_weight_decay"])
        self.table_optimizer = hparams["table_optimizer"]
        self.table_learning_rate = float(hparams["table_learning_rate"])
        self.table_weight_decay = float(hparams["table_weight_decay"])
        fields = len(self.tables) - len(self.kept_names)
        self.threshold = nn.Parameter(torch.full(threshold_shape(self.granularity, self.num_rows, fields, dim),
                                                 float(hparams["threshold_init"])))
        self.register_buffer("initial_weight", self.weight.detach().clone())
        self.register_buffer("retraining", torch.zeros((), dtype=torch.bool))
        # per stacked row: its compressed field's position (for field thresholds)
        self.register_buffer("row_field", torch.repeat_interleave(
            torch.arange(fields), torch.tensor([t.num_embeddings for t in self.tables if t.name not in self.kept_names])),
            persistent=False)

    # ----- thresholds -----
    def gate(self, rows: torch.Tensor) -> torch.Tensor:
        """g(s) of the given stacked rows (N,): (N, D), (N, 1), (1, D) or (1, 1), broadcastable to (N, D)."""
        if self.granularity in PER_ID:
            s = F.embedding(rows, self.threshold, sparse=self.threshold_optimizer == "sparse_adam")
        elif self.granularity.startswith("field"):
            s = self.threshold[self.row_field[rows]]
        else:
            s = self.threshold
        return torch.sigmoid(s)

    @torch.no_grad()
    def full_gate(self) -> torch.Tensor:
        """g(s) for every stacked row, broadcastable to (R, D)."""
        s = self.threshold[self.row_field] if self.granularity.startswith("field") else self.threshold
        return torch.sigmoid(s)

    # ----- lookup -----
    def encode(self, fields: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        rows = self.row_offset[fields] + ids
        if self.training:
            self._touched = rows
        # table_optimizer=adam: a dense gradient, so coupled weight decay reaches every row each step
        values = F.embedding(rows, self.weight, sparse=self.table_optimizer != "adam")
        return self.effective(rows, fields, values)

    def effective(self, rows, fields, values):
        if bool(self.retraining):
            return values * self.mask[rows]
        return torch.sign(values) * torch.relu(values.abs() - self.gate(rows))

    @torch.no_grad()
    def margin(self) -> torch.Tensor:
        """(R, D) |w| - g(s): positive where an entry survives the soft threshold."""
        return self.weight.abs() - self.full_gate()

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

    # ----- optimisation -----
    def extra_loss(self) -> torch.Tensor:
        """Coupled weight decay of row-sparse groups as an L2 on the rows the batch touched: the
        table (``sparse_adam``/``protocol``; both stages) and the thresholds (``sparse_adam``; search)."""
        loss = torch.zeros(())
        rows = self._touched
        if rows is None:
            return loss
        if self.table_weight_decay and self.table_optimizer != "adam":
            loss = loss + self.table_weight_decay * row_l2(self.weight, rows)
        if self.threshold_weight_decay and self.threshold_optimizer == "sparse_adam" and not bool(self.retraining):
            loss = loss + self.threshold_weight_decay * row_l2(self.threshold, rows)
        return loss

    def param_groups(self) -> List[ParamGroup]:
        kept = [ParamGroup("kept", [self.kept_table], kind="sparse")] if self.kept_table is not None else []
        if self.table_optimizer == "protocol":
            table = ParamGroup("embedding", [self.weight], kind="sparse")
        elif self.table_optimizer == "sparse_adam":
            table = ParamGroup("embedding", [self.weight], self.table_learning_rate, kind="sparse",
                               optimizer="sparse_adam")
        else:
            table = ParamGroup("embedding", [self.weight], self.table_learning_rate, optimizer="adam",
                               weight_decay=self.table_weight_decay)
        if self.threshold_optimizer == "sparse_adam":
            thresholds = ParamGroup("thresholds", [self.threshold], self.threshold_learning_rate, kind="sparse",
                                    optimizer="sparse_adam")
        else:
            thresholds = ParamGroup("thresholds", [self.threshold], self.threshold_learning_rate, optimizer="adam",
                                    weight_decay=self.threshold_weight_decay)
        return [table, thresholds] + kept

    def memory_report(self) -> MemoryReport:
        report = super().memory_report()  # counts the table's optimizer state once (Adagrad)
        if self.table_optimizer != "protocol":  # Adam: two state values per entry
            report.training_bytes += self.weight.numel() * FP32_BYTES
        return report


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


@dataclass
class PEPSettings(PruningSettings):
    """Hyperparameters of ``pep`` (defaults: the reference code's, ssui-liu/learnable-embed-sizes-for-RecSys
    train_ml-1m.py; ``recbench/conf/method/pep.yaml`` lets an experiment preset threshold_init, the two
    optimizers and the two weight decays under ``method_settings.pep``)."""

    granularity: str = "feature_dim"  #: feature_dim (per id and dim) | feature | field_dim | field | dimension | global
    threshold_init: float = -15.0  #: s at the start (MovieLens -15: g = 3e-7; Criteo/Avazu -150)
    #: adam: dense, every row decayed each step (reference) | sparse_adam: row-sparse, lazy (Hetu)
    threshold_optimizer: str = "adam"
    #: Adam learning rate of s | auto: |threshold_init| / (search_epochs * steps per epoch)
    threshold_learning_rate: Any = 1.0e-3
    threshold_weight_decay: float = 1.0e-5  #: Adam's coupled L2 on s: pulls s towards 0, raising g(s)
    search_epochs: float = 1.0  #: threshold_learning_rate=auto only: epochs of the ramp of s to 0
    #: adam: dense Adam on the table (reference) | sparse_adam: lazy Adam | protocol: the protocol's Adagrad
    table_optimizer: str = "adam"
    table_learning_rate: float = 1.0e-3  #: adam / sparse_adam
    #: L2 on the table (adam: every row each step; otherwise the batch's rows)
    table_weight_decay: float = 1.0e-5
    sparsity_check_interval: int = 10  #: steps between sparsity checks of the search stage
    search_max_epochs: Optional[float] = None  #: cap of the search stage (null: trainer.max_epochs)


class PEP(PruningFamily):
    """PEP; hyperparameters: ``PEPSettings`` (and ``methods/pep.md``)."""

    name = "pep"
    module_class = PEPEmbedding
    settings_class = PEPSettings

    #: 3: the reference's regime by default (per-id thresholds, Adam 1e-3 with weight decay 1e-5 on
    #: thresholds and table); revision 2's is granularity=field_dim threshold_learning_rate=auto
    #: threshold_weight_decay=1e-2 table_optimizer=protocol table_weight_decay=0 (methods/pep.md)
    revision = 3

    def check_settings(self) -> None:
        super().check_settings()
        granularity = self.granularity = ALIASES.get(self.granularity, self.granularity)
        threshold_optimizer, table_optimizer = self.threshold_optimizer, self.table_optimizer
        threshold_learning_rate, table_learning_rate = self.threshold_learning_rate, self.table_learning_rate
        search_epochs, threshold_init = self.search_epochs, self.threshold_init
        if granularity not in GRANULARITIES:
            raise _bad("granularity", granularity, GRANULARITIES)
        if threshold_optimizer not in THRESHOLD_OPTIMIZERS:
            raise _bad("threshold_optimizer", threshold_optimizer, THRESHOLD_OPTIMIZERS)
        if threshold_optimizer == "sparse_adam" and granularity not in PER_ID:
            raise ValueError(f"method 'pep': threshold_optimizer='sparse_adam' needs per-id thresholds "
                             f"(granularity {' or '.join(PER_ID)}), got granularity={granularity!r}")
        if table_optimizer not in TABLE_OPTIMIZERS:
            raise _bad("table_optimizer", table_optimizer, TABLE_OPTIMIZERS)
        if isinstance(threshold_learning_rate, str):
            check_auto(self.name, "threshold_learning_rate", threshold_learning_rate)
        elif not threshold_learning_rate > 0:
            raise ValueError(f"method 'pep': threshold_learning_rate must be > 0 or 'auto', got {threshold_learning_rate}")
        if not table_learning_rate > 0:
            raise ValueError(f"method 'pep': table_learning_rate must be > 0, got {table_learning_rate}")
        if not search_epochs > 0:
            raise ValueError(f"method 'pep': search_epochs must be > 0, got {search_epochs}")
        if not threshold_init < 0:
            raise ValueError(f"method 'pep': threshold_init must be < 0 (g(s) = sigmoid(s) < 0.5 at the start), "
                             f"got {threshold_init}")
        for key, value in (("threshold_weight_decay", self.threshold_weight_decay),
                           ("table_weight_decay", self.table_weight_decay)):
            if value < 0:
                raise ValueError(f"method 'pep': {key} must be >= 0, got {value}")
        if int(self.sparsity_check_interval) < 1:
            raise ValueError(f"method 'pep': sparsity_check_interval must be >= 1, got {self.sparsity_check_interval}")
        self.threshold_init = float(threshold_init)
        self.auto_threshold_learning_rate = isinstance(threshold_learning_rate, str)
        # "auto": a placeholder until the search stage knows its steps per epoch (SparsityHook)
        self.threshold_learning_rate = 0.01 if self.auto_threshold_learning_rate else float(threshold_learning_rate)
        self.search_epochs, self.threshold_weight_decay = float(search_epochs), float(self.threshold_weight_decay)
        self.table_learning_rate, self.table_weight_decay = float(table_learning_rate), float(self.table_weight_decay)
        self.sparsity_check_interval = int(self.sparsity_check_interval)
        self.search_max_epochs = None if self.search_max_epochs is None else float(self.search_max_epochs)

    def method_hparams(self) -> Dict[str, Any]:
        return {"granularity": self.granularity, "threshold_init": self.threshold_init,
                "threshold_optimizer": self.threshold_optimizer,
                "threshold_learning_rate": self.threshold_learning_rate,
                "threshold_weight_decay": self.threshold_weight_decay, "table_optimizer": self.table_optimizer,
                "table_learning_rate": self.table_learning_rate, "table_weight_decay": self.table_weight_decay}

    def dense_parameters(self, rows: int, dim: int, num_compressed_fields: int) -> int:
        # the thresholds (Adam or SparseAdam: two fp32 state values each, as a dense group)
        shape = threshold_shape(self.granularity, rows, num_compressed_fields, dim)
        return shape[0] * shape[1]

    def extra_state(self, rows: int, dim: int, num_compressed_fields: int) -> int:
        # thresholds + the saved initial table (lottery-ticket rewind) + the phase flag
        return self.dense_parameters(rows, dim, num_compressed_fields) * FP32_BYTES + rows * dim * FP32_BYTES + 1

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        report = super().memory(tables, dim, hparams, optimizer)  # the table's state counted once (Adagrad)
        if hparams.get("table_optimizer", self.table_optimizer) != "protocol":
            report.training_bytes += int(hparams["rows"]) * dim * FP32_BYTES  # Adam's second state value
        return report

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
