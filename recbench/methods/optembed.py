"""``optembed``: OptEmbed — learned row pruning, a dimension supernet, evolutionary search, retrain.

References: Lyu, Tang, Zhu, Guo, Zhang, Tang, Liu, "OptEmbed: Learning Optimal Embedding Table for
Click-through Rate Prediction", CIKM 2022 (arXiv:2208.04482); reference code
github.com/fuyuanlyu/OptEmbed @ 0feda5f8d43e570d87ecbcb2847a3c2bfdef7975 (models/modules.py,
models/modules_super.py, models/layer.py, supernet.py, utils/train_help.py, evolution.py, retrain.py);
Hsword/Hetu @ a1cb1bcaf236c9f1d452733b105997d50c16c9df tools/EmbeddingMemoryCompression
(methods/layers/optembed.py, methods/scheduler/optembed.py).

Mechanism, three stages.
1. ``supernet`` (train): every compressed field f has a learnable threshold t_f (init
   ``threshold_init``, the paper's 0). Row x of field f is kept while its L1 norm exceeds t_f: the
   forward uses the hard mask m_x = 1[||e_x||_1 - t_f > 0] and the backward the reference code's
   long-tailed straight-through derivative (2 - 4|u| for |u| <= 0.4, 0.4 up to |u| <= 1, 0 beyond,
   u = ||e_x||_1 - t_f), so gradients reach both t_f and e_x. The loss adds
   ``threshold_regularization`` * sum_f exp(-t_f) (the paper's alpha), which pushes thresholds up.
   At the same time, each (sample, field) draws a dim d uniformly in 1..D and only the first d
   dims of its pooled embedding are used, so every sub-dimension of the table is trained.
   Training regime (utils/train_help.py ``get_optimizer``): the thresholds have their own plain SGD
   (``threshold_optimizer``, lr ``threshold_learning_rate``); the table is in the Adam of the dense
   parameters at their learning rate with L2 ``table_weight_decay`` (torch's Adam: g + wd * e on
   every row, every step), so rows a batch seldom touches decay towards 0 and fall under t_f
   (``TableTraining``). Init (``init``): Xavier-uniform over the table of all fields' rows.
2. ``search`` (search stage, no gradients): ``recbench.methods.blocks.evolutionary`` over per-field dims
   in [1, dim_cap], each candidate scored by the supernet's validation AUC with the candidate's
   dims and the rows the budget affords at those dims (below).
3. ``retrain`` (train): the kept rows are physically removed into a compact (K, D) table with an
   id -> row remap; each field uses its searched dims; rows are rewound to their initial values
   (the reference code retrains from the supernet's saved initialisation: a lottery ticket; here the
   initialisation is regenerated from ``init_seed``), dense layers are re-initialised and the
   optimizers reset; the table is trained as in the supernet (the reference's retrain.py uses the
   same lr and wd).

Budget (``recbench.methods.blocks.row_subset``): the deployable form stores the kept rows' dim prefixes,
an index (the cheaper of an R-entry remap at the width holding K and the K sorted kept ids) and
three int64 per field. The solver fixes ``dim_cap`` (``auto``: ceil(D * sqrt(ratio)), so rows and
dims share the compression on a log scale; raised when even all rows at the cap fit) and the row
capacity K at the cap. Which rows are kept is learned, but where the learned pruning lands is not
controllable in advance, so the kept set is always the rows ranked by ``||e_x||_1 - t_f`` (rows
the thresholds keep come first), as many as the budget affords at the dims in use: this trims rows
the thresholds kept beyond the budget and tops the budget up with the best pruned rows. The stage
results report both ``learned_rows`` (kept by the thresholds) and ``final_rows``. The closed form
is the structure at the cap (every field at ``dim_cap``); searched dims below the cap buy more rows,
so the achieved bytes stay within one row of the budget unless every row is already kept (then the
search's AUC-best dims leave part of the budget unused; the achieved ratio is measured and logged).

Shapes: KJT (F keys, B bags) -> per-id (N, D) -> pooled (B, F, D) x dim masks -> KeyedTensor (B, F * D).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods.blocks import batch_part, row_subset
from recbench.methods.base import CompressionMethod, Hook, InfeasibleBudget, ParamGroup, check_ids
from recbench.methods.blocks.budget import kept_bytes, land, largest_integer_within, split_tables, target_bytes
from recbench.methods.blocks.evolutionary import evolutionary_search
from recbench.methods.blocks.per_id import BagPooling, PerIdEmbedding, tensor_bytes, value_fields
from recbench.types import (FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, Plan, Stage,
                            TableSpec, full_embedding_bytes)

INT64_BYTES = 8
THRESHOLD_OPTIMIZERS = ("sgd", "adam")
TABLE_OPTIMIZERS = ("adam", "sparse_adam", "adagrad")
INITS = ("xavier", "hetu", "dlrm")


@dataclass(frozen=True)
class TableTraining:
    """How the stacked (R, D) table is trained (supernet and retrain).

    ``optimizer``: "adam" — one Adam with the dense parameters (dense (R, D) gradient each step),
    L2 ``weight_decay`` on every row as torch's Adam applies it (g + wd * e); "sparse_adam" — Adam
    on the rows a batch touches (``torch.optim.SparseAdam``), the L2 term 0.5 * wd * ||e_x||^2 of
    the unique touched rows added to the loss (the same g + wd * e on those rows, none on the
    others); "adagrad" — the trainer's embedding rule (row-sparse Adagrad), no decay.
    ``learning_rate`` None: the dense learning rate ("adam"), the embedding one ("adagrad").
    """

    optimizer: str = "adam"
    learning_rate: Optional[float] = None
    weight_decay: float = 0.0

    @property
    def dense_gradient(self) -> bool:
        return self.optimizer == "adam"

    def group(self, table: nn.Parameter) -> ParamGroup:
        if self.optimizer == "adam":
            return ParamGroup("table", [table], learning_rate=self.learning_rate, optimizer="adam",
                              weight_decay=self.weight_decay)
        if self.optimizer == "sparse_adam":
            return ParamGroup("table", [table], learning_rate=self.learning_rate, kind="sparse", optimizer="sparse_adam")
        return ParamGroup("table", [table], learning_rate=self.learning_rate, kind="sparse")

    def lookup(self, rows: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """(N,) rows -> (N, D) with the gradient layout the optimizer takes (dense for "adam")."""
        return F.embedding(rows, table, sparse=not self.dense_gradient)

    def penalty(self, touched: Optional[torch.Tensor], table: torch.Tensor) -> torch.Tensor:
        """0.5 * wd * sum ||e_x||^2 over the unique ``touched`` rows ("sparse_adam"; else 0)."""
        if self.optimizer != "sparse_adam" or not self.weight_decay or touched is None:
            return table.new_zeros(())
        rows = F.embedding(torch.unique(touched), table, sparse=True)
        return 0.5 * self.weight_decay * (rows ** 2).sum()

    def state_bytes(self, table_bytes: int) -> int:
        """Optimizer state (+ the dense gradient for "adam") of a table of ``table_bytes``."""
        return {"adam": 3, "sparse_adam": 2, "adagrad": 1}[self.optimizer] * table_bytes


def table_training(hparams: Mapping[str, Any]) -> TableTraining:
    """The ``TableTraining`` of solved hyperparameters."""
    return TableTraining(hparams["table_optimizer"], hparams["table_learning_rate"], float(hparams["table_weight_decay"]))


def initial_table(sizes: Sequence[int], all_sizes: Sequence[int], dim: int, init: str, seed: int) -> torch.Tensor:
    """(sum(sizes), D) initial rows of the stacked table (compressed fields' sizes), drawn from ``seed``.

    ``all_sizes``: every field's rows (the reference's one table spans all fields).
    xavier: U(+-sqrt(6 / (sum all_sizes + D))), Xavier-uniform over that table (fuyuanlyu/OptEmbed);
    hetu: U(+-sqrt(1 / max all_sizes)) (Hetu's default initializer); dlrm: U(+-1/sqrt(n_f)) per field.
    """
    generator = torch.Generator().manual_seed(int(seed))
    if not sizes:
        return torch.zeros(0, dim)
    if init == "dlrm":
        return torch.cat([torch.rand(n, dim, generator=generator) * (2 / n ** 0.5) - 1 / n ** 0.5 for n in sizes])
    bound = math.sqrt(6 / (sum(all_sizes) + dim)) if init == "xavier" else math.sqrt(1 / max(all_sizes))
    return torch.rand(int(sum(sizes)), dim, generator=generator) * (2 * bound) - bound


class LongTailStep(torch.autograd.Function):
    """Forward 1[u > 0]; backward grad * (2 - 4|u| if |u| <= 0.4, 0.4 if |u| <= 1, else 0)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(u)
        return (u > 0).to(u.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (u,) = ctx.saved_tensors
        a = u.abs()
        slope = torch.where(a <= 0.4, 2 - 4 * a, torch.where(a <= 1.0, torch.full_like(a, 0.4), torch.zeros_like(a)))
        return grad * slope


class _Stacked(PerIdEmbedding):
    """Compressed fields' rows stacked (R rows); field positions and offsets as buffers."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, kept: Sequence[str]):
        super().__init__(tables, dim, kept)
        compressed = [t for t in self.tables if t.name not in self.kept_names]
        sizes = [t.num_embeddings for t in compressed]
        rows = torch.tensor([0 if t.name in self.kept_names else t.num_embeddings for t in self.tables])
        self.register_buffer("row_offset", torch.cumsum(rows, 0) - rows, persistent=False)
        position = torch.full((len(self.tables),), -1, dtype=torch.int64)
        position[[self.field_index[t.name] for t in compressed]] = torch.arange(len(compressed))
        self.register_buffer("compressed_position", position, persistent=False)
        self.register_buffer("row_field", row_subset.stacked_row_fields(sizes), persistent=False)
        self.compressed_sizes, self.num_rows = sizes, int(sum(sizes))


class _Trainable(_Stacked):
    """A stacked table ``self.weight`` (set by the subclass) trained as ``table_training`` says."""

    def __init__(self, tables: Sequence[TableSpec], dim: int, kept: Sequence[str], table_training: TableTraining):
        super().__init__(tables, dim, kept)
        self.table_training = table_training
        self._touched: Optional[torch.Tensor] = None  # rows of the last training lookup (lazy L2)

    def lookup_rows(self, rows: torch.Tensor, touched: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N,) table rows -> (N, D); while training, remembers the rows the batch uses (``touched``,
        default ``rows``) for the lazy L2 term."""
        if self.training and torch.is_grad_enabled():
            self._touched = rows if touched is None else touched
        return self.table_training.lookup(rows, self.weight)

    def extra_loss(self) -> torch.Tensor:
        touched, self._touched = self._touched, None
        return self.table_training.penalty(touched, self.weight)

    def sparse_parameters(self) -> List[nn.Parameter]:
        return ([] if self.table_training.dense_gradient else [self.weight]) + super().sparse_parameters()

    def param_groups(self) -> List[ParamGroup]:
        kept = [ParamGroup("embedding", [self.kept_table], kind="sparse")] if self.kept_table is not None else []
        return [self.table_training.group(self.weight)] + kept

    def memory_report(self) -> MemoryReport:
        """Tensors held + optimizer state: the table's (``TableTraining.state_bytes``), Adagrad's for
        the kept fields' table, and the other parameters' (``dense_state_bytes``)."""
        report = super().memory_report()  # counts state + 2 x dense + 1 x sparse parameters
        table, kept = tensor_bytes([self.weight]), tensor_bytes([self.kept_table]) if self.kept_table is not None else 0
        others = [p for p in self.parameters() if p.requires_grad and p is not self.weight and p is not self.kept_table]
        training = (tensor_bytes(self.state_dict().values()) + self.table_training.state_bytes(table) + kept
                    + self.dense_state_bytes(tensor_bytes(others)))
        return dataclasses.replace(report, training_bytes=training)

    def dense_state_bytes(self, dense_bytes: int) -> int:
        """Optimizer state of the parameters besides the tables (Adam: 2 x)."""
        return 2 * dense_bytes


@dataclass
class SearchLookup:
    """``OptEmbedSupernet.precompute``'s state of one batch: values (N, D) at the full dim, their
    stacked rows (N,) (R for kept fields), the bag structure (None: values already in (B, F) order)."""

    values: torch.Tensor
    rows: torch.Tensor
    pooling: Optional[BagPooling]
    batch: int


class OptEmbedInference(_Stacked):
    """Deployable form: a ``RowSubsetTable`` (pruned rows removed, per-field dims) + kept fields."""

    breakdown_name = "rows"

    def __init__(self, tables, dim, kept, table: row_subset.RowSubsetTable, kept_table: Optional[torch.Tensor]):
        super().__init__(tables, dim, kept)
        self.table = table
        if kept_table is not None:
            with torch.no_grad():
                self.kept_table.copy_(kept_table)

    def encode(self, fields, ids):
        return self.table.lookup(self.row_offset[fields] + ids, self.compressed_position[fields])


class OptEmbedSupernet(_Trainable):
    """Stage 1-2 module: thresholds + dimension supernet over one stacked (R, D) table.

    Training forward: threshold-masked rows, pooled, then a random dim prefix per (sample, field).
    Eval forward (validation, search, deployment): the rows ``fit_rows`` keeps within the budget at
    the current dims (``candidate`` during the search, else ``dim_cap`` for every field).
    """

    breakdown_name = "rows"

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any]):
        super().__init__(tables, dim, hparams["kept"], table_training(hparams))
        self.dim_cap, self.row_budget = int(hparams["dim_cap"]), int(hparams["row_budget_bytes"])
        self.regularization = float(hparams["threshold_regularization"])
        self.threshold_learning_rate = float(hparams["threshold_learning_rate"])
        self.threshold_optimizer, self.init = hparams["threshold_optimizer"], hparams["init"]
        self.thresholds = nn.Parameter(torch.full((len(self.compressed_sizes),), float(hparams["threshold_init"])))
        self.register_buffer("init_seed", torch.tensor(int(hparams["init_seed"]), dtype=torch.int64))
        self.weight = nn.Parameter(self.initial_rows())
        self.candidate: Optional[Tuple[int, ...]] = None  # per-field dims under evaluation (search)
        self._keep_cache: Optional[Tuple[Any, torch.Tensor]] = None
        self._ranking: Optional[Tuple[Any, torch.Tensor, Any]] = None  # (state, row_scores, rank_rows)
        self._row_dims: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # (deployed_keep, row_dims)

    def initial_rows(self) -> torch.Tensor:
        """(R, D) the initial table (``init``), regenerated from ``init_seed``."""
        return initial_table(self.compressed_sizes, [t.num_embeddings for t in self.tables], self.dim, self.init,
                             int(self.init_seed))

    # ----- lookup -----
    def encode(self, fields, ids):
        rows = self.row_offset[fields] + ids
        values = self.lookup_rows(rows)
        position = self.compressed_position[fields]
        if self.training:
            margin = values.abs().sum(1) - self.thresholds[position]
            return values * LongTailStep.apply(margin).unsqueeze(1)
        dims = self.dims()[position]
        present = (torch.arange(self.dim).unsqueeze(0) < dims.unsqueeze(1)) & self.deployed_keep()[rows].unsqueeze(1)
        return values * present

    # ----- search-stage evaluation (recbench.training.search_cache) -----
    @torch.no_grad()
    def precompute(self, features: KeyedJaggedTensor) -> "SearchLookup":
        """What no candidate changes: every value's row at the full dim D (kept fields' rows as they
        are), its stacked row (R for a kept field's value) and the bag structure. Memory: N * (4 D + 8)
        bytes for N values (single-hot batches: no bag structure, values stored in output order)."""
        check_ids(features, self.tables)
        fields = value_fields(features, self.field_index)
        ids = features.values().long()
        values = self.per_id(fields, ids, encode=lambda f, i: self.weight[self.row_offset[f] + i])
        rows = torch.where(self.compressed_position[fields] >= 0, self.row_offset[fields] + ids, self.num_rows)
        pooling = BagPooling(features, self.field_index, self.is_mean)
        order = pooling.value_order()
        if order is not None:  # one value per bag: pooling is this permutation, done once here
            return SearchLookup(values[order], rows[order], None, features.stride())
        return SearchLookup(values, rows, pooling, features.stride())

    @torch.no_grad()
    def forward_precomputed(self, state: "SearchLookup") -> KeyedTensor:
        """The eval forward of the batch ``state`` was made from, at the current candidate: each value
        masked to its field's dim prefix and to the rows kept at those dims, then pooled."""
        if self.training:
            raise RuntimeError("OptEmbedSupernet.forward_precomputed is the eval forward; call eval() first")
        prefixes = (torch.arange(self.dim).unsqueeze(0) < torch.arange(self.dim + 1).unsqueeze(1)).to(state.values.dtype)
        per_id = state.values * prefixes.index_select(0, self.row_dims().index_select(0, state.rows))  # (N, D)
        out = per_id.view(state.batch, -1) if state.pooling is None else state.pooling(per_id)
        return self.keyed_output(out)

    @torch.no_grad()
    def row_dims(self) -> torch.Tensor:
        """(R + 1,) int64 width of each stacked row at the current dims: its field's dim if the row is
        kept, 0 if pruned; entry R (a kept field's value) is D. Cached with ``deployed_keep``."""
        keep = self.deployed_keep()
        if self._row_dims is None or self._row_dims[0] is not keep:
            widths = torch.cat([torch.where(keep, self.dims()[self.row_field], 0), torch.tensor([self.dim])])
            self._row_dims = (keep, widths)
        return self._row_dims[1]

    @torch.no_grad()
    def active_columns(self) -> Optional[torch.Tensor]:
        """(C,) int64 columns of the eval output (B, F * D) that can be nonzero at the current dims:
        the first d_f of compressed field f, all D of a kept field; every other column is exactly 0
        for every sample. None in training mode (the sampled dims reach D)."""
        if self.training:
            return None
        widths = torch.full((len(self.tables),), self.dim, dtype=torch.int64)
        compressed = self.compressed_position >= 0
        widths[compressed] = self.dims()[self.compressed_position[compressed]]
        return torch.nonzero((torch.arange(self.dim).unsqueeze(0) < widths.unsqueeze(1)).flatten()).squeeze(1)

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        out = super().forward(features)
        if not self.training:
            return out
        batch, fields = features.stride(), len(self.tables)
        compressed = self.compressed_position >= 0
        # one process's draws for these samples, also when a rank holds part of the batch (batch_part)
        sampled = batch_part.per_row(lambda n: torch.randint(1, self.dim + 1, (n, int(compressed.sum()))), batch)
        mask = torch.ones(batch, fields, self.dim)
        mask[:, compressed] = (torch.arange(self.dim) < sampled.unsqueeze(-1)).float()
        return self.keyed_output((out.values().view(batch, fields, self.dim) * mask).view(batch, -1))

    # ----- structure -----
    def dims(self) -> torch.Tensor:
        """(F_c,) int64 dims in use: the candidate under evaluation, else the cap."""
        if self.candidate is not None:
            return torch.tensor(self.candidate, dtype=torch.int64)
        return torch.full((len(self.compressed_sizes),), self.dim_cap, dtype=torch.int64)

    @torch.no_grad()
    def row_scores(self) -> torch.Tensor:
        """(R,) ||e_x||_1 - t_f: positive for rows the thresholds keep."""
        return self.weight.abs().sum(1) - self.thresholds[self.row_field]

    @torch.no_grad()
    def deployed_keep(self) -> torch.Tensor:
        """(R,) bool rows kept within the budget at the current dims (cached per state and dims)."""
        state = (self.weight._version, self.thresholds._version, id(self.weight), id(self.thresholds))
        key = (state, tuple(self.dims().tolist()))
        if self._keep_cache is None or self._keep_cache[0] != key:
            if self._ranking is None or self._ranking[0] != state:  # the ranking changes with the state only
                scores = self.row_scores()
                self._ranking = (state, scores, row_subset.rank_rows(scores))
            _, scores, ranking = self._ranking
            keep = row_subset.fit_rows(scores, self.dims()[self.row_field], self.row_budget, len(self.compressed_sizes),
                                       ranking=ranking)
            self._keep_cache = (key, keep)
        return self._keep_cache[1]

    def to_inference(self) -> nn.Module:
        table = row_subset.RowSubsetTable(self.weight, self.deployed_keep(), self.row_field, self.dims())
        kept = self.kept_table.detach() if self.kept_table is not None else None
        return OptEmbedInference(self.tables, self.dim, self.kept_names, table, kept).eval()

    # ----- optimisation -----
    def extra_loss(self) -> torch.Tensor:
        return super().extra_loss() + self.regularization * torch.exp(-self.thresholds).sum()

    def param_groups(self) -> List[ParamGroup]:
        return super().param_groups() + [ParamGroup("thresholds", [self.thresholds], optimizer=self.threshold_optimizer,
                                                    learning_rate=self.threshold_learning_rate)]

    def dense_state_bytes(self, dense_bytes: int) -> int:
        """The thresholds' optimizer state: none for SGD, 2 x for Adam."""
        return 0 if self.threshold_optimizer == "sgd" else 2 * dense_bytes


