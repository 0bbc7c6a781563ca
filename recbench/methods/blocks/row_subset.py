"""Tables whose pruned rows are physically removed and whose fields have their own dims.

R stacked rows (every compressed field's rows, field f at ``row_offset[f]``) of which K are
kept; each kept row of compressed field f stores its first ``dims[f]`` values (a prefix of the D
dims: OptEmbed's dimension masks). The deployable form holds

* ``values`` — the kept rows' prefixes back to back, rows in stacked order (so field-contiguous):
  ``sum_f k_f * dims[f]`` fp32;
* an index from a stacked row to its kept position, the cheaper of a ``remap`` table (R entries at
  the smallest width holding K, K meaning "pruned") and the sorted ``kept_ids`` (K entries at the
  width holding R - 1, looked up by binary search); none when every row is kept;
* three int64 per compressed field: ``dims``, ``row_base`` (kept rows before the field) and
  ``value_base`` (values before the field).

A pruned row reads as the zero vector (OptEmbed's ``zero`` mode). ``fit_rows`` chooses the rows for
a byte budget: the rows ranked by a score (OptEmbed: L1 norm minus the field's threshold), as many
as fit — this both trims rows the learned pruning kept beyond the budget and tops up the budget
with the highest-scoring pruned rows when the learned pruning removed more than needed.

Shapes: rows (N,) int64 stacked indices -> (N, D) fp32 (zeros past a field's dim and for pruned rows).

References: docs/architecture.md section 3 ("remap tables ... count against the budget");
``recbench.methods.blocks.sparse_storage`` (index widths).
"""
from __future__ import annotations

import functools
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from recbench.methods.blocks.sparse_storage import index_dtype, index_width
from recbench.types import FP32_BYTES

INT64_BYTES = 8
INDEX_FORMATS = ("identity", "remap", "kept_ids")


def index_layout(rows: int, kept: int) -> Tuple[str, int]:
    """(format, bytes) of the cheapest index from R stacked rows to K kept positions."""
    if kept == rows:
        return "identity", 0
    remap = rows * index_width(kept)  # values 0..K-1, K marks a pruned row
    ids = kept * index_width(max(rows - 1, 0))
    return ("remap", remap) if remap <= ids else ("kept_ids", ids)


def subset_bytes(rows: int, kept: int, values: int, fields: int) -> int:
    """Inference bytes: index + ``values`` fp32 + 3 int64 per compressed field."""
    return index_layout(rows, kept)[1] + values * FP32_BYTES + 3 * fields * INT64_BYTES


@functools.lru_cache(maxsize=4)
def index_bytes_by_count(rows: int) -> np.ndarray:
    """(R + 1,) index bytes for K = 0..R kept rows (non-decreasing in K); read-only (cached)."""
    kept = np.arange(rows + 1, dtype=np.int64)
    widths = np.select([kept < 2 ** 8, kept < 2 ** 16, kept < 2 ** 32], [1, 2, 4], 8)
    out = np.minimum(rows * widths, kept * index_width(max(rows - 1, 0)))
    out[-1] = 0  # every row kept: no index
    out.flags.writeable = False
    return out


def rank_rows(scores: torch.Tensor) -> np.ndarray:
    """(R,) int64 row indices by descending ``scores``, ties: lower index first (``fit_rows``'s ranking)."""
    return np.argsort(-scores.detach().double().numpy(), kind="stable")


def fit_rows(scores: torch.Tensor, row_dims: torch.Tensor, budget_bytes: int, fields: int,
             ranking: Optional[np.ndarray] = None) -> torch.Tensor:
    """(R,) bool: the highest-``scores`` rows (ties: lower index first), as many as fit.

    ``row_dims`` (R,) is each row's stored dim; the kept set is the longest prefix of the ranking
    whose ``subset_bytes`` is at most ``budget_bytes`` (every row is kept when all fit).
    ``ranking``: ``rank_rows(scores)`` when the caller already holds it (OptEmbed's search fits
    rows for many dims at one state: the argsort over R rows is done once).
    """
    rows = scores.numel()
    order = rank_rows(scores) if ranking is None else ranking
    values = np.concatenate([[0], np.cumsum(row_dims.numpy()[order])])
    total = index_bytes_by_count(rows) + values * FP32_BYTES + 3 * fields * INT64_BYTES
    fitting = np.flatnonzero(total <= budget_bytes)
    kept = int(fitting[-1]) if fitting.size else 0  # bytes are non-decreasing in K
    keep = torch.zeros(rows, dtype=torch.bool)
    keep[torch.from_numpy(order[:kept])] = True
    return keep


