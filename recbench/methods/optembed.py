"""``optembed``: OptEmbed — learned row pruning, a dimension supernet, evolutionary search, retrain.

References: Lyu, Tang, Guo, Zhang, He, Liu, Li, "OptEmbed: Learning Optimal Embedding Table for
Click-through Rate Prediction", CIKM 2022 (arXiv:2208.04482); reference code
github.com/fuyuanlyu/OptEmbed (models/modules_super.py, supernet.py, evolution.py, retrain.py).

Mechanism, three stages.
1. ``supernet`` (train): every compressed field f has a learnable threshold t_f (init
   ``threshold_init``, the paper's 0). Row x of field f is kept while its L1 norm exceeds t_f: the
   forward uses the hard mask m_x = 1[||e_x||_1 - t_f > 0] and the backward the reference code's
   long-tailed straight-through derivative (2 - 4|u| for |u| <= 0.4, 0.4 up to |u| <= 1, 0 beyond,
   u = ||e_x||_1 - t_f), so gradients reach both t_f and e_x. The loss adds
   ``threshold_regularization`` * sum_f exp(-t_f) (the paper's alpha), which pushes thresholds up.
   At the same time, each (sample, field) draws a dim d uniformly in 1..D and only the first d
   dims of its pooled embedding are used, so every sub-dimension of the table is trained.
2. ``search`` (search stage, no gradients): ``recbench.methods.evolutionary`` over per-field dims
   in [1, dim_cap], each candidate scored by the supernet's validation AUC with the candidate's
   dims and the rows the budget affords at those dims (below).
3. ``retrain`` (train): the kept rows are physically removed into a compact (K, D) table with an
   id -> row remap; each field uses its searched dims; rows are rewound to their initial values
   (the reference code retrains from the supernet's saved initialisation: a lottery ticket; here the
   initialisation is regenerated from ``init_seed``), dense layers are re-initialised and the
   optimizers reset.

Budget (``recbench.methods.row_subset``): the deployable form stores the kept rows' dim prefixes,
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

import math
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recbench.methods import batch_part, row_subset
from recbench.methods.base import CompressionMethod, Hook, InfeasibleBudget, ParamGroup, check_ids
from recbench.methods.budget import kept_bytes, land, largest_integer_within, split_tables, target_bytes
from recbench.methods.evolutionary import evolutionary_search
from recbench.methods.per_id import BagPooling, PerIdEmbedding, value_fields
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, Stage, TableSpec, full_embedding_bytes

INT64_BYTES = 8


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


class OptEmbedSupernet(_Stacked):
    """Stage 1-2 module: thresholds + dimension supernet over one stacked (R, D) table.

    Training forward: threshold-masked rows, pooled, then a random dim prefix per (sample, field).
    Eval forward (validation, search, deployment): the rows ``fit_rows`` keeps within the budget at
    the current dims (``candidate`` during the search, else ``dim_cap`` for every field).
    """

    breakdown_name = "rows"

    def __init__(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any]):
        super().__init__(tables, dim, hparams["kept"])
        self.dim_cap, self.row_budget = int(hparams["dim_cap"]), int(hparams["row_budget_bytes"])
        self.regularization = float(hparams["threshold_regularization"])
        self.threshold_learning_rate = float(hparams["threshold_learning_rate"])
        self.thresholds = nn.Parameter(torch.full((len(self.compressed_sizes),), float(hparams["threshold_init"])))
        self.register_buffer("init_seed", torch.tensor(int(hparams["init_seed"]), dtype=torch.int64))
        self.weight = nn.Parameter(self.initial_rows())
        self.candidate: Optional[Tuple[int, ...]] = None  # per-field dims under evaluation (search)
        self._keep_cache: Optional[Tuple[Any, torch.Tensor]] = None
        self._ranking: Optional[Tuple[Any, torch.Tensor, Any]] = None  # (state, row_scores, rank_rows)

    def initial_rows(self) -> torch.Tensor:
        """(R, D) the initial table, regenerated from ``init_seed`` (DLRM init per field)."""
        generator = torch.Generator().manual_seed(int(self.init_seed))
        parts = [torch.rand(n, self.dim, generator=generator) * (2 / n ** 0.5) - 1 / n ** 0.5
                 for n in self.compressed_sizes]
        return torch.cat(parts) if parts else torch.zeros(0, self.dim)

    # ----- lookup -----
    def encode(self, fields, ids):
        rows = self.row_offset[fields] + ids
        values = F.embedding(rows, self.weight, sparse=True)
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
        row_dims = torch.cat([torch.where(self.deployed_keep(), self.dims()[self.row_field], 0),
                              torch.tensor([self.dim])])  # (R + 1,): 0 for a pruned row, D for kept fields
        per_id = state.values * (torch.arange(self.dim).unsqueeze(0) < row_dims[state.rows].unsqueeze(1))
        out = per_id.view(state.batch, -1) if state.pooling is None else state.pooling(per_id)
        return self.keyed_output(out)

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
        return self.regularization * torch.exp(-self.thresholds).sum()

    def sparse_parameters(self) -> List[nn.Parameter]:
        return [self.weight] + super().sparse_parameters()

    def param_groups(self) -> List[ParamGroup]:
        return [ParamGroup("embedding", self.sparse_parameters(), kind="sparse"),
                ParamGroup("thresholds", [self.thresholds], learning_rate=self.threshold_learning_rate)]


class OptEmbedRetrain(_Stacked):
    """Stage 3 module: kept rows only, (K, D) with per-field dim prefixes; remap as a buffer."""

    breakdown_name = "rows"

    def __init__(self, tables: Sequence[TableSpec], dim: int, kept: Sequence[str], keep: torch.Tensor,
                 dims: torch.Tensor, initial: torch.Tensor):
        super().__init__(tables, dim, kept)
        remap = torch.full((self.num_rows,), -1, dtype=torch.int64)
        remap[keep] = torch.arange(int(keep.sum()))
        self.register_buffer("remap", remap)
        self.register_buffer("field_dims", dims.to(torch.int64).clone())
        prefix = torch.arange(dim).unsqueeze(0) < dims[self.row_field[keep]].unsqueeze(1)
        self.weight = nn.Parameter(initial.detach().clone() * prefix)

    def encode(self, fields, ids):
        position = self.remap[self.row_offset[fields] + ids]
        values = F.embedding(position.clamp(min=0), self.weight, sparse=True)
        dims = self.field_dims[self.compressed_position[fields]]
        present = (torch.arange(self.dim).unsqueeze(0) < dims.unsqueeze(1)) & (position >= 0).unsqueeze(1)
        return values * present

    def to_inference(self) -> nn.Module:
        table = row_subset.RowSubsetTable(self.weight, self.remap >= 0, self.row_field, self.field_dims, compact=True)
        kept = self.kept_table.detach() if self.kept_table is not None else None
        return OptEmbedInference(self.tables, self.dim, self.kept_names, table, kept).eval()

    def sparse_parameters(self) -> List[nn.Parameter]:
        return [self.weight] + super().sparse_parameters()


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


class OptEmbed(CompressionMethod):
    """Hyperparameters: see ``conf/method/optembed.yaml`` and ``methods/optembed.md``."""

    name = "optembed"
    table_backed = False

    def __init__(self, name: Optional[str] = None, dim_cap: Any = "auto", threshold_init: float = 0.0,
                 threshold_regularization: float = 3e-4, threshold_learning_rate: float = 3e-4,
                 mutation_num: int = 10, crossover_num: int = 10, mutation_prob: float = 0.1,
                 search_iterations: int = 30, top_k: int = 15, search_seed: int = 0, init_seed: int = 0,
                 supernet_max_epochs: Optional[float] = None, retrain_max_epochs: Optional[float] = None):
        super().__init__(name, dim_cap=dim_cap, threshold_init=threshold_init,
                         threshold_regularization=threshold_regularization,
                         threshold_learning_rate=threshold_learning_rate, mutation_num=mutation_num,
                         crossover_num=crossover_num, mutation_prob=mutation_prob,
                         search_iterations=search_iterations, top_k=top_k, search_seed=search_seed,
                         init_seed=init_seed, supernet_max_epochs=supernet_max_epochs,
                         retrain_max_epochs=retrain_max_epochs)
        if dim_cap != "auto" and not (isinstance(dim_cap, int) and dim_cap >= 1):
            raise ValueError(f"method 'optembed': dim_cap={dim_cap!r}; allowed: 'auto' or an integer >= 1")
        if threshold_regularization < 0 or not threshold_learning_rate > 0:
            raise ValueError("method 'optembed': threshold_regularization must be >= 0 and threshold_learning_rate > 0, "
                             f"got {threshold_regularization} and {threshold_learning_rate}")
        from recbench.methods.evolutionary import _check

        _check(1, 1, int(mutation_num), int(crossover_num), float(mutation_prob), int(search_iterations), int(top_k))
        self.dim_cap = dim_cap
        self.threshold_init, self.threshold_regularization = float(threshold_init), float(threshold_regularization)
        self.threshold_learning_rate = float(threshold_learning_rate)
        self.search = {"mutation_num": int(mutation_num), "crossover_num": int(crossover_num),
                       "mutation_prob": float(mutation_prob), "iterations": int(search_iterations),
                       "top_k": int(top_k), "seed": int(search_seed)}
        self.init_seed = int(init_seed)
        self.supernet_max_epochs, self.retrain_max_epochs = supernet_max_epochs, retrain_max_epochs

    # ----- budget -----
    def solve(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
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
                "threshold_learning_rate": self.threshold_learning_rate, "init_seed": self.init_seed}

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        kept = [t for t in tables if t.name in set(hparams["kept"])]
        rows, cap, capacity = int(hparams["rows"]), int(hparams["dim_cap"]), int(hparams["row_capacity"])
        fields, fixed = len(tables) - len(kept), kept_bytes(kept, dim)
        table = row_subset.subset_bytes(rows, capacity, capacity * cap, fields)
        weight = rows * dim * FP32_BYTES
        # supernet state: table + thresholds + init seed + kept table; Adagrad (table, kept), Adam (thresholds)
        training = weight + fields * FP32_BYTES + INT64_BYTES + fixed + weight + fixed + 2 * fields * FP32_BYTES
        return MemoryReport(inference_bytes=table + fixed, training_bytes=training,
                            parameters=rows * dim + fields + fixed // FP32_BYTES,
                            full_bytes=full_embedding_bytes(tables, dim), breakdown={"rows": table, "kept": fixed})

    def build(self, tables: Sequence[TableSpec], dim: int, budget: Budget,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> OptEmbedSupernet:
        return OptEmbedSupernet(tables, dim, self.solve(tables, dim, budget))

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
        return OptEmbedRetrain(module.tables, module.dim, module.kept_names, keep, dims, module.initial_rows()[keep])