class OptEmbedRetrain(_Trainable):
    """Stage 3 module: kept rows only, (K, D) with per-field dim prefixes; remap as a buffer."""

    breakdown_name = "rows"

    def __init__(self, tables: Sequence[TableSpec], dim: int, kept: Sequence[str], keep: torch.Tensor,
                 dims: torch.Tensor, initial: torch.Tensor, table_training: TableTraining):
        super().__init__(tables, dim, kept, table_training)
        remap = torch.full((self.num_rows,), -1, dtype=torch.int64)
        remap[keep] = torch.arange(int(keep.sum()))
        self.register_buffer("remap", remap)
        self.register_buffer("field_dims", dims.to(torch.int64).clone())
        prefix = torch.arange(dim).unsqueeze(0) < dims[self.row_field[keep]].unsqueeze(1)
        self.weight = nn.Parameter(initial.detach().clone() * prefix)

    def encode(self, fields, ids):
        position = self.remap[self.row_offset[fields] + ids]
        values = self.lookup_rows(position.clamp(min=0), touched=position[position >= 0])
        dims = self.field_dims[self.compressed_position[fields]]
        present = (torch.arange(self.dim).unsqueeze(0) < dims.unsqueeze(1)) & (position >= 0).unsqueeze(1)
        return values * present

    def to_inference(self) -> nn.Module:
        table = row_subset.RowSubsetTable(self.weight, self.remap >= 0, self.row_field, self.field_dims, compact=True)
        kept = self.kept_table.detach() if self.kept_table is not None else None
        return OptEmbedInference(self.tables, self.dim, self.kept_names, table, kept).eval()