class RowSubsetTable(nn.Module):
    """The deployable row subset (see the module docstring); every stored tensor is a buffer.

    Args:
        table: (R, D) or (K, D) fp32 rows (``compact`` says which), in stacked order.
        keep: (R,) bool kept rows.
        row_field: (R,) int64 compressed-field position of each stacked row.
        dims: (F_c,) int64 stored dim per compressed field (1..D).
    """

    def __init__(self, table: torch.Tensor, keep: torch.Tensor, row_field: torch.Tensor, dims: torch.Tensor,
                 compact: bool = False):
        super().__init__()
        rows, dim = keep.numel(), table.shape[1]
        kept_ids = keep.nonzero().flatten()
        kept_rows = table.detach() if compact else table.detach()[kept_ids]
        fields = dims.numel()
        per_field = torch.bincount(row_field[kept_ids], minlength=fields)
        row_base = torch.cumsum(per_field, 0) - per_field
        field_values = per_field * dims
        value_base = torch.cumsum(field_values, 0) - field_values
        row_dims = dims[row_field[kept_ids]]
        prefix = torch.arange(dim).unsqueeze(0) < row_dims.unsqueeze(1)
        self.register_buffer("values", kept_rows.float()[prefix].contiguous())
        self.format, self.dim, self.rows, self.kept = index_layout(rows, kept_ids.numel())[0], dim, rows, kept_ids.numel()
        if self.format == "remap":
            remap = torch.full((rows,), self.kept, dtype=torch.int64)
            remap[kept_ids] = torch.arange(self.kept)
            self.register_buffer("remap", remap.to(index_dtype(self.kept)))
        elif self.format == "kept_ids":
            self.register_buffer("kept_ids", kept_ids.to(index_dtype(max(rows - 1, 0))))
        self.register_buffer("dims", dims.to(torch.int64).clone())
        self.register_buffer("row_base", row_base.to(torch.int64))
        self.register_buffer("value_base", value_base.to(torch.int64))

    def stored_bytes(self) -> int:
        return int(sum(t.numel() * t.element_size() for t in self.state_dict().values()))

    def positions(self, rows: torch.Tensor) -> torch.Tensor:
        """(N,) stacked rows -> (N,) kept positions, -1 for pruned rows."""
        if self.format == "identity":
            return rows
        if self.format == "remap":
            position = self.remap[rows].long()
            return torch.where(position == self.kept, -1, position)
        ids = self.kept_ids.long()
        at = torch.searchsorted(ids, rows).clamp(max=max(self.kept - 1, 0))
        found = ids[at] == rows if self.kept else torch.zeros_like(rows, dtype=torch.bool)
        return torch.where(found, at, -1)

    def lookup(self, rows: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """(N,) stacked rows and their compressed-field positions -> (N, D)."""
        position = self.positions(rows.long())
        dims = self.dims[fields]
        start = self.value_base[fields] + (position - self.row_base[fields]) * dims
        offsets = torch.arange(self.dim)
        present = (offsets.unsqueeze(0) < dims.unsqueeze(1)) & (position >= 0).unsqueeze(1)
        index = (start.unsqueeze(1) + offsets).clamp(0, max(self.values.numel() - 1, 0))
        if self.values.numel() == 0:
            return torch.zeros(rows.numel(), self.dim)
        return torch.where(present, self.values[index], 0.0)


def breakdown(table: RowSubsetTable) -> Dict[str, int]:
    return {f"rows/{name}": int(t.numel() * t.element_size()) for name, t in table.state_dict().items()}


def stacked_row_fields(sizes: Sequence[int]) -> torch.Tensor:
    """(R,) compressed-field position of each stacked row."""
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(list(sizes), dtype=torch.int64))
