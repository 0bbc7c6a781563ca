"""Base of the pruning family: element-wise pruning of embedding tables.

``PruningFamily`` is subclassed by ``pep``, ``deeplight``, ``dsl`` and ``autosrh``.

Every compressed field's rows are stacked in one (R, D) fp32 ``weight`` (field f at rows
``row_offset[f] : row_offset[f] + n_f``) with a persistent bool ``mask`` buffer (R, D), so masks,
thresholds and schedules survive checkpoints. A lookup gathers the batch's rows with sparse
gradients (``F.embedding(..., sparse=True)``: no dense gradient of the table is ever built; the
table is a ``kind="sparse"`` parameter group, Adagrad) and applies the method's element-wise
rule (``effective``). Fields below ``budget.min_rows_to_compress`` stay whole (``kept_table``).

Budget: the compressed fields' deployable form is ``sparse_storage.compress`` of the effective
table at exactly ``nnz`` kept entries, in the cheapest format (dense, CSR, COO or bitmap) with the
index bytes counted, so the solver targets ``nnz = sparse_storage.max_nnz_within(R, D, target -
kept bytes, budget.sparse_index)`` — a mask of density d costs more than d of the dense bytes.
``budget.sparse_index`` is the charging rule of the sparse table: ``compact`` (default) charges the
bytes stored; ``hetu`` charges Hetu's int32 CSR/COO words (``sparse_storage``), which is then what
``inference_bytes`` (closed form and ``memory_report``) and the achieved ratio count, while the
deployable form still stores compactly; the solved hparams carry ``sparse_index`` and, under
``hetu``, the stored format and bytes (``stored_format``, ``stored_bytes``). The deployable mask
(``deployable_mask``) always holds exactly ``nnz`` entries: the method's own mask once its schedule
has reached the target, otherwise the ``nnz`` entries ranked highest by the method's score
(``keep_scores``); before the target is reached the deployable form is that truncation and
``inference_error_bound`` states how far its outputs can be from the training form's.

Shapes: KJT (F keys, B bags) -> per-id (N, D) -> KeyedTensor (B, F * D); weight/mask (R, D).

References: docs/architecture.md section 3 ("Budget and memory": sparse-format indices of pruned tables);
``recbench.methods.blocks.sparse_storage``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recbench.methods.blocks import sparse_storage
from recbench.methods.base import CompressionMethod, Hook, InfeasibleBudget
from recbench.methods.blocks.budget import check_auto, kept_bytes, land, split_tables, target_bytes
from recbench.methods.blocks.per_id import PerIdEmbedding
from recbench.types import FP32_BYTES, Budget, EmbeddingOptimizer, MemoryReport, Plan, TableSpec, full_embedding_bytes


def top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(R, D) bool with True at the ``k`` largest ``scores`` (ties broken by position)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool)
    if k > 0:
        mask[torch.topk(scores.flatten(), k, sorted=False).indices] = True
    return mask.view_as(scores)


class PrunedInference(PerIdEmbedding):
    """Deployable form: a ``SparseTable`` for the compressed fields + the kept fields' fp32 table."""

    breakdown_name = "sparse_table"

    def __init__(self, tables: Sequence[TableSpec], dim: int, kept: Sequence[str], row_offset: torch.Tensor,
                 table: sparse_storage.SparseTable, kept_table: Optional[torch.Tensor]):
        super().__init__(tables, dim, kept)
        self.register_buffer("row_offset", row_offset.clone(), persistent=False)
        self.table = table
        if kept_table is not None:
            with torch.no_grad():
                self.kept_table.copy_(kept_table)

    def encode(self, fields: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.table.lookup(self.row_offset[fields] + ids)


class PrunedEmbedding(PerIdEmbedding):
    """Base module: stacked (R, D) weight + mask; subclasses define the element-wise rule.

    Args:
        tables: one TableSpec per field (KJT key order).
        dim: D.
        kept: fields that stay uncompressed.
        nnz: kept entries of the deployable compressed table (from the solver).
    """

    breakdown_name = "sparse_table"
    #: the budget's charging rule of the sparse table (``Budget.sparse_index``; set by ``PruningFamily.build``)
    sparse_index = "compact"

    def __init__(self, tables: Sequence[TableSpec], dim: int, kept: Sequence[str], nnz: int):
        super().__init__(tables, dim, kept)
        compressed = [t for t in self.tables if t.name not in self.kept_names]
        rows = torch.tensor([0 if t.name in self.kept_names else t.num_embeddings for t in self.tables])
        self.register_buffer("row_offset", torch.cumsum(rows, 0) - rows, persistent=False)
        position = torch.full((len(self.tables),), -1, dtype=torch.int64)
        position[[self.field_index[t.name] for t in compressed]] = torch.arange(len(compressed))
        self.register_buffer("compressed_position", position, persistent=False)
        self.num_rows, self.nnz = int(rows.sum()), int(nnz)
        if not 0 < self.nnz <= self.num_rows * dim:
            raise ValueError(f"nnz must be in [1, {self.num_rows * dim}] for {self.num_rows} compressed rows of "
                             f"dim {dim}, got {nnz}")
        self.weight = nn.Parameter(torch.empty(self.num_rows, dim))
        with torch.no_grad():  # DLRM initialisation per field
            for t in compressed:
                start = int(self.row_offset[self.field_index[t.name]])
                bound = 1.0 / t.num_embeddings ** 0.5
                self.weight[start:start + t.num_embeddings].uniform_(-bound, bound)
        self.register_buffer("mask", torch.ones(self.num_rows, dim, dtype=torch.bool))
        self._touched: Optional[torch.Tensor] = None  # rows of the last training batch (not state)

    # ----- lookup -----
    def encode(self, fields: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        rows = self.row_offset[fields] + ids
        if self.training:
            self._touched = rows
        return self.effective(rows, fields, F.embedding(rows, self.weight, sparse=True))

    def effective(self, rows: torch.Tensor, fields: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """(N,) rows, (N,) fields, (N, D) gathered weights -> (N, D) embeddings; default: masked."""
        return values * self.mask[rows]

    @torch.no_grad()
    def effective_table(self) -> torch.Tensor:
        """(R, D) the embeddings of every compressed row under the current rule."""
        return self.weight * self.mask

    @torch.no_grad()
    def keep_scores(self) -> torch.Tensor:
        """(R, D) ranking of entries for the deployable mask (default: |effective weight|)."""
        return self.effective_table().abs()

    # ----- masks -----
    @torch.no_grad()
    def reapply_mask(self, rows: Optional[torch.Tensor] = None) -> None:
        """Zero pruned weights (of ``rows``, default every row): called after each optimizer step."""
        if rows is None:
            self.weight.mul_(self.mask)
        else:
            rows = torch.unique(rows)
            self.weight[rows] = self.weight[rows] * self.mask[rows]

    def touched_rows(self) -> Optional[torch.Tensor]:
        """Rows of the compressed table read by the last training forward (None before any)."""
        return self._touched

    def density(self) -> float:
        return float(self.mask.sum()) / self.mask.numel()

    @torch.no_grad()
    def deployable_mask(self) -> torch.Tensor:
        """(R, D) bool with exactly ``nnz`` entries (the mask itself once it has that many)."""
        if int(self.mask.sum()) == self.nnz:
            return self.mask.clone()
        scores = self.keep_scores().masked_fill(~self.mask, -float("inf"))
        return top_k_mask(scores, self.nnz)

    @torch.no_grad()
    def inference_error_bound(self, features: KeyedJaggedTensor) -> float:
        """Max |to_inference() - training form| over the outputs of ``features``: the largest
        effective entry the deployable mask drops, times the largest sum-pooled bag (0 at target)."""
        dropped = self.effective_table().masked_fill(self.deployable_mask(), 0.0)
        largest = float(dropped.abs().max()) if dropped.numel() else 0.0
        if largest == 0.0:
            return 0.0
        bag = 1
        for t in self.tables:
            lengths = features[t.name].lengths()
            if t.name not in self.kept_names and t.pooling == "sum" and lengths.numel():
                bag = max(bag, int(lengths.max()))
        return largest * bag * (1 + 1e-6)

    def to_inference(self) -> nn.Module:
        table = sparse_storage.compress(self.effective_table(), self.deployable_mask())
        kept = self.kept_table.detach() if self.kept_table is not None else None
        return PrunedInference(self.tables, self.dim, self.kept_names, self.row_offset, table, kept).eval()

    def sparse_parameters(self) -> List[nn.Parameter]:
        return [self.weight] + super().sparse_parameters()

    def memory_report(self) -> MemoryReport:
        """Measured from the deployable form; under ``sparse_index='hetu'`` its sparse table is charged
        by Hetu's rule on the deployed (rows, D, nnz) instead of the compact bytes it holds."""
        report = super().memory_report()
        charged = sparse_storage.layout(self.num_rows, self.dim, int(self.deployable_mask().sum()), self.sparse_index)
        if self.sparse_index != "compact":
            report.inference_bytes = charged.bytes + report.breakdown["kept"]
            report.breakdown[self.breakdown_name] = charged.bytes
        report.breakdown.update({f"sparse_table/{k}": v for k, v in charged.breakdown.items()})
        return report


@torch.no_grad()
def nonzeros_per_field(module: PrunedEmbedding) -> torch.Tensor:
    """(F_c,) nonzero entries of the effective table per compressed field (KJT order)."""
    nonzero = (module.effective_table() != 0).sum(dim=1)
    starts = [int(module.row_offset[module.field_index[t.name]]) for t in module.tables if t.name not in module.kept_names]
    ends = starts[1:] + [module.num_rows]
    return torch.stack([nonzero[a:b].sum() for a, b in zip(starts, ends)]) if starts else torch.zeros(0, dtype=torch.int64)


def mask_artifacts(module: PrunedEmbedding) -> Dict[str, Any]:
    """The mask's density and, as stage artifacts, the nonzero entries per compressed field and the
    (R, D) mask as packed bits (row-major: ``numpy.unpackbits(mask_bits)[:R * D].reshape(R, D)``)."""
    mask = module.mask.detach().flatten().numpy()
    return {"density": module.density(), "nonzeros_per_field": nonzeros_per_field(module),
            "mask_bits": torch.from_numpy(np.packbits(mask))}


def pruning_stage_result(module: PrunedEmbedding, target_reached: bool) -> Dict[str, Any]:
    """What a pruning stage reports: ``mask_artifacts`` and the target (scalars are logged as
    ``stage/<name>/<key>``)."""
    return {**mask_artifacts(module), "target_density": module.nnz / module.mask.numel(),
            "target_reached": float(target_reached)}


class MaskHook(Hook):
    """Re-applies the mask to the rows the last step touched, after every optimizer step."""

    def on_step_end(self, context: Any) -> Optional[bool]:
        module = context.embedding
        rows = module.touched_rows()
        if rows is not None:
            module.reapply_mask(rows)
        return None


@dataclass
class PruningSettings:
    """Hyperparameters shared by the pruning family (each method's settings inherit them)."""

    nnz: Any = "auto"  #: kept entries, solved from the budget including sparse-index bytes (only auto)


class PruningFamily(CompressionMethod):
    """Base of the pruning family: shared solve/memory, ``nnz`` from the budget including index bytes.

    Subclasses set ``module_class`` and a ``settings_class`` derived from ``PruningSettings``, and
    may add training-state bytes (``extra_state``) and dense parameters (``dense_parameters``) to
    the closed form.
    """

    table_backed = False
    module_class = PrunedEmbedding
    settings_class = PruningSettings

    def check_settings(self) -> None:
        check_auto(self.name, "nnz", self.nnz)

    def solve_hparams(self, tables: Sequence[TableSpec], dim: int, budget: Budget) -> Dict[str, Any]:
        compressed, kept = split_tables(tables, budget)
        if not compressed:
            raise InfeasibleBudget(self.name, budget.compression_ratio, 1.0, 1.0,
                                   "every field is below min_rows_to_compress")
        rows = sum(t.num_embeddings for t in compressed)
        fixed = kept_bytes(kept, dim)
        rule = budget.sparse_index
        nnz = sparse_storage.max_nnz_within(rows, dim, target_bytes(tables, dim, budget) - fixed, rule)
        lowest = fixed + sparse_storage.stored_bytes(rows, dim, 1, rule)
        land(self.name, fixed + sparse_storage.stored_bytes(rows, dim, max(nnz, 1), rule), tables, dim, budget, lowest,
             full_embedding_bytes(tables, dim), "" if nnz >= 1 else "not even one entry of the compressed table fits")
        stored = {}
        if rule != "compact":  # the charge differs from the bytes the deployable form holds: both recorded
            compact = sparse_storage.layout(rows, dim, nnz)
            stored = {"stored_format": compact.format, "stored_bytes": compact.bytes + fixed}
        return {"nnz": int(nnz), "kept": [t.name for t in kept], "rows": int(rows),
                "density": nnz / (rows * dim), "format": sparse_storage.layout(rows, dim, nnz, rule).format,
                "sparse_index": rule, **stored, **self.method_hparams()}

    def method_hparams(self) -> Dict[str, Any]:
        """The method's own hyperparameters, passed to the module."""
        return {}

    def extra_state(self, rows: int, dim: int, num_compressed_fields: int) -> int:
        """Bytes of method-specific buffers/parameters of the training module."""
        return 0

    def dense_parameters(self, rows: int, dim: int, num_compressed_fields: int) -> int:
        """Trainable scalars outside the sparse table (Adam: 2 fp32 state values each)."""
        return 0

    def memory(self, tables: Sequence[TableSpec], dim: int, hparams: Mapping[str, Any],
               optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> MemoryReport:
        kept = [t for t in tables if t.name in set(hparams["kept"])]
        rows, nnz = int(hparams["rows"]), int(hparams["nnz"])
        layout = sparse_storage.layout(rows, dim, nnz, hparams.get("sparse_index", "compact"))
        fixed = kept_bytes(kept, dim)
        table = rows * dim * FP32_BYTES
        fields = len(tables) - len(kept)
        dense = self.dense_parameters(rows, dim, fields)
        # state: weight + bool mask + kept table + method buffers/params; sparse tables are trained
        # by Adagrad (one fp32 per value), dense parameters by Adam (two)
        training = (table + rows * dim + fixed + self.extra_state(rows, dim, fields)) + (table + fixed) \
            + 2 * dense * FP32_BYTES
        return MemoryReport(
            inference_bytes=layout.bytes + fixed,
            training_bytes=int(training),
            parameters=rows * dim + sum(t.num_embeddings for t in kept) * dim + dense,
            full_bytes=full_embedding_bytes(tables, dim),
            breakdown={"sparse_table": layout.bytes, "kept": fixed,
                       **{f"sparse_table/{k}": v for k, v in layout.breakdown.items()}},
        )

    def build(self, tables: Sequence[TableSpec], dim: int, plan: Plan,
              optimizer: EmbeddingOptimizer = EmbeddingOptimizer()) -> PrunedEmbedding:
        hp = plan.hparams
        module = self.module_class(tables, dim, hp)
        module.sparse_index = hp["sparse_index"]
        return module