class SupernetReport(Hook):
    """Stage artifacts of the supernet: thresholds and the rows they keep, per field."""

    def on_stage_end(self, context: Any) -> Optional[Mapping[str, Any]]:
        module = context.embedding
        if context.stage.name != "supernet" or not isinstance(module, OptEmbedSupernet):
            return None
        kept = module.row_scores() > 0
        per_field = torch.bincount(module.row_field[kept], minlength=len(module.compressed_sizes))
        return {"thresholds": module.thresholds.detach().clone(), "learned_rows_per_field": per_field,
                "learned_rows": int(kept.sum()), "learned_row_fraction": float(kept.float().mean()),
                "rows": module.num_rows}


@dataclass
class OptEmbedSettings:
    """Hyperparameters of ``optembed`` (defaults: the paper's search and the reference code's training)."""

    dim_cap: Any = "auto"  #: largest per-field dim the search may pick: auto (ceil(D * sqrt(ratio))) or an integer >= 1
    threshold_init: float = 0.0  #: t_f at the start (the reference code's thre_init 0)
    threshold_regularization: float = 3.0e-4  #: alpha in alpha * sum_f exp(-t_f) (reference default)
    threshold_learning_rate: float = 3.0e-4  #: learning rate of the thresholds (reference t_lr)
    threshold_optimizer: str = "sgd"  #: sgd (reference: SGD, own optimizer) | adam (recbench's earlier regime)
    #: adam (reference: Adam with the dense parameters, L2 on every row) |
    #: sparse_adam (Adam on touched rows, lazy L2 on them) | adagrad (earlier regime)
    table_optimizer: str = "adam"
    #: null: the dense learning rate (adam; the reference's one lr), the embedding one (adagrad)
    table_learning_rate: Optional[float] = None
    table_weight_decay: float = 5.0e-5  #: L2 of the table (reference wd); 0 with adagrad
    #: xavier (reference) | hetu (U(+-1/sqrt(max n_f))) | dlrm (U(+-1/sqrt(n_f)), earlier regime)
    init: str = "xavier"
    mutation_num: int = 10  #: mutants per search iteration (paper)
    crossover_num: int = 10  #: crossover children per search iteration (paper)
    mutation_prob: float = 0.1  #: per-field redraw probability of a mutant (paper)
    search_iterations: int = 30  #: search iterations (paper)
    top_k: int = 15  #: best candidates kept as parents (paper)
    search_seed: int = 0  #: RNG seed of the search
    init_seed: int = 0  #: seed of the table's initialisation (regenerated for the retrain rewind)
    supernet_max_epochs: Optional[float] = None  #: cap of the supernet stage (null: trainer.max_epochs)
    retrain_max_epochs: Optional[float] = None  #: cap of the retrain stage (null: trainer.max_epochs)


