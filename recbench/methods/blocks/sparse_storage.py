"""Inference storage of pruned embedding tables: exact byte counts and the compressed tensors.

A pruned table is a (rows, D) fp32 matrix with ``nnz`` kept entries (a mask). Its deployable form
stores the kept values plus whatever index structure a lookup needs, in the cheapest of:

* ``dense``  — the full matrix, pruned entries stored as zeros: ``rows * D * 4``.
* ``csr``    — values (nnz fp32) + column indices (nnz at the smallest unsigned width holding
  ``D - 1``) + row pointers (``rows + 1`` at the smallest width holding ``nnz``). A row lookup
  reads ``ptr[r]:ptr[r+1]``.
* ``coo``    — values + row indices (smallest width holding ``rows - 1``) + column indices, sorted
  by (row, column); a row lookup binary-searches the row indices. Cheaper than CSR when far
  fewer entries than rows are kept.
* ``bitmap`` — values + one bit per entry, each row padded to whole bytes (``rows * ceil(D/8)``)
  + row pointers into the values (``rows + 1`` at the width holding ``nnz``) so a lookup is O(D)
  per id, not a popcount over the table prefix. Cheaper than CSR above ~1/8 density.

Index widths are 1, 2, 4 or 8 bytes (uint8, uint16, uint32, int64). ``layout(rows, D, nnz)``
picks the cheapest (ties: dense, csr, coo, bitmap); because every format's bytes are
non-decreasing in nnz, so is the cheapest, and ``max_nnz_within(rows, D, budget_bytes)`` inverts
it exactly (the number of kept entries a solver may target so that values *and* index overhead
fit the budget). ``compress(weight, mask)`` builds the chosen format as a ``SparseTable`` module
whose ``state_dict`` holds exactly ``layout(...).bytes`` bytes and whose ``lookup(rows)`` returns
the masked rows.

Charging rules (``budget.sparse_index``, ``recbench.types.SPARSE_INDEX_RULES``): the bytes above are the
``compact`` rule, what ``compress`` stores. The ``hetu`` rule charges a pruned table as the VLDB 2024
artifact does: every stored value and every index is one 4-byte word (fp32 values, int32 indices)
and the format is CSR or COO only (``HETU_FORMATS``, no dense or bitmap):

* ``csr`` — ``4 * (2 * nnz + rows)``: values + column indices + one row pointer per row (the
  artifact's density (r·D − 1) / (2D) solves 2·nnz + rows = r·rows·D words; the ``rows + 1``-th
  pointer it stores is not in that rule);
* ``coo`` — ``4 * 3 * nnz``: values + row indices + column indices (density r / 3).

The artifact picks CSR when r·D >= 3, else COO; that is the format allowing more entries, so
``layout(..., sparse_index="hetu")`` (the cheaper of the two, ties: CSR) and ``max_nnz_within``
reproduce its choice and its entry count. Under ``hetu`` the deployable form is still ``compress``'s
compact table (no larger than the charge whenever D <= 65536 and rows, nnz < 2**32): the charge is an
accounting rule, applied to the deployed table's shape and nnz, and the achieved ratio is computed
under it.

Shapes: weight (R, D), mask (R, D) bool; lookup: rows (N,) int64 -> (N, D) fp32.

References: docs/architecture.md section 3 ("Budget and memory": sparse-format indices of pruned tables count
against the budget); Saad, *Iterative Methods for Sparse Linear Systems* (2003), section 3.4 (CSR/COO);
``hetu`` rule: Hsword/Hetu tools/EmbeddingMemoryCompression ``methods/scheduler/switchinference.py``
(format and density of pep, deeplight, autosrh), ``methods/scheduler/deeplight.py`` (``Pruner``),
``python/hetu/ndarray.py`` (``ND_Sparse_Array``: int32 indices), commit a1cb1bcaf236c9f1d452733b105997d50c16c9df.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

import torch
from torch import nn

from recbench.methods.blocks.budget import largest_integer_within
from recbench.types import FP32_BYTES, check_sparse_index

FORMATS = ("dense", "csr", "coo", "bitmap")
#: the formats the ``hetu`` rule charges (CSR first: it wins ties, as r·D = 3 gives CSR in the artifact)
HETU_FORMATS = ("csr", "coo")
#: bytes of one value or index under the ``hetu`` rule (fp32 values, int32 indices)
HETU_WORD_BYTES = 4
# (bytes, dtype) of the unsigned index widths, smallest first (int64 is the widest torch index type)
_WIDTHS = ((1, torch.uint8), (2, torch.uint16), (4, torch.uint32), (8, torch.int64))


def index_width(max_value: int) -> int:
    """Bytes of the smallest unsigned integer type holding every value in [0, max_value]."""
    return _index(max_value)[0]


def index_dtype(max_value: int) -> torch.dtype:
    """The torch dtype of ``index_width(max_value)``."""
    return _index(max_value)[1]


def _index(max_value: int):
    if max_value < 0:
        raise ValueError(f"index range must be non-negative, got max_value={max_value}")
    for nbytes, dtype in _WIDTHS[:-1]:
        if max_value < 2 ** (8 * nbytes):
            return nbytes, dtype
    return _WIDTHS[-1]


@dataclass(frozen=True)
class Layout:
    """Bytes of one stored pruned table.

    Attributes:
        format: one of FORMATS.
        rows, dim, nnz: the table's shape and number of kept entries.
        breakdown: bytes per stored tensor (values, column_indices, row_pointers, row_indices, bitmap).
        sparse_index: the charging rule the bytes follow (one of SPARSE_INDEX_RULES).
    """

    format: str
    rows: int
    dim: int
    nnz: int
    breakdown: Dict[str, int] = field(default_factory=dict)
    sparse_index: str = "compact"

    @property
    def bytes(self) -> int:
        return int(sum(self.breakdown.values()))

    @property
    def index_bytes(self) -> int:
        """Everything but the stored values (0 for dense)."""
        return self.bytes - self.breakdown.get("values", 0)


def _check(rows: int, dim: int, nnz: int) -> None:
    if rows < 1 or dim < 1:
        raise ValueError(f"a pruned table needs rows >= 1 and dim >= 1, got rows={rows}, dim={dim}")
    if not 0 <= nnz <= rows * dim:
        raise ValueError(f"nnz must be in [0, rows * dim = {rows * dim}], got {nnz}")


def format_layout(fmt: str, rows: int, dim: int, nnz: int, sparse_index: str = "compact") -> Layout:
    """The bytes of storing ``nnz`` of a (rows, dim) table in format ``fmt`` under the charging
    rule ``sparse_index`` (module docstring)."""
    _check(rows, dim, nnz)
    check_sparse_index(sparse_index)
    if sparse_index == "hetu":
        return _hetu_layout(fmt, rows, dim, nnz)
    values = nnz * FP32_BYTES
    if fmt == "dense":
        parts = {"values": rows * dim * FP32_BYTES}
    elif fmt == "csr":
        parts = {"values": values, "column_indices": nnz * index_width(dim - 1),
                 "row_pointers": (rows + 1) * index_width(nnz)}
    elif fmt == "coo":
        parts = {"values": values, "row_indices": nnz * index_width(rows - 1),
                 "column_indices": nnz * index_width(dim - 1)}
    elif fmt == "bitmap":
        parts = {"values": values, "bitmap": rows * -(-dim // 8), "row_pointers": (rows + 1) * index_width(nnz)}
    else:
        raise ValueError(f"sparse storage format {fmt!r} is not supported; allowed: {', '.join(FORMATS)}")
    return Layout(fmt, rows, dim, nnz, parts)


def _hetu_layout(fmt: str, rows: int, dim: int, nnz: int) -> Layout:
    word = HETU_WORD_BYTES
    if fmt == "csr":
        parts = {"values": nnz * word, "column_indices": nnz * word, "row_pointers": rows * word}
    elif fmt == "coo":
        parts = {"values": nnz * word, "row_indices": nnz * word, "column_indices": nnz * word}
    else:
        raise ValueError(f"sparse storage format {fmt!r} is not charged under budget.sparse_index='hetu'; "
                         f"allowed: {', '.join(HETU_FORMATS)}")
    return Layout(fmt, rows, dim, nnz, parts, "hetu")


def layout(rows: int, dim: int, nnz: int, sparse_index: str = "compact") -> Layout:
    """The cheapest format for ``nnz`` kept entries of a (rows, dim) table under ``sparse_index``
    (ties: FORMATS order, resp. HETU_FORMATS order)."""
    check_sparse_index(sparse_index)
    formats = HETU_FORMATS if sparse_index == "hetu" else FORMATS
    return min((format_layout(f, rows, dim, nnz, sparse_index) for f in formats), key=lambda lay: lay.bytes)


def stored_bytes(rows: int, dim: int, nnz: int, sparse_index: str = "compact") -> int:
    """Inference bytes of the cheapest format under ``sparse_index`` (``compact``: the bytes stored)."""
    return layout(rows, dim, nnz, sparse_index).bytes


def max_nnz_within(rows: int, dim: int, budget_bytes: int, sparse_index: str = "compact") -> int:
    """Largest nnz in [0, rows * dim] whose cheapest charge under ``sparse_index`` fits
    ``budget_bytes``; -1 if none does.

    ``stored_bytes`` is non-decreasing in nnz (each format's bytes are), so a bisection is exact.
    """
    _check(rows, dim, 0)
    check_sparse_index(sparse_index)
    return largest_integer_within(lambda nnz: stored_bytes(rows, dim, nnz, sparse_index), 0, rows * dim,
                                  budget_bytes)


class SparseTable(nn.Module):
    """A pruned (rows, D) table stored in one format; every stored tensor is a persistent buffer.

    ``lookup(rows (N,) int64) -> (N, D)`` fp32 (pruned entries are 0). Build with ``compress``.
    """

    def __init__(self, fmt: str, rows: int, dim: int, nnz: int, tensors: Dict[str, torch.Tensor]):
        super().__init__()
        self.format, self.rows, self.dim, self.nnz = fmt, int(rows), int(dim), int(nnz)
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)

    def layout(self) -> Layout:
        return format_layout(self.format, self.rows, self.dim, self.nnz)

    def stored_bytes(self) -> int:
        """Bytes measured from the buffers held."""
        return int(sum(t.numel() * t.element_size() for t in self.state_dict().values()))

    def _spans(self, rows: torch.Tensor):
        if self.format == "coo":
            starts = self.row_indices.long()
            begin = torch.searchsorted(starts, rows, right=False)
            end = torch.searchsorted(starts, rows, right=True)
        else:
            pointers = self.row_pointers
            begin, end = pointers[rows].long(), pointers[rows + 1].long()
        return begin, end

    def lookup(self, rows: torch.Tensor) -> torch.Tensor:
        rows = rows.long()
        if self.format == "dense":
            return self.values[rows]
        out = self.values.new_zeros(rows.numel(), self.dim)
        if self.format == "bitmap":
            bits = (self.bitmap[rows].unsqueeze(-1) >> torch.arange(8, dtype=torch.uint8)) & 1
            present = bits.reshape(rows.numel(), self.bitmap.shape[1] * 8)[:, :self.dim].bool()
            position = self.row_pointers[rows].long().unsqueeze(1) + present.long().cumsum(1) - 1
            picked = self.values[position.clamp(min=0, max=max(self.nnz - 1, 0))] if self.nnz else out
            return torch.where(present, picked, out)
        begin, end = self._spans(rows)
        lengths = end - begin
        which = torch.repeat_interleave(torch.arange(rows.numel()), lengths)
        position = torch.arange(int(lengths.sum())) - torch.repeat_interleave(lengths.cumsum(0) - lengths, lengths) \
            + torch.repeat_interleave(begin, lengths)
        out[which, self.column_indices[position].long()] = self.values[position]
        return out


def compress(weight: torch.Tensor, mask: torch.Tensor, fmt: Optional[str] = None) -> SparseTable:
    """The entries of ``weight`` (R, D) where ``mask`` (R, D) is True, stored in ``fmt``
    (default: the cheapest for the mask's nnz). Kept entries are stored even when their value is 0,
    so the bytes depend on the mask only."""
    if weight.dim() != 2 or weight.shape != mask.shape:
        raise ValueError(f"weight and mask must be the same (rows, D) shape, got {tuple(weight.shape)} "
                         f"and {tuple(mask.shape)}")
    weight, mask = weight.detach().float(), mask.bool()
    rows, dim = weight.shape
    nnz = int(mask.sum())
    fmt = fmt or layout(rows, dim, nnz).format
    format_layout(fmt, rows, dim, nnz)  # validates the name
    if fmt == "dense":
        return SparseTable(fmt, rows, dim, nnz, {"values": torch.where(mask, weight, 0.0).contiguous()})
    row_idx, col_idx = mask.nonzero(as_tuple=True)  # row-major order
    values = weight[row_idx, col_idx].contiguous()
    pointers = torch.zeros(rows + 1, dtype=torch.int64)
    pointers[1:] = torch.cumsum(mask.sum(1), 0)
    pointer_dtype = index_dtype(nnz)
    if fmt == "csr":
        tensors = {"values": values, "column_indices": col_idx.to(index_dtype(dim - 1)),
                   "row_pointers": pointers.to(pointer_dtype)}
    elif fmt == "coo":
        tensors = {"values": values, "row_indices": row_idx.to(index_dtype(rows - 1)),
                   "column_indices": col_idx.to(index_dtype(dim - 1))}
    else:  # bitmap, little-endian bits within each byte, each row padded to whole bytes
        padded = torch.zeros(rows, -(-dim // 8) * 8, dtype=torch.uint8)
        padded[:, :dim] = mask.to(torch.uint8)
        weights = (2 ** torch.arange(8, dtype=torch.int32))
        packed = (padded.view(rows, -1, 8).int() * weights).sum(-1).to(torch.uint8)
        tensors = {"values": values, "bitmap": packed.contiguous(), "row_pointers": pointers.to(pointer_dtype)}
    return SparseTable(fmt, rows, dim, nnz, tensors)