class OptEmbed(CompressionMethod):
    """OptEmbed; hyperparameters: ``OptEmbedSettings`` (and ``methods/optembed.md``)."""

    name = "optembed"
    table_backed = False
    settings_class = OptEmbedSettings

    def check_settings(self) -> None:
        dim_cap, threshold_init = self.dim_cap, self.threshold_init
        threshold_regularization, threshold_learning_rate = self.threshold_regularization, self.threshold_learning_rate
        threshold_optimizer, table_optimizer, init = self.threshold_optimizer, self.table_optimizer, self.init
        table_learning_rate, table_weight_decay = self.table_learning_rate, self.table_weight_decay
        mutation_num, crossover_num, mutation_prob = self.mutation_num, self.crossover_num, self.mutation_prob
        search_iterations, top_k = self.search_iterations, self.top_k
        if dim_cap != "auto" and not (isinstance(dim_cap, int) and dim_cap >= 1):
            raise ValueError(f"method 'optembed': dim_cap={dim_cap!r}; allowed: 'auto' or an integer >= 1")
        if threshold_regularization < 0 or not threshold_learning_rate > 0:
            raise ValueError("method 'optembed': threshold_regularization must be >= 0 and threshold_learning_rate > 0, "
                             f"got {threshold_regularization} and {threshold_learning_rate}")
        for key, value, allowed in (("threshold_optimizer", threshold_optimizer, THRESHOLD_OPTIMIZERS),
                                    ("table_optimizer", table_optimizer, TABLE_OPTIMIZERS), ("init", init, INITS)):
            if value not in allowed:
                raise ValueError(f"method 'optembed': {key}={value!r}; allowed: {', '.join(allowed)}")
        if table_learning_rate is not None and not table_learning_rate > 0:
            raise ValueError(f"method 'optembed': table_learning_rate={table_learning_rate!r}; allowed: null or > 0")
        if table_learning_rate is None and table_optimizer == "sparse_adam":
            raise ValueError("method 'optembed': table_learning_rate=None with table_optimizer='sparse_adam'; allowed: "
                             "a number > 0 (null would take the embedding optimizer's Adagrad learning rate)")
        if table_weight_decay < 0 or (table_weight_decay and table_optimizer == "adagrad"):
            raise ValueError(f"method 'optembed': table_weight_decay={table_weight_decay!r}; allowed: >= 0, "
                             "and 0 with table_optimizer=adagrad (the trainer's sparse Adagrad takes no decay)")
        from recbench.methods.blocks.evolutionary import _check

        _check(1, 1, int(mutation_num), int(crossover_num), float(mutation_prob), int(search_iterations), int(top_k))
        self.threshold_init, self.threshold_regularization = float(threshold_init), float(threshold_regularization)
        self.threshold_learning_rate = float(threshold_learning_rate)
        self.regime = {"threshold_optimizer": threshold_optimizer, "table_optimizer": table_optimizer,
                         "table_learning_rate": None if table_learning_rate is None else float(table_learning_rate),
                         "table_weight_decay": float(table_weight_decay), "init": init}
        self.search = {"mutation_num": int(mutation_num), "crossover_num": int(crossover_num),
                       "mutation_prob": float(mutation_prob), "iterations": int(search_iterations),
                       "top_k": int(top_k), "seed": int(self.search_seed)}
        self.init_seed = int(self.init_seed)

    # ----- budget -----
    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        compressed, kept = split_tables(tables, budget)
        if not compressed:
            raise InfeasibleBudget(self.name, budget.compression_ratio, 1.0, 1.0,
                                   "every field is below min_rows_to_compress")
        if self.dim_cap != "auto" and self.dim_cap > dim:
            raise ValueError(f"method 'optembed': dim_cap={self.dim_cap} exceeds the embedding dim {dim}")
        rows, fields = sum(t.num_embeddings for t in compressed), len(compressed)
        available = target_bytes(tables, dim, budget) - kept_bytes(kept, dim)

        def at_cap(cap: int):
            def bytes_of(k: int) -> int:
                return row_subset.subset_bytes(rows, k, k * cap, fields)
            return bytes_of

        if self.dim_cap == "auto":
            cap = min(dim, max(1, math.ceil(dim * math.sqrt(budget.compression_ratio))))
            if at_cap(cap)(rows) <= available:  # every row fits at the cap: spend the rest on dims
                cap = largest_integer_within(lambda d: at_cap(d)(rows), cap, dim, available)
        else:
            cap = int(self.dim_cap)
        capacity = largest_integer_within(at_cap(cap), 1, rows, available)
        fixed = kept_bytes(kept, dim)
        land(self.name, fixed + at_cap(cap)(max(capacity, 1)), tables, dim, budget, fixed + at_cap(1)(1),
             fixed + at_cap(dim)(rows), "" if capacity >= 1 else "not even one row of dim 1 fits")
        return {"dim_cap": cap, "row_capacity": capacity, "rows": rows, "row_budget_bytes": available,
                "kept": [t.name for t in kept], "threshold_init": self.threshold_init,
                "threshold_regularization": self.threshold_regularization,
                "threshold_learning_rate": self.threshold_learning_rate, "init_seed": self.init_seed, **self.regime}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        kept = [t for t in tables if t.name in set(hparams["kept"])]
        rows, cap, capacity = int(hparams["rows"]), int(hparams["dim_cap"]), int(hparams["row_capacity"])
        fields, fixed = len(tables) - len(kept), kept_bytes(kept, dim)
        table = row_subset.subset_bytes(rows, capacity, capacity * cap, fields)
        weight, thresholds = rows * dim * FP32_BYTES, fields * FP32_BYTES
        threshold_state = 0 if hparams["threshold_optimizer"] == "sgd" else 2 * thresholds
        # supernet state: table + thresholds + init seed + kept table, + optimizer state: the table's
        # (TableTraining.state_bytes), Adagrad's (kept table), the thresholds' (SGD: none, Adam: 2 x)
        training = (weight + thresholds + INT64_BYTES + fixed + table_training(hparams).state_bytes(weight) + fixed
                    + threshold_state)
        return MemoryReport(inference_bytes=table + fixed, training_bytes=training,
                            parameters=rows * dim + fields + fixed // FP32_BYTES,
                            full_bytes=full_embedding_bytes(tables, dim), breakdown={"rows": table, "kept": fixed})

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> OptEmbedSupernet:
        return OptEmbedSupernet(tables, dim, plan.hparams)

    # ----- schedule -----
    def stages(self) -> List[Stage]:
        return [Stage("supernet", max_epochs=self.supernet_max_epochs),
                Stage("search", kind="search", run=self.run_search),
                Stage("retrain", max_epochs=self.retrain_max_epochs, reset_optimizer=True, reinit=True)]

    def hooks(self) -> List[Hook]:
        return [SupernetReport()]

    def run_search(self, context: Any) -> Dict[str, Any]:
        """Stage 2: evolutionary search of per-field dims on validation AUC (no gradients)."""
        module: OptEmbedSupernet = context.embedding
        # no parameter changes during the search: batches, dense arch outputs and full-dim lookups once
        with context.search_evaluation("val") as evaluation:

            def score(candidate):
                module.candidate = candidate
                return evaluation.evaluate()["auc"]

            try:
                found = evolutionary_search(score, len(module.compressed_sizes), module.dim_cap, **self.search)
                module.candidate = found.best
                keep, dims = module.deployed_keep().clone(), module.dims()
                table = row_subset.RowSubsetTable(module.weight, keep, module.row_field, dims)
            finally:
                module.candidate = None
        learned = module.row_scores() > 0
        return {"dims": dims, "keep": keep, "dim_cap": module.dim_cap, "best_val_auc": found.best_score,
                "first_iteration_best_val_auc": found.trajectory[0], "candidates_scored": len(found.scores),
                "learned_rows": int(learned.sum()), "final_rows": int(keep.sum()),
                "rows_topped_up": int((keep & ~learned).sum()), "rows_trimmed": int((learned & ~keep).sum()),
                "row_bytes": table.stored_bytes(), "row_budget_bytes": module.row_budget,
                "mean_dim": float(dims.float().mean()), "evaluation_cached": evaluation.cached}

    def rebuild(self, module: nn.Module, stage_result: Mapping[str, Any]) -> nn.Module:
        if "keep" not in stage_result or not isinstance(module, OptEmbedSupernet):
            return module
        keep, dims = stage_result["keep"].bool(), stage_result["dims"].long()
        return OptEmbedRetrain(module.tables, module.dim, module.kept_names, keep, dims, module.initial_rows()[keep],
                               module.table_training)
